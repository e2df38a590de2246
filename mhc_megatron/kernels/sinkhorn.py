"""Sinkhorn-Knopp on chip: forward, and a backward that recomputes the iterations.

Reference: :func:`mhc_megatron.ops.sinkhorn.sinkhorn_knopp` (same iteration: the first
column/row normalisation in the log domain, the rest in the linear domain; see its docstring
for why that is safe). A program holds ``BLOCK_T`` tokens' ``n x n`` matrices in registers
(tensor ``[BLOCK_T, n, n]``; axis 1 indexes rows i, axis 2 columns j).

Backward, in terms of ``z = log P``: the step that produced ``P_{t+1}`` contributes
``g <- g - P_{t+1} * sum(g, dim)``, so walking back needs ``P_t`` for every step. Keeping the
``2 * iters`` matrices is not possible in registers, so ``P_t`` is recomputed from the logits
for each step: ``O(iters^2)`` work on ``n^2`` numbers per token (about 26k flops per token at
n = 4, iters = 20), cheap next to the memory traffic of a sublayer, and no memory traffic.

The device functions are shared with the fused coefficient kernel (:mod:`.coefficients`).
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
def sinkhorn_state(logits, last_step):
    """The normalised matrix after steps ``0..last_step`` (even steps: columns, odd: rows)."""
    z = _log_normalise_columns(logits)
    if last_step >= 1:
        z = _log_normalise_rows(z)
    p = tl.exp(z)
    for step in range(2, last_step + 1):
        if step % 2 == 0:
            p = p / tl.sum(p, axis=1)[:, None, :]
        else:
            p = p / tl.sum(p, axis=2)[:, :, None]
    return p


@triton.jit
def sinkhorn_grad(logits, g_out, iters):
    """Gradient w.r.t. the logits of ``sinkhorn_state(logits, 2 * iters - 1)``."""
    last = 2 * iters - 1
    g = g_out * sinkhorn_state(logits, last)
    for k in range(0, 2 * iters):
        step = last - k
        p = sinkhorn_state(logits, step)
        if step % 2 == 1:
            g = g - p * tl.sum(g, axis=2)[:, :, None]
        else:
            g = g - p * tl.sum(g, axis=1)[:, None, :]
    return g


@triton.jit
def _sinkhorn_fwd_kernel(logits_ptr, out_ptr, T, iters, N: tl.constexpr, BLOCK_T: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs = tok.to(tl.int64)[:, None, None] * N * N + tl.arange(0, N)[None, :, None] * N + tl.arange(0, N)[None, None, :]
    mask = (tok < T)[:, None, None]
    z = tl.load(logits_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, sinkhorn_state(z, 2 * iters - 1), mask=mask)


@triton.jit
def _sinkhorn_bwd_kernel(logits_ptr, g_out_ptr, g_in_ptr, T, iters, N: tl.constexpr, BLOCK_T: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs = tok.to(tl.int64)[:, None, None] * N * N + tl.arange(0, N)[None, :, None] * N + tl.arange(0, N)[None, None, :]
    mask = (tok < T)[:, None, None]
    z = tl.load(logits_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_out_ptr + offs, mask=mask, other=0.0)
    tl.store(g_in_ptr + offs, sinkhorn_grad(z, g, iters), mask=mask)


def block_t(n: int) -> int:
    """Tokens per program: [BLOCK_T, n, n] fp32 in registers (n = 8 needs fewer, or it spills)."""
    return 64 if n <= 4 else 16


class SinkhornFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, iters):
        T, n, _ = logits.shape
        out = torch.empty_like(logits)
        if T:
            bt = block_t(n)
            _sinkhorn_fwd_kernel[(triton.cdiv(T, bt),)](logits, out, T, iters, N=n, BLOCK_T=bt)
        ctx.save_for_backward(logits)
        ctx.iters = iters
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out):
        (logits,) = ctx.saved_tensors
        T, n, _ = logits.shape
        g_in = torch.empty_like(logits)
        if T:
            bt = block_t(n)
            _sinkhorn_bwd_kernel[(triton.cdiv(T, bt),)](
                logits, g_out.float().contiguous(), g_in, T, ctx.iters, N=n, BLOCK_T=bt
            )
        return g_in, None


def sinkhorn_knopp_triton(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """Triton Sinkhorn-Knopp for ``[..., n, n]`` logits already checked by the op (fp32 out)."""
    n = logits.shape[-1]
    out = SinkhornFunction.apply(logits.reshape(-1, n, n).float().contiguous(), iters)
    return out.view(logits.shape)
