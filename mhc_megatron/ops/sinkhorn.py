"""Sinkhorn-Knopp projection of ``n x n`` logits onto (nearly) doubly stochastic matrices.

The paper's iteration (eq. 9) is ``M0 = exp(logits)``, then ``iters`` times: normalise the
columns to sum 1, then the rows (``order="cols-first"``, also the order of DeepSeek's released
code; the default). Every step only rescales rows or columns, so it can run in the
log domain (``z <- z - logsumexp(z, dim)``) or the linear one (``P <- P / sum(P, dim)``) with
the same result. We run the first iteration in the log domain, which keeps logits of any
magnitude finite (a column whose entries all underflow ``exp`` would be 0/0 in the linear
form), and the rest in the cheaper linear domain. That is safe: after one full log-domain
iteration every row and every column has an entry of at least ``1/n^2``, and each linear step
keeps that true (a normalised row or column has an entry >= 1/n, and no sum exceeds n), so no
sum can underflow. Ending on rows makes every row sum 1 up to rounding; the finite-``iters``
error shows in the column sums only.

Backward: in terms of ``z = log P``, every step ``b = a - logsumexp(a, dim)`` has the gradient
``ga = gb - exp(b) * sum(gb, dim)``, which needs only the normalised matrix ``exp(b)`` of that
step. The autograd function keeps just the logits and recomputes those ``2 * iters`` matrices
inside ``backward``, so nothing of size ``iters`` stays alive between forward and backward.

``order="rows-first"`` is upstream Megatron-LM's iteration instead, reproduced exactly for
converted checkpoints: ``M0 = exp(logits - max over each row)``, then ``iters`` times: rows, then
columns, every sum clamped at ``>= 1e-6``, all in the linear domain. Ending on columns makes the
column sums 1 and leaves the finite-``iters`` error in the row sums. Its backward also keeps only
the logits and re-runs the iteration with autograd.
"""

from __future__ import annotations

import torch

from ._backend import choose, reference_only
from ._checks import check_iters, compute_dtype

SINKHORN_ORDERS = ("cols-first", "rows-first")
#: upstream Megatron-LM's clamp on every row/column sum of its (rows-first) iteration
ROWS_FIRST_SUM_MIN = 1e-6


def _row_col_steps(logits: torch.Tensor, iters: int, keep: bool):
    """Run the iteration; optionally keep each step's normalised matrix (2 per iteration)."""
    kept = []
    z = logits - torch.logsumexp(logits, dim=-2, keepdim=True)  # columns, log domain
    if keep:
        kept.append(z.exp())
    p = (z - torch.logsumexp(z, dim=-1, keepdim=True)).exp()  # rows, log domain
    if keep:
        kept.append(p)
    for _ in range(iters - 1):
        p = p / p.sum(dim=-2, keepdim=True)  # columns
        if keep:
            kept.append(p)
        p = p / p.sum(dim=-1, keepdim=True)  # rows
        if keep:
            kept.append(p)
    return p, kept


def sinkhorn_backward(logits: torch.Tensor, grad_out: torch.Tensor, iters: int) -> torch.Tensor:
    """Gradient of :func:`sinkhorn_knopp` w.r.t. ``logits``, recomputing the iterations."""
    _, steps = _row_col_steps(logits, iters, keep=True)
    g = grad_out * steps[-1]  # through the final exp
    for t in range(2 * iters - 1, -1, -1):
        dim = -1 if t % 2 else -2  # odd steps normalised rows, even ones columns
        g = g - steps[t] * g.sum(dim=dim, keepdim=True)
    return g


class _SinkhornKnopp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int) -> torch.Tensor:
        out, _ = _row_col_steps(logits, iters, keep=False)
        ctx.save_for_backward(logits)
        ctx.iters = iters
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (logits,) = ctx.saved_tensors
        return sinkhorn_backward(logits, grad_out.to(logits.dtype), ctx.iters), None


def _rows_first(logits: torch.Tensor, iters: int) -> torch.Tensor:
    # the row-max shift cancels in the first row normalisation: no gradient through it
    m = (logits - logits.amax(dim=-1, keepdim=True).detach()).exp()
    for _ in range(iters):
        m = m / m.sum(dim=-1, keepdim=True).clamp(min=ROWS_FIRST_SUM_MIN)
        m = m / m.sum(dim=-2, keepdim=True).clamp(min=ROWS_FIRST_SUM_MIN)
    return m


class _SinkhornRowsFirst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.iters = iters
        return _rows_first(logits, iters)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (logits,) = ctx.saved_tensors
        with torch.enable_grad():
            z = logits.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(_rows_first(z, ctx.iters), z, grad_out.to(logits.dtype))
        return grad, None


def check_sinkhorn_order(order: str) -> str:
    if order not in SINKHORN_ORDERS:
        raise ValueError(
            f"Sinkhorn order must be one of {', '.join(SINKHORN_ORDERS)}, got {order!r} "
            "(cols-first: the paper's and DeepSeek's order; rows-first: upstream Megatron-LM's)"
        )
    return order


def sinkhorn_knopp(
    logits: torch.Tensor, iters: int = 20, backend: str = "auto", order: str = "cols-first"
) -> torch.Tensor:
    """Project logits ``[..., n, n]`` onto an approximately doubly stochastic matrix.

    ``order="cols-first"`` (default) runs ``iters`` column-then-row normalisations of
    ``exp(logits)`` (the paper's order, so every row sums to 1); ``"rows-first"`` runs upstream
    Megatron-LM's row-then-column iteration with its ``1e-6`` clamp on the sums (PyTorch
    reference only). Half-precision inputs are computed and returned in float32; float64 stays
    float64. Differentiable, with a backward that recomputes the iterations.
    ``backend``: ``"auto"`` (Triton for CUDA tensors), ``"reference"`` or ``"triton"``.
    """
    iters = check_iters(iters)
    check_sinkhorn_order(order)
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(
            f"sinkhorn_knopp expects square matrices [..., n, n], got shape {tuple(logits.shape)}"
        )
    if order == "rows-first":
        reference_only("sinkhorn_knopp", backend, "Sinkhorn order rows-first", "--mhc-sinkhorn-order", logits)
        return _SinkhornRowsFirst.apply(logits.to(compute_dtype(logits)), iters)
    if choose("sinkhorn_knopp", backend, logits, n=logits.shape[-1]) == "triton":
        from ..kernels.sinkhorn import sinkhorn_knopp_triton

        return sinkhorn_knopp_triton(logits, iters)
    return _SinkhornKnopp.apply(logits.to(compute_dtype(logits)), iters)

