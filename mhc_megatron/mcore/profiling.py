"""Named ranges around the mHC steps of a sublayer (``mhc.expand``, ``mhc.pre``, ``mhc.post_res``,
``mhc.contract``), off unless asked for, so ordinary training pays nothing for them.

Two independent switches:

- :func:`profiling_regions`: ``torch.profiler`` ranges, for ``mhc-megatron profile`` (or a user
  profiling with ``torch.profiler``);
- :func:`nvtx_regions`: NVTX ranges through megatron-core's own helpers
  (``megatron.core.utils.nvtx_range_push/pop``), for ``mhc-pretrain-gpt --mhc-profile-ranges``.
  Those helpers are silent until Megatron switches its NVTX profiling on (``--nvtx-ranges`` from
  ``--profile-step-start`` to ``--profile-step-end``), so the mHC ranges land in the same nsys
  window as Megatron's own.
"""

from __future__ import annotations

import contextlib

import torch

_ENABLED = False
_NVTX = False
REGION_PREFIX = "mhc."


@contextlib.contextmanager
def profiling_regions(enabled: bool = True):
    global _ENABLED
    previous, _ENABLED = _ENABLED, enabled
    try:
        yield
    finally:
        _ENABLED = previous


@contextlib.contextmanager
def nvtx_regions(enabled: bool = True):
    global _NVTX
    previous, _NVTX = _NVTX, enabled
    try:
        yield
    finally:
        _NVTX = previous


def nvtx_regions_enabled() -> bool:
    return _NVTX


def set_nvtx_regions(enabled: bool) -> None:
    """Switch the NVTX ranges on or off until changed again (``mhc-pretrain-gpt`` restores the
    previous state when the launch returns)."""
    global _NVTX
    _NVTX = enabled


@contextlib.contextmanager
def _nvtx_range(msg: str):
    from megatron.core.utils import nvtx_range_pop, nvtx_range_push

    nvtx_range_push(msg)
    try:
        yield
    finally:
        nvtx_range_pop(msg)


def region(name: str):
    if not (_ENABLED or _NVTX):
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    if _NVTX:
        stack.enter_context(_nvtx_range(REGION_PREFIX + name))
    if _ENABLED:
        stack.enter_context(torch.profiler.record_function(REGION_PREFIX + name))
    return stack
