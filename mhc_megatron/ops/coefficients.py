"""Per-token mixing coefficients ``H_pre``, ``H_post``, ``H_res`` for mHC and for plain HC.

Layout shared by both: the ``n*n + 2n`` coefficient logits of a token are
``[pre (n) | post (n) | res (n*n, row-major: res[i, j] mixes stream j into stream i)]``,
and ``alpha`` holds the three scalar gates ``(alpha_pre, alpha_post, alpha_res)``.
"""

from __future__ import annotations

import math

import torch

from ._backend import choose, reference_only
from ._checks import check_iters, check_shape, check_streams, compute_dtype
from ..kernels import num_coefficients  # noqa: F401 (re-exported: ops.num_coefficients)
from .sinkhorn import check_sinkhorn_order, sinkhorn_knopp

#: Where the epsilon of the coefficient RMS norm goes: ``rsqrt(mean(v^2) + eps)`` (ours, the
#: usual RMSNorm) or ``1 / (sqrt(mean(v^2)) + eps)`` (upstream Megatron-LM's ``1/(rms + eps)``).
EPS_PLACEMENTS = ("inside-sqrt", "outside")


def check_eps_placement(placement: str) -> str:
    if placement not in EPS_PLACEMENTS:
        raise ValueError(
            f"norm epsilon placement must be one of {', '.join(EPS_PLACEMENTS)}, got {placement!r} "
            "(inside-sqrt: rsqrt(mean + eps), ours; outside: 1/(rms + eps), upstream Megatron-LM's)"
        )
    return placement


def _gate_vector(alpha: torch.Tensor, n: int) -> torch.Tensor:
    """Expand ``(alpha_pre, alpha_post, alpha_res)`` to one gate per coefficient logit."""
    return torch.cat([alpha[0:1].expand(n), alpha[1:2].expand(n), alpha[2:3].expand(n * n)])


def mhc_coefficients(
    x: torch.Tensor,
    phi: torch.Tensor,
    bias: torch.Tensor,
    alpha: torch.Tensor,
    iters: int = 20,
    eps: float = 1e-6,
    backend: str = "auto",
    sinkhorn_order: str = "cols-first",
    eps_placement: str = "inside-sqrt",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC coefficients of the n-stream input ``x`` ``[..., n, C]`` (docs/maths.md, "Coefficients").

    With ``v = vec(x)`` (length nC), ``r = sqrt(mean(v^2) + eps)`` and
    ``logits = alpha * (v @ phi) / r + bias``:
    ``H_pre = sigmoid(logits_pre)``, ``H_post = 2 sigmoid(logits_post)``,
    ``H_res = SinkhornKnopp(logits_res, iters)``.

    This is the efficient order: the RMS norm is applied to the ``n*n + 2n`` projected values
    instead of to the ``nC`` inputs (equal to ``RMSNorm(v) @ phi`` because the norm is a per-token
    scalar; ``phi`` carries the norm's weight). All maths runs in float32 (float64 for float64
    input) whatever the dtype of ``x``.

    Args:
        phi: ``[n*C, n*n + 2n]`` projection. bias: ``[n*n + 2n]``. alpha: ``[3]`` gates.
        backend: ``"auto"`` (the fused Triton kernels for CUDA tensors), ``"reference"`` or
            ``"triton"``.
        sinkhorn_order: ``"cols-first"`` (the paper's) or ``"rows-first"`` (upstream
            Megatron-LM's), see :func:`sinkhorn_knopp`.
        eps_placement: ``"inside-sqrt"`` (the ``r`` above) or ``"outside"``:
            ``r = sqrt(mean(v^2)) + eps`` (upstream Megatron-LM's).
        The non-default choices run in the PyTorch reference only (an error where the Triton
        kernels would run).

    Returns:
        ``(h_pre [..., n], h_post [..., n], h_res [..., n, n])`` in the compute dtype.
    """
    n, C = check_streams(x)
    iters = check_iters(iters)
    check_sinkhorn_order(sinkhorn_order)
    check_eps_placement(eps_placement)
    if sinkhorn_order != "cols-first":
        reference_only("mhc_coefficients", backend, "Sinkhorn order rows-first", "--mhc-sinkhorn-order", x, phi)
    if eps_placement != "inside-sqrt":
        reference_only("mhc_coefficients", backend, "norm epsilon outside the square root",
                       "--mhc-norm-eps-placement", x, phi)
    m = num_coefficients(n)
    check_shape(phi, (n * C, m), "phi", f"[n*C, n*n+2n] for n={n}, C={C}")
    check_shape(bias, (m,), "bias", f"[n*n+2n] for n={n}")
    check_shape(alpha, (3,), "alpha", "the gates (alpha_pre, alpha_post, alpha_res)")
    if choose("mhc_coefficients", backend, x, phi, n=n) == "triton":
        from ..kernels.coefficients import mhc_coefficients_triton

        return mhc_coefficients_triton(x, phi, bias, alpha, iters, eps)

    dt = compute_dtype(x)
    v = x.reshape(*x.shape[:-2], n * C).to(dt)
    proj = v @ phi.to(dt)
    if eps_placement == "inside-sqrt":
        inv_r = torch.rsqrt(v.square().mean(dim=-1, keepdim=True) + eps)
    else:  # the norm's gradient is defined (zero) at a zero token, unlike sqrt's
        inv_r = 1.0 / (torch.linalg.vector_norm(v, dim=-1, keepdim=True) / math.sqrt(n * C) + eps)
    logits = proj * inv_r * _gate_vector(alpha.to(dt), n) + bias.to(dt)
    h_pre = torch.sigmoid(logits[..., :n])
    h_post = 2.0 * torch.sigmoid(logits[..., n : 2 * n])
    h_res = sinkhorn_knopp(logits[..., 2 * n :].unflatten(-1, (n, n)), iters, backend="reference", order=sinkhorn_order)
    return h_pre, h_post, h_res


def hc_coefficients(
    x: torch.Tensor,
    theta: torch.Tensor,
    bias: torch.Tensor,
    alpha: torch.Tensor,
    eps: float = 1e-6,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unconstrained Hyper-Connections coefficients (dynamic HC, arXiv 2409.19606).

    Each stream ``x_i`` (width C) is RMS-normalised on its own and projected by ``theta``
    ``[C, n + 2]`` to ``(d_pre_i, d_post_i, d_res_i[0..n))``. Then
    ``H_pre[i] = alpha_pre tanh(d_pre_i) + b_pre[i]``,
    ``H_post[i] = alpha_post tanh(d_post_i) + b_post[i]`` and
    ``H_res[j, i] = alpha_res tanh(d_res_i[j]) + b_res[j, i]`` (column i is written by the
    source stream i). No sigmoid, no Sinkhorn: the matrices may drift anywhere.

    HC is kept for comparison and has no fused kernel: every ``backend`` but ``"triton"`` (an
    error) runs this PyTorch code.

    Returns ``(h_pre [..., n], h_post [..., n], h_res [..., n, n])`` in the compute dtype.
    """
    if backend == "triton":
        raise ValueError("hc_coefficients has no Triton kernel (HC is a comparison mode); use backend='auto' or 'reference'")
    choose("hc_coefficients", "reference" if backend == "auto" else backend)
    n, C = check_streams(x)
    m = num_coefficients(n)
    check_shape(theta, (C, n + 2), "theta", f"[C, n+2] for n={n}, C={C}")
    check_shape(bias, (m,), "bias", f"[n*n+2n] for n={n}")
    check_shape(alpha, (3,), "alpha", "the gates (alpha_pre, alpha_post, alpha_res)")

    dt = compute_dtype(x)
    xs = x.to(dt)
    inv_r = torch.rsqrt(xs.square().mean(dim=-1, keepdim=True) + eps)
    d = torch.tanh((xs @ theta.to(dt)) * inv_r)  # [..., n, n+2]
    alpha = alpha.to(dt)
    bias = bias.to(dt)
    h_pre = alpha[0] * d[..., 0] + bias[:n]
    h_post = alpha[1] * d[..., 1] + bias[n : 2 * n]
    h_res = alpha[2] * d[..., 2:].transpose(-1, -2) + bias[2 * n :].view(n, n)
    return h_pre, h_post, h_res
