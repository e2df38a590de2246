"""megatron.training glue: the mHC flags, the model-config hook and the ``mhc-pretrain-gpt``
launcher.

The names below load on first use (PEP 562), not at import: ``mhc-pretrain-gpt --megatron-lm``
imports this package before it puts the checkout first on ``sys.path``, and these modules import
``megatron``.
"""

import importlib

_WHERE = {
    "add_mhc_arguments": "arguments", "chain_args_providers": "arguments", "mhc_settings_from_args": "arguments",
    "apply_mhc_to_gpt_config": "model_config", "add_mhc_patch_arguments": "patch_entry",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
