"""The megatron-core versions mhc-megatron is tested with, and the check made when the megatron-core
glue is imported (:mod:`mhc_megatron.mcore`, and through it the training and CLI modules).

An untested megatron-core raises ``ImportError`` with what was found and the two ways out:
install a tested version, or set ``MHC_MEGATRON_ALLOW_UNTESTED_MEGATRON=1`` to run anyway (then
a warning instead). ``pyproject.toml`` declares the same range (``tests/test_compat_versions.py``
checks that they agree).
"""

from __future__ import annotations

import os
import re
import warnings

#: megatron-core versions tested: ``>= TESTED_FROM`` and ``< TESTED_BELOW`` (0.19.x from 0.19.2
#: with the released wheel; 0.20 as Megatron-LM main, commit ``MEGATRON_LM_MAIN_CHECKED``).
TESTED_FROM = (0, 19, 2)
TESTED_BELOW = (0, 21, 0)
MEGATRON_LM_MAIN_CHECKED = "d98e8a64ddf34856e74b24714e3bedb2f5a39553"
OVERRIDE_ENV = "MHC_MEGATRON_ALLOW_UNTESTED_MEGATRON"


def _text(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


TESTED_SPECIFIER = f">={_text(TESTED_FROM)},<{_text(TESTED_BELOW[:2])}"


def parse_version(text: str) -> tuple[int, int, int]:
    """``"0.20.0rc1+abc1234"`` -> ``(0, 20, 0)``: the release part (pre-releases and local tags
    of a tested release count as that release)."""
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if not match:
        raise ValueError(f"not a megatron-core version: {text!r}")
    return int(match[1]), int(match[2]), int(match[3] or 0)


def check_megatron_core(version: str | None = None, location: str | None = None, environ=None) -> None:
    """Raise ``ImportError`` for a megatron-core outside the tested range (see the module doc)."""
    environ = os.environ if environ is None else environ
    if version is None:
        from megatron.core import package_info

        version, location = package_info.__version__, os.path.dirname(os.path.abspath(package_info.__file__))
    release = parse_version(version)
    if TESTED_FROM <= release < TESTED_BELOW:
        return
    where = f" at {location}" if location else ""
    message = (
        f"mhc-megatron is tested with megatron-core {TESTED_SPECIFIER} (Megatron-LM main checked at "
        f"{MEGATRON_LM_MAIN_CHECKED[:8]}), found megatron-core {version}{where}. "
        f"Install a tested version (pip install 'megatron-core{TESTED_SPECIFIER}') or set "
        f"{OVERRIDE_ENV}=1 to run with this one anyway"
    )
    if environ.get(OVERRIDE_ENV, "") not in ("", "0"):
        warnings.warn(message.replace(f" or set {OVERRIDE_ENV}=1 to run with this one anyway",
                                      f"; running anyway ({OVERRIDE_ENV} is set)"), stacklevel=2)
        return
    raise ImportError(message)
