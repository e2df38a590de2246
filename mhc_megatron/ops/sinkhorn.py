"""Sinkhorn-Knopp projection of ``n x n`` logits onto (nearly) doubly stochastic matrices.

The paper's iteration (eq. 9) is ``M0 = exp(logits)``, then ``iters`` times: normalise the
columns to sum 1, then the rows. We run the same iteration in the log domain::

    z <- z - logsumexp(z, over rows)    # columns of exp(z) sum to 1
    z <- z - logsumexp(z, over columns) # rows of exp(z) sum to 1

which is the same maths (every step only rescales rows or columns of ``M0``) but stays finite
for logits of any magnitude: a column whose entries all underflow ``exp`` in the linear form
(0/0) is still normalised here. Ending on rows makes every row sum 1 up to rounding, so the
finite-``iters`` error shows in the column sums only.

Backward of one step ``b = a - logsumexp(a, dim)`` is ``ga = gb - exp(b) * sum(gb, dim)``: it
needs only the normalised matrix ``exp(b)`` of that step. The autograd function keeps just the
logits and recomputes those ``2 * iters`` matrices inside ``backward``, so nothing of size
``iters`` stays alive between forward and backward.
"""

from __future__ import annotations

import torch

from ._checks import check_iters, compute_dtype


def _row_col_steps(logits: torch.Tensor, iters: int, keep: bool):
    """Run the log-domain iteration; optionally keep each step's normalised matrix."""
    z = logits
    kept = []
    for _ in range(iters):
        z = z - torch.logsumexp(z, dim=-2, keepdim=True)  # columns
        if keep:
            kept.append(z.exp())
        z = z - torch.logsumexp(z, dim=-1, keepdim=True)  # rows
        if keep:
            kept.append(z.exp())
    return z.exp(), kept


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


def sinkhorn_knopp(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Project logits ``[..., n, n]`` onto an approximately doubly stochastic matrix.

    Runs ``iters`` column-then-row normalisations of ``exp(logits)`` (the paper's order, so every
    row sums to 1). Half-precision inputs are computed and returned in float32; float64 stays
    float64. Differentiable, with a backward that recomputes the iterations.
    """
    iters = check_iters(iters)
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(
            f"sinkhorn_knopp expects square matrices [..., n, n], got shape {tuple(logits.shape)}"
        )
    return _SinkhornKnopp.apply(logits.to(compute_dtype(logits)), iters)

