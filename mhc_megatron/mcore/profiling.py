"""Named profiler ranges around the mHC steps of a sublayer (``mhc.expand``, ``mhc.pre``,
``mhc.post_res``, ``mhc.contract``), switched on only while ``mhc-megatron profile`` (or a user
with :func:`profiling_regions`) profiles, so ordinary training pays nothing for them."""

from __future__ import annotations

import contextlib

import torch

_ENABLED = False
REGION_PREFIX = "mhc."


@contextlib.contextmanager
def profiling_regions(enabled: bool = True):
    global _ENABLED
    previous, _ENABLED = _ENABLED, enabled
    try:
        yield
    finally:
        _ENABLED = previous


def region(name: str):
    return torch.profiler.record_function(REGION_PREFIX + name) if _ENABLED else contextlib.nullcontext()
