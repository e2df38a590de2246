"""Refusals about what the launch needs installed or combined, decided from the command line.

``--transformer-impl transformer_engine`` is Megatron's default, so a command line without the
flag asks for transformer-engine too. Without the package Megatron's TE layer classes are
``None`` and the build fails with ``TypeError: 'NoneType' object is not callable``; this check
says what to install instead. ``--transformer-impl local`` (the tests' and CPU runs') needs nothing.
"""

from __future__ import annotations

import importlib.util

TE_INSTALL = "pip install -e .[gpu]"  # pyproject.toml's gpu extra: the transformer-engine release tested


def transformer_engine_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def check_launch_environment(args) -> None:
    impl = getattr(args, "transformer_impl", "local")
    if impl == "transformer_engine" and not transformer_engine_installed():
        raise ValueError(
            "--transformer-impl transformer_engine: transformer-engine is not installed (and it is Megatron's "
            f"default when the flag is not given): install it on GPU machines with `{TE_INSTALL}` from the "
            "repository, or pass --transformer-impl local (megatron-core's torch layers)")
    from .lr_schedule import check_step_decay_args

    check_step_decay_args(args)
