"""Input validation shared by the ops: every message names the offending value and the fix."""

from __future__ import annotations

import numbers

import torch


def check_expansion_rate(n) -> int:
    """Return ``n`` as an int, or raise if it is not an integer >= 1."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(
            f"expansion rate must be an integer >= 1, got {n!r}; "
            "use 4 (the paper's value), or residual mode for a plain residual stream"
        )
    return int(n)


def check_iters(iters) -> int:
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 1:
        raise ValueError(
            f"Sinkhorn iterations must be an integer >= 1, got {iters!r}; the paper uses 20"
        )
    return int(iters)


def check_streams(x: torch.Tensor, name: str = "x") -> tuple[int, int]:
    """``x`` must be ``[..., n, C]``; returns ``(n, C)``."""
    if x.dim() < 2:
        raise ValueError(
            f"{name} must have shape [..., n, C] (n streams of width C), got {tuple(x.shape)}"
        )
    return x.shape[-2], x.shape[-1]


def check_floating(op: str, **tensors: torch.Tensor | None) -> None:
    """Refuse integer, bool and complex inputs: the reference would compute in (and truncate to) their dtype."""
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise ValueError(
                f"{op}: {name} has dtype {t.dtype}; the mHC ops take floating-point tensors "
                f"(float32, bfloat16, float16 or float64): convert it first, e.g. {name}.float()"
            )


def check_shape(t: torch.Tensor, expected: tuple[int, ...], name: str, what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(expected)}{hint}")


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Coefficient maths runs in fp32 for half inputs, in float64 for float64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
