"""Launch configurations: YAML files of Megatron/mhc-megatron flags, their layout checks, and
laptop-side estimates of what a run needs (``mhc-megatron validate-config``)."""

from .config import LaunchConfig, Layout, check_layout, load_launch_config

__all__ = ["LaunchConfig", "Layout", "check_layout", "load_launch_config"]
