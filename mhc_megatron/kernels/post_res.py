"""Fused post + residual: ``out = H_res · x + H_post^T · dropout(f + bias)``, forward and backward.

Reference: :func:`mhc_megatron.ops.streams.mhc_post_res`. Per token the forward reads the n
streams and ``f`` ((n+1)C elements) and writes nC (the fused floor of docs/kernels.md, "Memory traffic"), accumulating
in fp32 and storing in the activation dtype. The optional bias and dropout are Megatron's
bias-dropout-add folded in: the bias is added and dropout applied to the sublayer output inside
the kernel, so neither costs a pass over memory. Dropout keeps an element with probability
``1 - p`` and scales it by ``1 / (1 - p)`` (``torch.nn.functional.dropout``'s semantics); the
random numbers come from Philox with a seed drawn from torch's generator of the device at each
call (so Megatron's RNG-tracker forks and activation checkpointing see it like any torch
dropout), and the backward regenerates the same mask from that seed.

The backward reads ``g_out``, ``x`` and ``f`` once and writes ``g_x`` and ``g_f``, with the
coefficient gradients ``g_H_post = g_out · f'`` and ``g_H_res = g_out · x^T`` (reductions over
C). Without a bias one program handles one token and sums those in registers. With a bias, one
program handles ``BIAS_BLOCK_T`` tokens, C-chunks outer and tokens inner, so that the bias
gradient is one row of partial sums per program (summed by ``_sum_rows``); the coefficient
gradients are then summed over the chunks in their output (a few floats per token re-read from
cache: n + n^2 floats per chunk after the first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotune, fit_block_c

BIAS_BLOCK_T = 32  # tokens per backward program with a bias: C / 32 partial floats per token

_FWD_CONFIGS = [triton.Config({"BLOCK_C": bc}, num_warps=w) for bc, w in ((1024, 4), (512, 4), (2048, 8))]
_BWD_CONFIGS = [triton.Config({"BLOCK_C": bc}, num_warps=w) for bc, w in ((512, 4), (256, 4), (1024, 8))]


def _prune(configs, args):
    return fit_block_c(configs, args["C"])


def _prune_bwd(configs, args):
    """As ``_prune``; with a bias the token loop's [n, BLOCK_C] tiles spill past 512 elements
    per warp at n = 8 (compile_check, sm_80)."""
    if args["HAS_BIAS"]:
        configs = [c for c in configs if args["N"] * c.kwargs["BLOCK_C"] <= 512 * c.num_warps] or configs[-1:]
    return fit_block_c(configs, args["C"])


@triton.jit
def _bias_dropout(f_ptr, bias_ptr, seed_ptr, t, cols, cmask, C, p, scale,
                  HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr):
    """``(f', keep)``: the sublayer output after bias and dropout, and the dropout mask."""
    f = tl.load(f_ptr + t * C + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        f += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    keep = cmask
    if DROPOUT:
        keep = tl.rand(tl.load(seed_ptr), t * C + cols) >= p
        f = tl.where(keep, f * scale, 0.0)
    return f, keep


@autotune(_FWD_CONFIGS, key=["C", "N", "HAS_BIAS", "DROPOUT"], prune=_prune)
@triton.jit
def _post_res_fwd_kernel(
    x_ptr, f_ptr, bias_ptr, seed_ptr, h_post_ptr, h_res_ptr, out_ptr, C, p, scale,
    N: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    s = tl.arange(0, N)
    f, _ = _bias_dropout(f_ptr, bias_ptr, seed_ptr, t, cols, cmask, C, p, scale, HAS_BIAS, DROPOUT)
    h_post = tl.load(h_post_ptr + t * N + s)  # [N]
    out = h_post[:, None] * f[None, :]  # [N, BC]
    for j in tl.static_range(N):  # out[i] += H_res[i, j] x[j], one input stream at a time
        x_j = tl.load(x_ptr + t * N * C + j * C + cols, mask=cmask, other=0.0).to(tl.float32)
        out += tl.load(h_res_ptr + t * N * N + s * N + j)[:, None] * x_j[None, :]
    offs = t * N * C + s[:, None] * C + cols[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=cmask[None, :])


@triton.jit
def _bwd_tile(g_out_ptr, x_ptr, f_ptr, bias_ptr, seed_ptr, h_post_ptr, h_res_ptr, g_x_ptr, g_f_ptr, t, cols, cmask,
              C, p, scale, N: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr):
    """One token, one C-chunk: stores ``g_x`` and ``g_f``; returns ``g_f`` and this chunk's
    parts of ``g_H_post`` [N] and ``g_H_res`` [N, N]."""
    s = tl.arange(0, N)
    g = tl.load(g_out_ptr + t * N * C + s[:, None] * C + cols[None, :], mask=cmask[None, :], other=0.0)
    g = g.to(tl.float32)  # [N(i), BC]
    f, keep = _bias_dropout(f_ptr, bias_ptr, seed_ptr, t, cols, cmask, C, p, scale, HAS_BIAS, DROPOUT)
    g_f = tl.sum(tl.load(h_post_ptr + t * N + s)[:, None] * g, axis=0)  # w.r.t. f'
    if DROPOUT:
        g_f = tl.where(keep, g_f * scale, 0.0)
    tl.store(g_f_ptr + t * C + cols, g_f.to(g_f_ptr.dtype.element_ty), mask=cmask)
    post = tl.sum(g * f[None, :], axis=1)
    res = tl.zeros([N, N], dtype=tl.float32)  # [i, j]
    for j in tl.static_range(N):  # one stream of x (and of g_x) at a time
        h_col = tl.load(h_res_ptr + t * N * N + s * N + j)  # H_res[:, j]
        g_x_j = tl.sum(h_col[:, None] * g, axis=0)
        tl.store(g_x_ptr + t * N * C + j * C + cols, g_x_j.to(g_x_ptr.dtype.element_ty), mask=cmask)
        x_j = tl.load(x_ptr + t * N * C + j * C + cols, mask=cmask, other=0.0).to(tl.float32)
        res += tl.where(s[None, :] == j, tl.sum(g * x_j[None, :], axis=1)[:, None], 0.0)
    return g_f, post, res


@autotune(_BWD_CONFIGS, key=["C", "N", "HAS_BIAS", "DROPOUT"], prune=_prune_bwd)
@triton.jit
def _post_res_bwd_kernel(
    g_out_ptr, x_ptr, f_ptr, bias_ptr, seed_ptr, h_post_ptr, h_res_ptr,
    g_x_ptr, g_f_ptr, g_h_post_ptr, g_h_res_ptr, g_bias_ptr, T, C, p, scale,
    N: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.arange(0, N)
    mat = s[:, None] * N + s[None, :]
    if HAS_BIAS:
        # BLOCK_T tokens, C-chunks outer: the chunk's bias-gradient sum over the tokens stays in
        # registers; the coefficient gradients are summed over the chunks in their output
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            acc_bias = tl.zeros([BLOCK_C], dtype=tl.float32)
            for r in range(BLOCK_T):
                t = pid.to(tl.int64) * BLOCK_T + r
                if t < T:
                    g_f, post, res = _bwd_tile(g_out_ptr, x_ptr, f_ptr, bias_ptr, seed_ptr, h_post_ptr, h_res_ptr,
                                               g_x_ptr, g_f_ptr, t, cols, cmask, C, p, scale, N, HAS_BIAS, DROPOUT)
                    acc_bias += tl.where(cmask, g_f, 0.0)
                    later = c0 > 0
                    post += tl.load(g_h_post_ptr + t * N + s, mask=(s < N) & later, other=0.0)
                    res += tl.load(g_h_res_ptr + t * N * N + mat, mask=(mat < N * N) & later, other=0.0)
                    tl.store(g_h_post_ptr + t * N + s, post)
                    tl.store(g_h_res_ptr + t * N * N + mat, res)
            tl.store(g_bias_ptr + pid.to(tl.int64) * C + cols, acc_bias, mask=cmask)
    else:
        # one token, the coefficient gradients summed over the C-chunks in registers
        t = pid.to(tl.int64)
        acc_post = tl.zeros([N], dtype=tl.float32)
        acc_res = tl.zeros([N, N], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            _, post, res = _bwd_tile(g_out_ptr, x_ptr, f_ptr, bias_ptr, seed_ptr, h_post_ptr, h_res_ptr,
                                     g_x_ptr, g_f_ptr, t, cols, cmask, C, p, scale, N, HAS_BIAS, DROPOUT)
            acc_post += post
            acc_res += res
        tl.store(g_h_post_ptr + t * N + s, acc_post)
        tl.store(g_h_res_ptr + t * N * N + mat, acc_res)


@triton.jit
def _sum_rows_kernel(parts_ptr, out_ptr, P, W, BLOCK: tl.constexpr):
    """``out[w] = sum_p parts[p, w]`` in fp32, stored in the dtype of ``out``."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < W
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in range(P):
        acc += tl.load(parts_ptr + r * W + cols, mask=mask, other=0.0)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_rows(parts: torch.Tensor, dtype) -> torch.Tensor:
    P, W = parts.shape
    out = torch.empty(W, dtype=dtype, device=parts.device)
    _sum_rows_kernel[(triton.cdiv(W, 1024),)](parts, out, P, W, BLOCK=1024)
    return out


def draw_seed(device) -> torch.Tensor:
    """A dropout seed from torch's generator of ``device`` (one int64 on the device, no sync)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def post_res_forward(x, f, h_post, h_res, bias=None, seed=None, p: float = 0.0):
    """``x [T, n, C]``, ``f [T, C]``, ``h_post [T, n]``, ``h_res [T, n, n]`` (fp32); ``bias [C]``
    or None; ``seed`` (from :func:`draw_seed`) switches dropout with probability ``p`` on."""
    T, n, C = x.shape
    out = torch.empty_like(x)
    if T:
        dropout = seed is not None
        _post_res_fwd_kernel[lambda meta: (T, triton.cdiv(C, meta["BLOCK_C"]))](
            x, f, f if bias is None else bias, seed if dropout else f, h_post, h_res, out, C,  # (f: never read)
            p, 1.0 / (1.0 - p), N=n, HAS_BIAS=bias is not None, DROPOUT=dropout,
        )
    return out


def post_res_backward(g_out, x, f, h_post, h_res, bias=None, seed=None, p: float = 0.0):
    """``(g_x, g_f, g_h_post, g_h_res, g_bias)`` (``g_bias`` None without a bias)."""
    T, n, C = x.shape
    dev = x.device
    g_x = torch.empty_like(x)
    g_f = torch.empty_like(f)
    g_h_post = torch.empty(T, n, dtype=torch.float32, device=dev)
    g_h_res = torch.empty(T, n, n, dtype=torch.float32, device=dev)
    has_bias = bias is not None
    bt = BIAS_BLOCK_T if has_bias else 1
    programs = triton.cdiv(T, bt)
    parts = torch.empty(programs, C, dtype=torch.float32, device=dev) if has_bias else g_h_post
    if T:
        dropout = seed is not None
        _post_res_bwd_kernel[(programs,)](
            g_out, x, f, bias if has_bias else f, seed if dropout else f, h_post, h_res,
            g_x, g_f, g_h_post, g_h_res, parts, T, C, p, 1.0 / (1.0 - p),
            N=n, HAS_BIAS=has_bias, DROPOUT=dropout, BLOCK_T=bt,
        )
    g_bias = None
    if has_bias:
        g_bias = sum_rows(parts, bias.dtype) if T else torch.zeros_like(bias)
    return g_x, g_f, g_h_post, g_h_res, g_bias


class PostResFunction(torch.autograd.Function):
    """``H_res · x + H_post^T · dropout(f + bias)``; with a ``link`` (:mod:`.sublayer`) the
    gradient of ``x`` goes into the link's buffer instead of to autograd, and under recompute
    ``x`` is fetched from the link in backward instead of being kept."""

    @staticmethod
    def forward(ctx, x, f, h_post, h_res, bias, seed, p, link):
        # x may be a broadcast view (the model's first sublayer under recompute keeps the C-wide
        # embedding, not n copies): kept as it is, made contiguous where a kernel reads it
        out = post_res_forward(x.contiguous(), f, h_post, h_res, bias, seed, p)
        keep_x = link is None or link.keeps_x
        ctx.save_for_backward(x if keep_x else None, f, h_post, h_res, bias, seed)
        ctx.p, ctx.link, ctx.x_shape = p, link, x.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out):
        x, f, h_post, h_res, bias, seed = ctx.saved_tensors
        link = ctx.link
        if x is None:
            x = link.stream_input().reshape(ctx.x_shape)
        g_x, g_f, g_h_post, g_h_res, g_bias = post_res_backward(g_out.contiguous(), x.contiguous(), f, h_post, h_res, bias,
                                                                seed, ctx.p)
        if link is not None:
            link.start_grad(g_x)
            g_x = None
        return g_x, g_f, g_h_post, g_h_res, g_bias, None, None, None


def mhc_post_res_triton(x, f, h_post, h_res, bias=None, p: float = 0.0, link=None):
    """Triton ``H_res · x + H_post^T · dropout(f + bias)`` for shapes already checked by the op
    (``p > 0`` means training dropout). Returns ``(out, replay)``: ``replay(x)`` recomputes ``out``
    from another copy of ``x`` with the same dropout mask, without autograd (mHC recompute)."""
    n, C = x.shape[-2:]
    lead = x.shape[:-2]
    seed = draw_seed(x.device) if p > 0 else None
    f2 = f.reshape(-1, C).contiguous()
    hp = h_post.reshape(-1, n).float().contiguous()
    hr = h_res.reshape(-1, n, n).float().contiguous()
    b = None if bias is None else bias.contiguous()
    out = PostResFunction.apply(x.reshape(-1, n, C), f2, hp, hr, b, seed, p, link)

    def replay(x_again):
        return post_res_forward(x_again.reshape(-1, n, C).contiguous(), f2.detach(), hp.detach(), hr.detach(),
                                None if b is None else b.detach(), seed, p).view(*lead, n, C)

    return out.view(*lead, n, C), replay
