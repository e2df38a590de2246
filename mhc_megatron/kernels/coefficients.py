"""mHC coefficients: one pass over the n-stream input, then the finishing step; and backward.

Reference: :func:`mhc_megatron.ops.coefficients.mhc_coefficients` (the efficient order of the
spec: ``proj = v @ phi`` and ``sum(v^2)`` in the same pass, the norm applied to the ``m =
n^2 + 2n`` outputs).

Forward, two kernels:

* ``_proj_fwd``: the only pass over ``v = vec(x)`` (nC elements per token, read once): for a
  block of tokens, ``proj += v_chunk @ phi_chunk`` on the matrix units (fp32/tf32 ``phi``,
  fp32 accumulation; ``v`` is converted from bf16/fp16) and ``sumsq += sum(v_chunk^2)``.
  Writes ``m + 1`` floats per token.
* ``_finish_fwd``: per token from those ``m + 1`` floats: gates, biases, sigmoid, 2 sigmoid and
  Sinkhorn with all iterations in registers. Keeping the two apart costs ``2(m + 1)`` floats of
  traffic per token (0.6% of the pass over ``v`` at n = 4, C = 4096) and keeps the matmul
  kernel's tile shape free of the Sinkhorn's ``[tokens, n, n]`` layout.

Backward, two kernels:

* ``_finish_bwd``: the gradient of the logits (sigmoid derivatives, Sinkhorn backward with the
  iterations recomputed on chip). The chain to ``proj``, ``1/r``, the gates and biases is a
  handful of ``[T, m]`` PyTorch ops in :class:`MHCCoefficientsFunction`.
* ``_proj_bwd``: both matmuls in one pass over ``v``: ``g_v = g_proj @ phi^T + c * v`` (the
  second term is the RMS norm's) written once, and ``g_phi = v^T @ g_proj`` accumulated per
  ``(K-chunk, token split)`` program and summed over the splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, next_pow2
from .sinkhorn import sinkhorn_grad, sinkhorn_state


@triton.jit
def _proj_fwd_kernel(
    v_ptr, phi_ptr, proj_ptr, sumsq_ptr, T, K, M,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, MP: tl.constexpr, PRECISION: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < T
    cols = tl.arange(0, MP)
    acc = tl.zeros([BLOCK_T, MP], dtype=tl.float32)
    sq = tl.zeros([BLOCK_T], dtype=tl.float32)
    row = tok.to(tl.int64) * K
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        v = tl.load(v_ptr + row[:, None] + ks[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        phi = tl.load(phi_ptr + ks[:, None] * M + cols[None, :], mask=kmask[:, None] & (cols < M)[None, :], other=0.0)
        acc = tl.dot(v, phi, acc, input_precision=PRECISION)
        sq += tl.sum(v * v, axis=1)
    tl.store(proj_ptr + tok.to(tl.int64)[:, None] * M + cols[None, :], acc, mask=tmask[:, None] & (cols < M)[None, :])
    tl.store(sumsq_ptr + tok, sq, mask=tmask)


@triton.jit
def _load_logits(proj_ptr, sumsq_ptr, bias_ptr, alpha_ptr, tok, tmask, M, inv_K, eps, N: tl.constexpr):
    """Gate and bias the projections of a block of tokens: pre [T, N], post [T, N], res [T, N, N]."""
    s = tl.arange(0, N)
    base = tok.to(tl.int64) * M
    inv_r = tl.rsqrt(tl.load(sumsq_ptr + tok, mask=tmask, other=0.0) * inv_K + eps)
    a_pre = tl.load(alpha_ptr)
    a_post = tl.load(alpha_ptr + 1)
    a_res = tl.load(alpha_ptr + 2)
    m2 = tmask[:, None]
    pre = tl.load(proj_ptr + base[:, None] + s[None, :], mask=m2, other=0.0)
    post = tl.load(proj_ptr + base[:, None] + N + s[None, :], mask=m2, other=0.0)
    res_offs = 2 * N + s[:, None] * N + s[None, :]
    res = tl.load(proj_ptr + base[:, None, None] + res_offs[None, :, :], mask=tmask[:, None, None], other=0.0)
    pre = pre * (inv_r * a_pre)[:, None] + tl.load(bias_ptr + s)[None, :]
    post = post * (inv_r * a_post)[:, None] + tl.load(bias_ptr + N + s)[None, :]
    res = res * (inv_r * a_res)[:, None, None] + tl.load(bias_ptr + res_offs)[None, :, :]
    return pre, post, res


@triton.jit
def _finish_fwd_kernel(
    proj_ptr, sumsq_ptr, bias_ptr, alpha_ptr, h_pre_ptr, h_post_ptr, h_res_ptr,
    T, M, inv_K, eps, iters, N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < T
    pre, post, res = _load_logits(proj_ptr, sumsq_ptr, bias_ptr, alpha_ptr, tok, tmask, M, inv_K, eps, N)
    s = tl.arange(0, N)
    t64 = tok.to(tl.int64)
    tl.store(h_pre_ptr + t64[:, None] * N + s[None, :], tl.sigmoid(pre), mask=tmask[:, None])
    tl.store(h_post_ptr + t64[:, None] * N + s[None, :], 2.0 * tl.sigmoid(post), mask=tmask[:, None])
    res_offs = t64[:, None, None] * N * N + s[None, :, None] * N + s[None, None, :]
    tl.store(h_res_ptr + res_offs, sinkhorn_state(res, 2 * iters - 1), mask=tmask[:, None, None])


@triton.jit
def _finish_bwd_kernel(
    proj_ptr, sumsq_ptr, bias_ptr, alpha_ptr, g_pre_ptr, g_post_ptr, g_res_ptr, g_logits_ptr,
    T, M, inv_K, eps, iters, N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < T
    pre, post, res = _load_logits(proj_ptr, sumsq_ptr, bias_ptr, alpha_ptr, tok, tmask, M, inv_K, eps, N)
    s = tl.arange(0, N)
    t64 = tok.to(tl.int64)
    vec = t64[:, None] * N + s[None, :]
    mat = t64[:, None, None] * N * N + s[None, :, None] * N + s[None, None, :]
    sig_pre = tl.sigmoid(pre)
    sig_post = tl.sigmoid(post)
    g_pre = tl.load(g_pre_ptr + vec, mask=tmask[:, None], other=0.0) * sig_pre * (1.0 - sig_pre)
    g_post = tl.load(g_post_ptr + vec, mask=tmask[:, None], other=0.0) * 2.0 * sig_post * (1.0 - sig_post)
    g_res = sinkhorn_grad(res, tl.load(g_res_ptr + mat, mask=tmask[:, None, None], other=0.0), iters)
    out = t64[:, None] * M
    tl.store(g_logits_ptr + out + s[None, :], g_pre, mask=tmask[:, None])
    tl.store(g_logits_ptr + out + N + s[None, :], g_post, mask=tmask[:, None])
    res_cols = 2 * N + s[:, None] * N + s[None, :]
    tl.store(g_logits_ptr + t64[:, None, None] * M + res_cols[None, :, :], g_res, mask=tmask[:, None, None])


@triton.jit
def _proj_bwd_kernel(
    v_ptr, phi_ptr, g_proj_ptr, c_ptr, g_v_ptr, g_phi_ptr, T, K, M, tokens_per_split,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, MP: tl.constexpr, PRECISION: tl.constexpr,
):
    kc = tl.program_id(0)
    split = tl.program_id(1)
    ks = kc * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    cols = tl.arange(0, MP)
    cmask = cols < M
    phi = tl.load(phi_ptr + ks[:, None] * M + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
    acc = tl.zeros([BLOCK_K, MP], dtype=tl.float32)
    t_start = split * tokens_per_split
    for t0 in range(t_start, t_start + tokens_per_split, BLOCK_T):
        tok = t0 + tl.arange(0, BLOCK_T)
        tmask = tok < T
        row = tok.to(tl.int64) * K
        vmask = tmask[:, None] & kmask[None, :]
        v = tl.load(v_ptr + row[:, None] + ks[None, :], mask=vmask, other=0.0).to(tl.float32)
        gp = tl.load(g_proj_ptr + tok.to(tl.int64)[:, None] * M + cols[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
        c = tl.load(c_ptr + tok, mask=tmask, other=0.0)
        g_v = tl.dot(gp, tl.trans(phi), input_precision=PRECISION) + c[:, None] * v
        tl.store(g_v_ptr + row[:, None] + ks[None, :], g_v.to(g_v_ptr.dtype.element_ty), mask=vmask)
        acc = tl.dot(tl.trans(v), gp, acc, input_precision=PRECISION)
    tl.store(g_phi_ptr + split.to(tl.int64) * K * M + ks[:, None] * M + cols[None, :], acc, mask=kmask[:, None] & cmask[None, :])


BLOCK_T_PROJ = 32


def proj_config(mp: int) -> tuple[int, int]:
    """(BLOCK_K, num_warps) of the projection kernels: the [BLOCK_K, MP] phi tile and, in
    backward, the [BLOCK_K, MP] g_phi accumulator live in registers (checked for spills by
    ``compile_check``)."""
    return (64, 4) if mp <= 32 else (64, 8) if mp <= 64 else (32, 8)


def finish_block_t(n: int) -> int:
    """Tokens per program of the finishing kernels ([BLOCK_T, n, n] Sinkhorn state)."""
    return 32 if n <= 4 else 16


def _precision() -> str:
    # tf32 on the matrix units (the spec's "phi in fp32/tf32"); the interpreter computes exactly
    return "ieee" if interpreting() else "tf32"


def _mp(m: int) -> int:
    return max(16, next_pow2(m))  # tl.dot needs every dimension >= 16


def coefficients_forward(v, phi, bias, alpha, n: int, iters: int, eps: float):
    """``v [T, nC]`` -> ``(h_pre [T, n], h_post [T, n], h_res [T, n, n], proj [T, m], sumsq [T])``."""
    T, K = v.shape
    M = phi.shape[1]
    dev = v.device
    proj = torch.empty(T, M, dtype=torch.float32, device=dev)
    sumsq = torch.empty(T, dtype=torch.float32, device=dev)
    h_pre = torch.empty(T, n, dtype=torch.float32, device=dev)
    h_post = torch.empty(T, n, dtype=torch.float32, device=dev)
    h_res = torch.empty(T, n, n, dtype=torch.float32, device=dev)
    if T:
        mp = _mp(M)
        block_k, warps = proj_config(mp)
        _proj_fwd_kernel[(triton.cdiv(T, BLOCK_T_PROJ),)](
            v, phi, proj, sumsq, T, K, M,
            BLOCK_T=BLOCK_T_PROJ, BLOCK_K=block_k, MP=mp, PRECISION=_precision(), num_warps=warps,
        )
        bt = finish_block_t(n)
        _finish_fwd_kernel[(triton.cdiv(T, bt),)](
            proj, sumsq, bias, alpha, h_pre, h_post, h_res, T, M, 1.0 / K, eps, iters,
            N=n, BLOCK_T=bt, num_warps=4,
        )
    return h_pre, h_post, h_res, proj, sumsq


def _token_splits(T: int, K: int, block_k: int, device) -> int:
    """Split the tokens so that (K-chunks x splits) programs fill the device about twice."""
    chunks = triton.cdiv(K, block_k)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(2 * sms, chunks), triton.cdiv(T, BLOCK_T_PROJ)))


def coefficients_backward(v, phi, bias, alpha, proj, sumsq, g_pre, g_post, g_res, n: int, iters: int, eps: float):
    T, K = v.shape
    M = phi.shape[1]
    dev = v.device
    g_logits = torch.empty(T, M, dtype=torch.float32, device=dev)
    if T:
        bt = finish_block_t(n)
        _finish_bwd_kernel[(triton.cdiv(T, bt),)](
            proj, sumsq, bias, alpha, g_pre, g_post, g_res, g_logits, T, M, 1.0 / K, eps, iters,
            N=n, BLOCK_T=bt, num_warps=4,
        )
    # logits = proj * inv_r * gate + bias: the small [T, m] part of the chain rule
    inv_r = torch.rsqrt(sumsq / K + eps)
    gate = torch.cat([alpha[0:1].expand(n), alpha[1:2].expand(n), alpha[2:3].expand(n * n)])
    g_proj = g_logits * inv_r[:, None] * gate
    g_inv_r = (g_logits * proj * gate).sum(-1)
    c = (-g_inv_r * inv_r.pow(3) / K).contiguous()  # d inv_r / d v = -inv_r^3 v / K
    per_gate = (g_logits * proj * inv_r[:, None]).sum(0)
    g_alpha = torch.stack([per_gate[:n].sum(), per_gate[n : 2 * n].sum(), per_gate[2 * n :].sum()])
    g_bias = g_logits.sum(0)

    g_v = torch.empty_like(v)
    mp = _mp(M)
    block_k, warps = proj_config(mp)
    splits = _token_splits(T, K, block_k, dev) if T else 1
    per_split = triton.cdiv(triton.cdiv(max(T, 1), splits), BLOCK_T_PROJ) * BLOCK_T_PROJ
    splits = triton.cdiv(max(T, 1), per_split)
    g_phi_parts = torch.zeros(splits, K, M, dtype=torch.float32, device=dev)
    if T:
        _proj_bwd_kernel[(triton.cdiv(K, block_k), splits)](
            v, phi, g_proj.contiguous(), c, g_v, g_phi_parts, T, K, M, per_split,
            BLOCK_T=BLOCK_T_PROJ, BLOCK_K=block_k, MP=mp, PRECISION=_precision(), num_warps=warps,
        )
    return g_v, g_phi_parts.sum(0), g_bias, g_alpha


class MHCCoefficientsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, phi, bias, alpha, n, iters, eps):
        h_pre, h_post, h_res, proj, sumsq = coefficients_forward(v, phi, bias, alpha, n, iters, eps)
        ctx.save_for_backward(v, phi, bias, alpha, proj, sumsq)
        ctx.n, ctx.iters, ctx.eps = n, iters, eps
        return h_pre, h_post, h_res

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_pre, g_post, g_res):
        v, phi, bias, alpha, proj, sumsq = ctx.saved_tensors
        T = v.shape[0]
        n = ctx.n

        def grad_or_zeros(g, shape):
            return torch.zeros(shape, dtype=torch.float32, device=v.device) if g is None else g.float().contiguous()

        g_v, g_phi, g_bias, g_alpha = coefficients_backward(
            v, phi, bias, alpha, proj, sumsq,
            grad_or_zeros(g_pre, (T, n)), grad_or_zeros(g_post, (T, n)), grad_or_zeros(g_res, (T, n, n)),
            n, ctx.iters, ctx.eps,
        )
        return g_v, g_phi, g_bias, g_alpha, None, None, None


def mhc_coefficients_triton(x, phi, bias, alpha, iters: int, eps: float):
    """Triton ``mhc_coefficients`` for inputs already checked by the op."""
    n, C = x.shape[-2:]
    lead = x.shape[:-2]
    h_pre, h_post, h_res = MHCCoefficientsFunction.apply(
        x.reshape(-1, n * C).contiguous(),
        phi.float().contiguous(),
        bias.float().contiguous(),
        alpha.float().contiguous(),
        n,
        iters,
        eps,
    )
    return h_pre.view(*lead, n), h_post.view(*lead, n), h_res.view(*lead, n, n)
