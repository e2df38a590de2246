"""Choosing between the PyTorch reference and the Triton kernels for one op call.

``backend="auto"`` takes the Triton kernels for CUDA tensors and the reference otherwise. When
CUDA inputs cannot use the kernels (an unsupported n or dtype, triton missing) it warns once per
op and reason, naming why, and runs the reference: never a silent change of computation.
``backend="triton"`` raises instead; ``backend="reference"`` always runs the reference.
"""

from __future__ import annotations

import warnings

import torch

from ..kernels import SUPPORTED_STREAMS, unsupported_reason  # torch only, no triton import

BACKENDS = ("auto", "reference", "triton")
_warned: set[tuple[str, str]] = set()

SUPPORTED = (
    "CUDA tensors (CPU tensors under TRITON_INTERPRET=1), float32/bfloat16/float16 activations, "
    f"n in {SUPPORTED_STREAMS}"
)


def choose(op: str, backend: str, *tensors: torch.Tensor, n: int | None = None) -> str:
    """``"reference"`` or ``"triton"`` for this call (see the module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "auto" and not any(t.is_cuda for t in tensors):
        return "reference"
    reason = unsupported_reason(*tensors, n=n)
    if reason is None:
        return "triton"
    if backend == "triton":
        raise ValueError(f"{op}: the Triton kernels cannot take these inputs: {reason}. Supported: {SUPPORTED}")
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"{op}: running the PyTorch reference instead of the Triton kernels: {reason}", stacklevel=3)
    return "reference"


def reference_only(op: str, backend: str, what: str, flag: str, *tensors: torch.Tensor) -> None:
    """Refuse a computation the Triton kernels do not implement where this call would run them
    (``backend="triton"``, or ``"auto"`` with CUDA tensors): never a silent fallback."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "triton" or (backend == "auto" and any(t.is_cuda for t in tensors)):
        raise ValueError(
            f"{op}: {what} ({flag}) is implemented in the PyTorch reference only, not in the Triton "
            f"kernels (backend {backend!r}); run with --mhc-kernels reference (backend='reference') "
            f"or drop {flag}"
        )
