"""Fused post + residual: ``out = H_res · x + H_post^T · f``, forward and backward.

Reference: :func:`mhc_megatron.ops.streams.mhc_post_res`. Per token the forward reads the n
streams and ``f`` ((n+1)C elements) and writes nC (spec section 3's fused target), accumulating
in fp32 and storing in the activation dtype. The backward reads ``g_out``, ``x`` and ``f`` once
and writes ``g_x`` and ``g_f``; the coefficient gradients (``g_H_post = g_out · f``,
``g_H_res = g_out · x^T``, reductions over C) stay in registers of one program per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block_c


@triton.jit
def _post_res_fwd_kernel(
    x_ptr, f_ptr, h_post_ptr, h_res_ptr, out_ptr, C,
    N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    s = tl.arange(0, N)
    f = tl.load(f_ptr + t * C + cols, mask=cmask, other=0.0).to(tl.float32)  # [BC]
    h_post = tl.load(h_post_ptr + t * N + s)  # [N]
    out = h_post[:, None] * f[None, :]  # [N, BC]
    for j in tl.static_range(N):  # out[i] += H_res[i, j] x[j], one input stream at a time
        x_j = tl.load(x_ptr + t * N * C + j * C + cols, mask=cmask, other=0.0).to(tl.float32)
        out += tl.load(h_res_ptr + t * N * N + s * N + j)[:, None] * x_j[None, :]
    offs = t * N * C + s[:, None] * C + cols[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=cmask[None, :])


@triton.jit
def _post_res_bwd_kernel(
    g_out_ptr, x_ptr, f_ptr, h_post_ptr, h_res_ptr,
    g_x_ptr, g_f_ptr, g_h_post_ptr, g_h_res_ptr, C,
    N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, N)
    h_post = tl.load(h_post_ptr + t * N + s)
    acc_post = tl.zeros([N], dtype=tl.float32)
    acc_res = tl.zeros([N, N], dtype=tl.float32)  # [i, j]
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        g = tl.load(g_out_ptr + t * N * C + s[:, None] * C + cols[None, :], mask=cmask[None, :], other=0.0)
        g = g.to(tl.float32)  # [N(i), BC]
        f = tl.load(f_ptr + t * C + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(g_f_ptr + t * C + cols, tl.sum(h_post[:, None] * g, axis=0).to(g_f_ptr.dtype.element_ty), mask=cmask)
        acc_post += tl.sum(g * f[None, :], axis=1)
        for j in tl.static_range(N):  # one stream of x (and of g_x) at a time
            h_col = tl.load(h_res_ptr + t * N * N + s * N + j)  # H_res[:, j]
            g_x_j = tl.sum(h_col[:, None] * g, axis=0)
            tl.store(g_x_ptr + t * N * C + j * C + cols, g_x_j.to(g_x_ptr.dtype.element_ty), mask=cmask)
            x_j = tl.load(x_ptr + t * N * C + j * C + cols, mask=cmask, other=0.0).to(tl.float32)
            acc_res += tl.where(s[None, :] == j, tl.sum(g * x_j[None, :], axis=1)[:, None], 0.0)
    tl.store(g_h_post_ptr + t * N + s, acc_post)
    tl.store(g_h_res_ptr + t * N * N + s[:, None] * N + s[None, :], acc_res)


def post_res_forward(x, f, h_post, h_res):
    """``x [T, n, C]``, ``f [T, C]``, ``h_post [T, n]``, ``h_res [T, n, n]`` (fp32)."""
    T, n, C = x.shape
    out = torch.empty_like(x)
    if T:
        bc = block_c(C)
        _post_res_fwd_kernel[(T, triton.cdiv(C, bc))](x, f, h_post, h_res, out, C, N=n, BLOCK_C=bc, num_warps=4)
    return out


def post_res_backward(g_out, x, f, h_post, h_res):
    T, n, C = x.shape
    g_x = torch.empty_like(x)
    g_f = torch.empty_like(f)
    g_h_post = torch.empty(T, n, dtype=torch.float32, device=x.device)
    g_h_res = torch.empty(T, n, n, dtype=torch.float32, device=x.device)
    if T:
        _post_res_bwd_kernel[(T,)](
            g_out, x, f, h_post, h_res, g_x, g_f, g_h_post, g_h_res, C,
            N=n, BLOCK_C=block_c(C, 512), num_warps=4,
        )
    return g_x, g_f, g_h_post, g_h_res


class PostResFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, h_post, h_res):
        ctx.save_for_backward(x, f, h_post, h_res)
        return post_res_forward(x, f, h_post, h_res)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out):
        x, f, h_post, h_res = ctx.saved_tensors
        return post_res_backward(g_out.contiguous(), x, f, h_post, h_res)


def mhc_post_res_triton(x, f, h_post, h_res):
    """Triton ``H_res · x + H_post^T · f`` for shapes already checked by the op."""
    n, C = x.shape[-2:]
    lead = x.shape[:-2]
    out = PostResFunction.apply(
        x.reshape(-1, n, C).contiguous(),
        f.reshape(-1, C).contiguous(),
        h_post.reshape(-1, n).float().contiguous(),
        h_res.reshape(-1, n, n).float().contiguous(),
    )
    return out.view(*lead, n, C)
