"""Fused Triton kernels of the mHC steps (``coefficients``, ``pre``, ``post_res``, ``sinkhorn``,
``sublayer``), and what the rest of the package may ask about them without importing triton."""

from ._common import (
    SUPPORTED_DTYPES,
    SUPPORTED_STREAMS,
    interpreter_sms,
    interpreting,
    num_coefficients,
    triton_available,
    unsupported_reason,
)

__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_STREAMS",
    "interpreter_sms",
    "interpreting",
    "num_coefficients",
    "triton_available",
    "unsupported_reason",
]
