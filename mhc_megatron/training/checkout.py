"""``--megatron-lm PATH``: make the checkout's ``megatron`` the one this process imports.

A checkout's ``pretrain_gpt.py`` must run against its own ``megatron.training`` and ``megatron.core``:
mixing them with an installed megatron-core wheel silently ignores local changes and the checkout's
own flags (upstream's ``--enable-mhc-connections``). So the checkout goes first on ``sys.path``
before anything imports ``megatron`` (the launcher and :mod:`mhc_megatron.training` import it lazily),
and a process that has already imported another ``megatron`` is refused rather than mixed.
"""

from __future__ import annotations

import os
import sys


def _origin(module) -> str:
    """The sys.path entry a package module was imported from (.../megatron/core/__init__.py -> ...)."""
    path = os.path.abspath(module.__file__)
    for _ in range(module.__name__.count(".") + 2):
        path = os.path.dirname(path)
    return path


def use_checkout(path: str) -> tuple[str, str]:
    """Put the checkout at ``path`` first on ``sys.path`` and import its ``megatron.core``.

    Returns (megatron-core version, the directory ``megatron`` is imported from). ValueError names
    the flag when the checkout has no ``megatron`` package or another one is imported already.
    """
    root = os.path.abspath(path)
    if not os.path.isfile(os.path.join(root, "megatron", "core", "__init__.py")):
        raise ValueError(f"--megatron-lm {path}: no megatron/core package there (not a Megatron-LM checkout)")
    # megatron itself may be a namespace package (no __file__): look at every loaded megatron module
    for name, module in list(sys.modules.items()):
        if (name == "megatron" or name.startswith("megatron.")) and getattr(module, "__file__", None):
            if _origin(module) != root:
                raise ValueError(
                    f"--megatron-lm {path}: this process already imported megatron from {_origin(module)}; "
                    "run mhc-pretrain-gpt in a fresh process so that only the checkout's megatron is used"
                )
    if sys.path[:1] != [root]:
        sys.path.insert(0, root)
    import megatron.core

    where = _origin(megatron.core)
    if where != root:  # e.g. a namespace package or an import hook resolving elsewhere
        raise ValueError(f"--megatron-lm {path}: megatron.core was imported from {where}, not from the checkout")
    return getattr(megatron.core, "__version__", "unknown version"), where
