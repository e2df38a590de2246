"""Sinkhorn-Knopp on chip: forward, and a backward in O(t_max) steps without memory traffic.

Reference: :func:`mhc_megatron.ops.sinkhorn.sinkhorn_knopp` (same iteration: the first
column/row normalisation in the log domain, the rest in the linear domain; see its docstring
for why that is safe). A program holds ``BLOCK_T`` tokens' ``n x n`` matrices in registers
(tensor ``[BLOCK_T, n, n]``; axis 1 indexes rows i, axis 2 columns j).

Backward, in terms of ``z = log P``: the step that produced ``P_s`` contributes
``g <- g - P_s * sum(g, dim_s)``, so walking back needs every ``P_s``, last first. The backward
runs the forward once more and keeps, of each linear step, only its normaliser (the n column or
row sums, ``2 (t_max - 1)`` vectors; the iteration count is a compile-time constant, so they are
values the compiler keeps in registers). Walking back, each step is undone by multiplying its sums
back in, ``P_{s-1} = P_s * sums_s`` (exact up to one rounding per step); ``P_0``, from the
log-domain first iteration, is kept as it is. That is O(t_max) dependent steps and no memory
traffic. (Dividing and multiplying back is relative-precision arithmetic: entries that the forward
rounds to zero stay zero, as in the forward.)

The device functions are shared with the fused coefficient kernels (:mod:`.coefficients`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _log_normalise_columns(z):
    m = tl.max(z, axis=1)
    return z - (m[:, None, :] + tl.log(tl.sum(tl.exp(z - m[:, None, :]), axis=1))[:, None, :])


@triton.jit
def _log_normalise_rows(z):
    m = tl.max(z, axis=2)
    return z - (m[:, :, None] + tl.log(tl.sum(tl.exp(z - m[:, :, None]), axis=2))[:, :, None])


@triton.jit
def _first_iteration(logits):
    """Steps 0 (columns) and 1 (rows), log domain: ``(P_0, P_1)``."""
    z = _log_normalise_columns(logits)
    return tl.exp(z), tl.exp(_log_normalise_rows(z))


@triton.jit
def sinkhorn_forward(logits, ITERS: tl.constexpr):
    """The matrix after ``ITERS`` column-then-row normalisations of ``exp(logits)``."""
    _, p = _first_iteration(logits)
    for _ in range(ITERS - 1):
        p = p / tl.sum(p, axis=1)[:, None, :]
        p = p / tl.sum(p, axis=2)[:, :, None]
    return p


@triton.jit
def sinkhorn_backward(logits, g_out, ITERS: tl.constexpr):
    """Gradient w.r.t. the logits of ``sinkhorn_forward(logits, ITERS)`` (module docstring)."""
    p0, p = _first_iteration(logits)
    sums = ()
    for _ in tl.static_range(ITERS - 1):
        col = tl.sum(p, axis=1)
        p = p / col[:, None, :]
        row = tl.sum(p, axis=2)
        p = p / row[:, :, None]
        sums = sums + (col, row)
    g = g_out * p  # through the final exp
    for k in tl.static_range(ITERS - 1):
        col = sums[2 * (ITERS - 2 - k)]
        row = sums[2 * (ITERS - 2 - k) + 1]
        g = g - p * tl.sum(g, axis=2)[:, :, None]  # the row step
        p = p * row[:, :, None]
        g = g - p * tl.sum(g, axis=1)[:, None, :]  # the column step
        p = p * col[:, None, :]
    g = g - p * tl.sum(g, axis=2)[:, :, None]  # step 1 (rows), P_1
    return g - p0 * tl.sum(g, axis=1)[:, None, :]  # step 0 (columns), P_0


@triton.jit
def _sinkhorn_fwd_kernel(logits_ptr, out_ptr, T, ITERS: tl.constexpr, N: tl.constexpr, BLOCK_T: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs = tok.to(tl.int64)[:, None, None] * N * N + tl.arange(0, N)[None, :, None] * N + tl.arange(0, N)[None, None, :]
    mask = (tok < T)[:, None, None]
    z = tl.load(logits_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, sinkhorn_forward(z, ITERS), mask=mask)


@triton.jit
def _sinkhorn_bwd_kernel(logits_ptr, g_out_ptr, g_in_ptr, T, ITERS: tl.constexpr, N: tl.constexpr,
                         BLOCK_T: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs = tok.to(tl.int64)[:, None, None] * N * N + tl.arange(0, N)[None, :, None] * N + tl.arange(0, N)[None, None, :]
    mask = (tok < T)[:, None, None]
    z = tl.load(logits_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_out_ptr + offs, mask=mask, other=0.0)
    tl.store(g_in_ptr + offs, sinkhorn_backward(z, g, ITERS), mask=mask)


def block_t(n: int) -> int:
    """Tokens per program: [BLOCK_T, n, n] fp32 plus the backward's 2 (t_max - 1) sums of n in
    registers (checked for spills by ``compile_check``)."""
    return 32 if n <= 4 else 8


def sinkhorn_fwd(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """``[T, n, n]`` fp32 logits -> the doubly stochastic matrices."""
    T, n, _ = logits.shape
    out = torch.empty_like(logits)
    if T:
        bt = block_t(n)
        _sinkhorn_fwd_kernel[(triton.cdiv(T, bt),)](logits, out, T, ITERS=iters, N=n, BLOCK_T=bt)
    return out


def sinkhorn_bwd(logits: torch.Tensor, g_out: torch.Tensor, iters: int) -> torch.Tensor:
    T, n, _ = logits.shape
    g_in = torch.empty_like(logits)
    if T:
        bt = block_t(n)
        _sinkhorn_bwd_kernel[(triton.cdiv(T, bt),)](logits, g_out, g_in, T, ITERS=iters, N=n, BLOCK_T=bt)
    return g_in


class SinkhornFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, iters):
        ctx.save_for_backward(logits)
        ctx.iters = iters
        return sinkhorn_fwd(logits, iters)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out):
        (logits,) = ctx.saved_tensors
        return sinkhorn_bwd(logits, g_out.float().contiguous(), ctx.iters), None


def sinkhorn_knopp_triton(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Triton Sinkhorn-Knopp for ``[..., n, n]`` logits already checked by the op (fp32 out)."""
    n = logits.shape[-1]
    out = SinkhornFunction.apply(logits.reshape(-1, n, n).float().contiguous(), iters)
    return out.view(logits.shape)
