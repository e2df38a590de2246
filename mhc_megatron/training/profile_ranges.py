"""``mhc-pretrain-gpt --mhc-profile-ranges``: the mHC steps as NVTX ranges in Megatron's nsys window.

The ranges go through megatron-core's NVTX helpers, which record only while Megatron's NVTX
profiling is on (``--profile --nvtx-ranges``, from ``--profile-step-start`` to
``--profile-step-end``); without those flags the ranges would record nothing, so the flag is refused.
"""

from __future__ import annotations

def check_profile_ranges_args(args) -> None:
    if not getattr(args, "mhc_profile_ranges", False):
        return
    if args.residual_mode == "residual":
        raise ValueError("--mhc-profile-ranges marks the mHC steps, which need --residual-mode hc or mhc")
    missing = [flag for flag, on in (("--profile", args.profile), ("--nvtx-ranges", args.nvtx_ranges)) if not on]
    if missing:
        raise ValueError(
            f"--mhc-profile-ranges records through Megatron's NVTX ranges, which Megatron switches on only "
            f"with --profile --nvtx-ranges (between --profile-step-start and --profile-step-end): add "
            f"{' '.join(missing)}"
        )


def apply_profile_ranges(args) -> None:
    """Turn the mHC NVTX ranges on for a launch with ``--mhc-profile-ranges`` (the launcher's
    ``nvtx_regions`` scope switches them back off when it returns)."""
    from ..mcore.profiling import set_nvtx_regions

    if getattr(args, "mhc_profile_ranges", False):
        set_nvtx_regions(True)
