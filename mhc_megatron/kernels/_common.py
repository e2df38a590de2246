"""What every kernel module shares: Triton availability, supported inputs, launch helpers."""

from __future__ import annotations

import functools
import os

import torch

SUPPORTED_STREAMS = (1, 2, 4, 8)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Triton's CPU interpreter (``TRITON_INTERPRET=1``) runs kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unsupported_reason(*tensors: torch.Tensor, n: int | None = None) -> str | None:
    """Why the Triton kernels cannot take these inputs, or ``None`` if they can."""
    if not triton_available():
        return "triton is not installed"
    for t in tensors:
        if t.device.type != "cuda" and not (interpreting() and t.device.type == "cpu"):
            return f"the kernels run on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), got {t.device}"
        if t.dtype not in SUPPORTED_DTYPES and t.dtype != torch.float64:
            return f"unsupported dtype {t.dtype}"
        if t.dtype == torch.float64:
            return "float64 is reference-only (the kernels compute in float32)"
    if n is not None and n not in SUPPORTED_STREAMS:
        return f"the kernels support n in {SUPPORTED_STREAMS}, got n={n}"
    return None


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def block_c(C: int, cap: int = 1024) -> int:
    """Width of a C-chunk: the next power of two, at most ``cap``."""
    return min(next_pow2(C), cap)
