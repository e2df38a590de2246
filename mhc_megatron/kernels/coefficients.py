"""mHC coefficients: one pass over the n-stream input, then the finishing step; and backward.

Reference: :func:`mhc_megatron.ops.coefficients.mhc_coefficients` (the efficient order of the
spec: ``proj = v @ phi`` and ``sum(v^2)`` in the same pass, the norm applied to the ``m =
n^2 + 2n`` outputs).

Forward, two kernels:

* ``_proj_fwd``: the only pass over ``v = vec(x)`` (nC elements per token, read once): for a
  block of tokens, ``proj += v_chunk @ phi_chunk`` on the matrix units (fp32 ``phi`` as tf32 on
  a GPU, exact fp32 in the interpreter; fp32 accumulation; ``v`` converted from bf16/fp16) and
  ``sumsq += sum(v_chunk^2)``. Writes ``m + 1`` floats per token.
* ``_finish_fwd``: per token from those ``m + 1`` floats: gates, biases, sigmoid, 2 sigmoid and
  Sinkhorn with all iterations in registers.

Backward, two kernels and at most one reduction:

* ``_finish_bwd``: the whole small chain rule per token, in registers: sigmoid derivatives, the
  Sinkhorn backward (O(t_max), :mod:`.sinkhorn`), then through ``logits = proj * inv_r * gate +
  bias`` to ``g_proj`` (what the projection backward needs) and ``c``, the RMS norm's
  coefficient of ``v`` in ``g_v``; the gradients of ``bias`` and the three gates are summed over
  the program's tokens into one row of partial sums.
* ``_proj_bwd``: both matmuls in one pass over ``v``: ``g_v = g_proj @ phi^T + c * v`` (added to
  the ``g_x`` buffer when accumulating, see :mod:`.sublayer`) and ``g_phi = v^T @ g_proj`` per
  ``(K-chunk, token split)`` program; the programs of the first K-chunk also sum the finishing
  kernel's partial rows of their split. All parameter gradients then sit in one
  ``[splits, nC*m + m + 3]`` buffer: with one split it *is* the result, with more one sum over
  the splits finishes every parameter gradient at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotune, interpreting, next_pow2, sm_count
from .sinkhorn import sinkhorn_backward, sinkhorn_forward

BLOCK_T_PROJ = 32  # tokens per step of the projection backward (a token split is a multiple of it)


def _proj_configs():
    shapes = ((32, 64, 4, 3), (32, 32, 8, 3), (32, 128, 8, 3), (64, 64, 8, 3))
    return [triton.Config({"BLOCK_T": bt, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bt, bk, w, s in shapes]


def _proj_bwd_configs():
    shapes = ((64, 4, 3), (32, 8, 3), (128, 8, 3), (64, 8, 4))
    return [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s) for bk, w, s in shapes]


# registers per thread a config may spend on its tiles (the phi tile, the accumulator, the v and
# g_proj tiles); larger ones spill (compile_check compiles every config that survives)
_TILE_REGISTERS = 112


def _prune_proj(configs, args):
    """Drop tiles wider than the problem and tiles too large for the registers."""
    mp, K = args["MP"], args["K"]
    keep = []
    for c in configs:
        bt, bk, w = c.kwargs.get("BLOCK_T", BLOCK_T_PROJ), c.kwargs["BLOCK_K"], c.num_warps
        if bk > max(16, next_pow2(K)):
            continue
        if bt * mp + 2 * bk * mp + bt * bk > _TILE_REGISTERS * 32 * w:
            continue
        keep.append(c)
    return keep or configs[:1]


def _prune_none(configs, args):
    return configs


@autotune(_proj_configs(), key=["K", "M", "MP"], prune=_prune_proj)
@triton.jit
def _proj_fwd_kernel(
    v_ptr, phi_ptr, proj_ptr, sumsq_ptr, T, K, M,
    MP: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
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
def _load_projections(proj_ptr, sumsq_ptr, tok, tmask, M, inv_K, eps, N: tl.constexpr):
    """The raw projections of a block of tokens, pre [T, N], post [T, N], res [T, N, N], and 1/r."""
    s = tl.arange(0, N)
    base = tok.to(tl.int64) * M
    inv_r = tl.rsqrt(tl.load(sumsq_ptr + tok, mask=tmask, other=0.0) * inv_K + eps)
    m2 = tmask[:, None]
    pre = tl.load(proj_ptr + base[:, None] + s[None, :], mask=m2, other=0.0)
    post = tl.load(proj_ptr + base[:, None] + N + s[None, :], mask=m2, other=0.0)
    res_offs = 2 * N + s[:, None] * N + s[None, :]
    res = tl.load(proj_ptr + base[:, None, None] + res_offs[None, :, :], mask=tmask[:, None, None], other=0.0)
    return pre, post, res, inv_r


@triton.jit
def _logits(pre, post, res, inv_r, bias_ptr, alpha_ptr, N: tl.constexpr):
    s = tl.arange(0, N)
    res_offs = 2 * N + s[:, None] * N + s[None, :]
    pre = pre * (inv_r * tl.load(alpha_ptr))[:, None] + tl.load(bias_ptr + s)[None, :]
    post = post * (inv_r * tl.load(alpha_ptr + 1))[:, None] + tl.load(bias_ptr + N + s)[None, :]
    res = res * (inv_r * tl.load(alpha_ptr + 2))[:, None, None] + tl.load(bias_ptr + res_offs)[None, :, :]
    return pre, post, res


@autotune([triton.Config({}, num_warps=w) for w in (4, 8)], key=["M", "N", "ITERS"], prune=_prune_none)
@triton.jit
def _finish_fwd_kernel(
    proj_ptr, sumsq_ptr, bias_ptr, alpha_ptr, h_pre_ptr, h_post_ptr, h_res_ptr,
    T, M, inv_K, eps, ITERS: tl.constexpr, N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < T
    pre, post, res, inv_r = _load_projections(proj_ptr, sumsq_ptr, tok, tmask, M, inv_K, eps, N)
    pre, post, res = _logits(pre, post, res, inv_r, bias_ptr, alpha_ptr, N)
    s = tl.arange(0, N)
    t64 = tok.to(tl.int64)
    tl.store(h_pre_ptr + t64[:, None] * N + s[None, :], tl.sigmoid(pre), mask=tmask[:, None])
    tl.store(h_post_ptr + t64[:, None] * N + s[None, :], 2.0 * tl.sigmoid(post), mask=tmask[:, None])
    res_offs = t64[:, None, None] * N * N + s[None, :, None] * N + s[None, None, :]
    tl.store(h_res_ptr + res_offs, sinkhorn_forward(res, ITERS), mask=tmask[:, None, None])


@autotune([triton.Config({}, num_warps=w) for w in (4, 8)], key=["M", "N", "ITERS"], prune=_prune_none)
@triton.jit
def _finish_bwd_kernel(
    proj_ptr, sumsq_ptr, bias_ptr, alpha_ptr, g_pre_ptr, g_post_ptr, g_res_ptr, g_proj_ptr, c_ptr, partial_ptr,
    T, M, inv_K, eps, ITERS: tl.constexpr, N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    tok = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < T
    raw_pre, raw_post, raw_res, inv_r = _load_projections(proj_ptr, sumsq_ptr, tok, tmask, M, inv_K, eps, N)
    pre, post, res = _logits(raw_pre, raw_post, raw_res, inv_r, bias_ptr, alpha_ptr, N)
    s = tl.arange(0, N)
    t64 = tok.to(tl.int64)
    vec = t64[:, None] * N + s[None, :]
    mat = t64[:, None, None] * N * N + s[None, :, None] * N + s[None, None, :]
    sig_pre = tl.sigmoid(pre)
    sig_post = tl.sigmoid(post)
    # gradients of the logits (zero for masked tokens: their incoming gradients load as 0)
    gl_pre = tl.load(g_pre_ptr + vec, mask=tmask[:, None], other=0.0) * sig_pre * (1.0 - sig_pre)
    gl_post = tl.load(g_post_ptr + vec, mask=tmask[:, None], other=0.0) * 2.0 * sig_post * (1.0 - sig_post)
    gl_res = sinkhorn_backward(res, tl.load(g_res_ptr + mat, mask=tmask[:, None, None], other=0.0), ITERS)
    # logits = proj * inv_r * gate + bias
    a_pre = tl.load(alpha_ptr)
    a_post = tl.load(alpha_ptr + 1)
    a_res = tl.load(alpha_ptr + 2)
    out = t64[:, None] * M
    tl.store(g_proj_ptr + out + s[None, :], gl_pre * (inv_r * a_pre)[:, None], mask=tmask[:, None])
    tl.store(g_proj_ptr + out + N + s[None, :], gl_post * (inv_r * a_post)[:, None], mask=tmask[:, None])
    res_cols = 2 * N + s[:, None] * N + s[None, :]
    tl.store(g_proj_ptr + t64[:, None, None] * M + res_cols[None, :, :], gl_res * (inv_r * a_res)[:, None, None],
             mask=tmask[:, None, None])
    # per gate: sum of g_logit * proj (the derivative of the logits w.r.t. gate * inv_r)
    d_pre = tl.sum(gl_pre * raw_pre, axis=1)
    d_post = tl.sum(gl_post * raw_post, axis=1)
    d_res = tl.sum(tl.sum(gl_res * raw_res, axis=2), axis=1)
    g_inv_r = a_pre * d_pre + a_post * d_post + a_res * d_res
    tl.store(c_ptr + tok, -g_inv_r * inv_r * inv_r * inv_r * inv_K, mask=tmask)  # d inv_r / d v = -inv_r^3 v / K
    # this program's partial sums: g_bias (m values) then the three gate gradients
    row = partial_ptr + pid.to(tl.int64) * (M + 3)
    tl.store(row + s, tl.sum(gl_pre, axis=0))
    tl.store(row + N + s, tl.sum(gl_post, axis=0))
    tl.store(row + res_cols, tl.sum(gl_res, axis=0))
    tl.store(row + M, tl.sum(d_pre * inv_r, axis=0))
    tl.store(row + M + 1, tl.sum(d_post * inv_r, axis=0))
    tl.store(row + M + 2, tl.sum(d_res * inv_r, axis=0))


@autotune(_proj_bwd_configs(), key=["K", "M", "MP", "ACCUMULATE"], prune=_prune_proj, restore_value=["g_v_ptr"])
@triton.jit
def _proj_bwd_kernel(
    v_ptr, phi_ptr, g_proj_ptr, c_ptr, g_v_ptr, fin_ptr, parts_ptr, T, K, M, tokens_per_split, part_stride, fin_rows,
    MP: tl.constexpr, PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr, FIN_BLOCK_T: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
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
        if ACCUMULATE:
            g_v += tl.load(g_v_ptr + row[:, None] + ks[None, :], mask=vmask, other=0.0).to(tl.float32)
        tl.store(g_v_ptr + row[:, None] + ks[None, :], g_v.to(g_v_ptr.dtype.element_ty), mask=vmask)
        acc = tl.dot(tl.trans(v), gp, acc, input_precision=PRECISION)
    base = parts_ptr + split.to(tl.int64) * part_stride
    tl.store(base + ks[:, None] * M + cols[None, :], acc, mask=kmask[:, None] & cmask[None, :])
    if kc == 0:  # the finishing kernel's partial rows of this split's tokens
        w = tl.arange(0, MP)
        wmask = w < M + 3
        small = tl.zeros([MP], dtype=tl.float32)
        r_end = tl.minimum((t_start + tokens_per_split + FIN_BLOCK_T - 1) // FIN_BLOCK_T, fin_rows)
        for r in range(t_start // FIN_BLOCK_T, r_end):
            small += tl.load(fin_ptr + r * (M + 3) + w, mask=wmask, other=0.0)
        tl.store(base + K * M + w, small, mask=wmask)


def finish_block_t(n: int) -> int:
    """Tokens per program of the finishing kernels ([BLOCK_T, n, n] Sinkhorn state and, in
    backward, 2 (t_max - 1) sums of n per token in registers); divides ``BLOCK_T_PROJ``."""
    return 32 if n <= 4 else 8


def precision() -> str:
    # tf32 on the matrix units (the spec's "phi in fp32/tf32"); the interpreter computes exactly
    return "ieee" if interpreting() else "tf32"


def padded_m(m: int) -> int:
    return max(16, next_pow2(m + 3))  # tl.dot needs every dimension >= 16; + 3 gate sums in the fold


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
        _proj_fwd_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_T"]),)](
            v, phi, proj, sumsq, T, K, M, MP=padded_m(M), PRECISION=precision(),
        )
        bt = finish_block_t(n)
        _finish_fwd_kernel[(triton.cdiv(T, bt),)](
            proj, sumsq, bias, alpha, h_pre, h_post, h_res, T, M, 1.0 / K, eps, ITERS=iters, N=n, BLOCK_T=bt,
        )
    return h_pre, h_post, h_res, proj, sumsq


def token_splits(T: int, K: int, device) -> tuple[int, int]:
    """``(splits, tokens per split)`` of the projection backward: (K-chunks of 64) x splits
    programs fill the device about twice; a split is a multiple of ``BLOCK_T_PROJ`` tokens."""
    chunks = triton.cdiv(K, 64)
    splits = max(1, min(triton.cdiv(2 * sm_count(device), chunks), triton.cdiv(T, BLOCK_T_PROJ)))
    per_split = triton.cdiv(triton.cdiv(T, splits), BLOCK_T_PROJ) * BLOCK_T_PROJ
    return triton.cdiv(T, per_split), per_split


def coefficients_backward(v, phi, bias, alpha, proj, sumsq, g_pre, g_post, g_res, n: int, iters: int, eps: float,
                          g_v=None):
    """``(g_v, g_phi, g_bias, g_alpha)``; given ``g_v`` (the buffer of :mod:`.sublayer`), the
    gradient of ``v`` is added to it in place."""
    T, K = v.shape
    M = phi.shape[1]
    dev = v.device
    accumulate = g_v is not None
    g_v = torch.empty_like(v) if g_v is None else g_v
    if T == 0:
        z = torch.zeros
        return g_v, z(K, M, device=dev), z(M, device=dev), z(3, device=dev)
    bt = finish_block_t(n)
    fin_rows = triton.cdiv(T, bt)
    g_proj = torch.empty(T, M, dtype=torch.float32, device=dev)
    c = torch.empty(T, dtype=torch.float32, device=dev)
    fin = torch.empty(fin_rows, M + 3, dtype=torch.float32, device=dev)
    _finish_bwd_kernel[(fin_rows,)](
        proj, sumsq, bias, alpha, g_pre, g_post, g_res, g_proj, c, fin, T, M, 1.0 / K, eps,
        ITERS=iters, N=n, BLOCK_T=bt,
    )
    splits, per_split = token_splits(T, K, dev)
    width = K * M + M + 3
    parts = torch.empty(splits, width, dtype=torch.float32, device=dev)
    _proj_bwd_kernel[lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), splits)](
        v, phi, g_proj, c, g_v, fin, parts, T, K, M, per_split, width, fin_rows,
        MP=padded_m(M), PRECISION=precision(), ACCUMULATE=accumulate, FIN_BLOCK_T=bt, BLOCK_T=BLOCK_T_PROJ,
    )
    total = parts[0] if splits == 1 else parts.sum(0)
    return g_v, total[: K * M].view(K, M), total[K * M : K * M + M], total[K * M + M :]


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
        n = ctx.n
        g_v, g_phi, g_bias, g_alpha = coefficients_backward(
            v, phi, bias, alpha, proj, sumsq, *coefficient_grads(g_pre, g_post, g_res, v.shape[0], n, v.device),
            n, ctx.iters, ctx.eps,
        )
        return g_v, g_phi, g_bias, g_alpha, None, None, None


def coefficient_grads(g_pre, g_post, g_res, T: int, n: int, device):
    """The incoming gradients as contiguous fp32, zeros for outputs that got none."""

    def fix(g, shape):
        return torch.zeros(shape, dtype=torch.float32, device=device) if g is None else g.float().contiguous()

    return fix(g_pre, (T, n)), fix(g_post, (T, n)), fix(g_res, (T, n, n))


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
