"""Pre-mix: the sublayer input ``y = H_pre · x``, forward and backward.

Reference: :func:`mhc_megatron.ops.streams.mhc_pre`. Forward reads nC and writes C elements per
token. Backward reads ``g_y`` and ``x`` and writes ``g_x``; ``g_H_pre = x · g_y`` (a reduction
over C) stays in registers of one program per token. With ``accumulate`` the backward adds its
term to the ``g_x`` already in the buffer (read nC, write nC) instead of writing a partial
gradient that autograd would add afterwards (see :mod:`.sublayer`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotune, fit_block_c

_FWD_CONFIGS = [triton.Config({"BLOCK_C": bc}, num_warps=w) for bc, w in ((1024, 4), (512, 4), (2048, 8))]
_BWD_CONFIGS = [triton.Config({"BLOCK_C": bc}, num_warps=w) for bc, w in ((1024, 4), (512, 4), (2048, 8))]


def _prune(configs, args):
    return fit_block_c(configs, args["C"])


@autotune(_FWD_CONFIGS, key=["C", "N"], prune=_prune)
@triton.jit
def _pre_fwd_kernel(x_ptr, h_ptr, y_ptr, C, N: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    s = tl.arange(0, N)
    x = tl.load(x_ptr + t * N * C + s[:, None] * C + cols[None, :], mask=cmask[None, :], other=0.0)
    h = tl.load(h_ptr + t * N + s)
    y = tl.sum(h[:, None] * x.to(tl.float32), axis=0)
    tl.store(y_ptr + t * C + cols, y.to(y_ptr.dtype.element_ty), mask=cmask)


@autotune(_BWD_CONFIGS, key=["C", "N", "ACCUMULATE"], prune=_prune, restore_value=["g_x_ptr"])
@triton.jit
def _pre_bwd_kernel(g_y_ptr, x_ptr, h_ptr, g_x_ptr, g_h_ptr, C, N: tl.constexpr, ACCUMULATE: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, N)
    h = tl.load(h_ptr + t * N + s)
    acc = tl.zeros([N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        offs = t * N * C + s[:, None] * C + cols[None, :]
        g = tl.load(g_y_ptr + t * C + cols, mask=cmask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=cmask[None, :], other=0.0).to(tl.float32)
        g_x = h[:, None] * g[None, :]
        if ACCUMULATE:
            g_x += tl.load(g_x_ptr + offs, mask=cmask[None, :], other=0.0).to(tl.float32)
        tl.store(g_x_ptr + offs, g_x.to(g_x_ptr.dtype.element_ty), mask=cmask[None, :])
        acc += tl.sum(x * g[None, :], axis=1)
    tl.store(g_h_ptr + t * N + s, acc)


def pre_forward(x, h):
    T, n, C = x.shape
    y = torch.empty(T, C, dtype=x.dtype, device=x.device)
    if T:
        _pre_fwd_kernel[lambda meta: (T, triton.cdiv(C, meta["BLOCK_C"]))](x, h, y, C, N=n)
    return y


def pre_backward(g_y, x, h, g_x=None):
    """``(g_x, g_h)``; given ``g_x`` (the buffer of :mod:`.sublayer`), the term is added to it."""
    T, n, C = x.shape
    accumulate = g_x is not None
    g_x = torch.empty_like(x) if g_x is None else g_x
    g_h = torch.empty(T, n, dtype=torch.float32, device=x.device)
    if T:
        _pre_bwd_kernel[(T,)](g_y, x, h, g_x, g_h, C, N=n, ACCUMULATE=accumulate)
    return g_x, g_h


class PreFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h):
        ctx.save_for_backward(x, h)
        return pre_forward(x, h)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_y):
        x, h = ctx.saved_tensors
        return pre_backward(g_y.contiguous(), x, h)


def mhc_pre_triton(x, h_pre):
    """Triton ``H_pre · x`` for shapes already checked by the op."""
    n, C = x.shape[-2:]
    lead = x.shape[:-2]
    y = PreFunction.apply(x.reshape(-1, n, C).contiguous(), h_pre.reshape(-1, n).float().contiguous())
    return y.view(*lead, C)
