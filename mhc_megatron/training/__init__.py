"""megatron.training glue: the mHC flags, the model-config hook and the ``mhc-pretrain-gpt``
launcher."""

from .arguments import add_mhc_arguments, chain_args_providers, mhc_settings_from_args
from .model_config import apply_mhc_to_gpt_config

__all__ = ["add_mhc_arguments", "apply_mhc_to_gpt_config", "chain_args_providers", "mhc_settings_from_args"]
