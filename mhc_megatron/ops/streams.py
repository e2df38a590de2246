"""Moving activations between the n-stream residual and the C-wide sublayer (docs/maths.md, "One layer").

These are the pure PyTorch references: fp32 arithmetic, results in the activation dtype.
"""

from __future__ import annotations

import torch

from ._backend import choose, reference_only
from ._checks import check_expansion_rate, check_floating, check_shape, check_streams, compute_dtype


def mhc_pre(x: torch.Tensor, h_pre: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Sublayer input ``H_pre · x``: ``[..., n, C]`` and ``[..., n]`` -> ``[..., C]``.

    ``backend``: ``"auto"`` (Triton for CUDA tensors), ``"reference"`` or ``"triton"``.
    """
    n, _ = check_streams(x)
    check_floating("mhc_pre", x=x, h_pre=h_pre)
    check_shape(h_pre, x.shape[:-1], "h_pre", "x.shape[:-1], one weight per stream")
    if choose("mhc_pre", backend, x, h_pre, n=n) == "triton":
        from ..kernels.pre import mhc_pre_triton

        return mhc_pre_triton(x, h_pre)
    dt = compute_dtype(x)
    return torch.einsum("...n,...nc->...c", h_pre.to(dt), x.to(dt)).to(x.dtype)


DROPOUT_PLACEMENTS = ("shared", "per-stream")


def mhc_post_res(
    x: torch.Tensor,
    f: torch.Tensor,
    h_post: torch.Tensor,
    h_res: torch.Tensor,
    backend: str = "auto",
    *,
    bias: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
    stream_dropout: float = 0.0,
) -> torch.Tensor:
    """Next residual ``H_res · x + H_post^T · dropout(f + bias)``.

    Shapes: x ``[..., n, C]``, f ``[..., C]`` (the sublayer output), h_post ``[..., n]``,
    h_res ``[..., n, n]``, bias ``[C]`` (optional); returns ``[..., n, C]`` in the dtype of ``x``.
    ``dropout`` (applied only when ``training``) and ``bias`` are Megatron's bias-dropout-add
    folded in: ``torch.nn.functional.dropout`` semantics (keep with probability ``1 - p``, scale
    by ``1 / (1 - p)``); the reference runs them as PyTorch ops, the kernel inside the fused
    pass (its random numbers differ from torch's, not their distribution).
    ``backend``: ``"auto"`` (the fused Triton kernel for CUDA tensors), ``"reference"`` or
    ``"triton"``.

    ``stream_dropout``: probability of a dropout applied to the expanded ``H_post^T · f`` with
    one mask element per stream and channel (upstream Megatron-LM's placement:
    ``H_res · x + dropout(H_post^T · f)``); 0 (default): none here — our layers drop out ``f``
    itself, one mask shared by the n streams, before calling this. PyTorch reference only.
    """
    n, C = check_streams(x)
    check_floating("mhc_post_res", x=x, f=f, h_post=h_post, h_res=h_res, bias=bias)
    lead = x.shape[:-2]
    check_shape(f, (*lead, C), "f", "the sublayer output, x.shape[:-2] + (C,)")
    check_shape(h_post, (*lead, n), "h_post", "x.shape[:-1]")
    check_shape(h_res, (*lead, n, n), "h_res", "x.shape[:-2] + (n, n)")
    if bias is not None:
        check_shape(bias, (C,), "bias", "one value per channel of the sublayer output")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {dropout!r}")
    if not 0.0 <= stream_dropout < 1.0:
        raise ValueError(f"stream_dropout must be in [0, 1), got {stream_dropout!r}")
    p = dropout if training else 0.0
    if stream_dropout > 0.0:
        if p > 0:
            raise ValueError("mhc_post_res: give dropout (one mask shared by the streams) or stream_dropout, not both")
        reference_only("mhc_post_res", backend, "dropout per stream", "--mhc-dropout per-stream", x, f)
        if bias is not None:
            f = f + bias
        dt = compute_dtype(x)
        mixed = torch.einsum("...ij,...jc->...ic", h_res.to(dt), x.to(dt))
        expanded = h_post.to(dt).unsqueeze(-1) * f.to(dt).unsqueeze(-2)
        return (mixed + torch.nn.functional.dropout(expanded, p=stream_dropout)).to(x.dtype)
    if choose("mhc_post_res", backend, x, f, h_post, h_res, n=n) == "triton":
        from ..kernels.post_res import mhc_post_res_triton

        return mhc_post_res_triton(x, f, h_post, h_res, bias, p)[0]
    if bias is not None:
        f = f + bias
    if p > 0:
        f = torch.nn.functional.dropout(f, p=p, training=True)
    dt = compute_dtype(x)
    mixed = torch.einsum("...ij,...jc->...ic", h_res.to(dt), x.to(dt))
    out = mixed + h_post.to(dt).unsqueeze(-1) * f.to(dt).unsqueeze(-2)
    return out.to(x.dtype)


def expand_streams(h: torch.Tensor, n: int) -> torch.Tensor:
    """Model entry: copy ``h`` ``[..., C]`` into n streams ``[..., n, C]``.

    Returns a broadcast view (no copy); ``reshape``/``contiguous`` materialises it.
    """
    n = check_expansion_rate(n)
    if h.dim() < 1:
        raise ValueError(f"expand_streams expects [..., C], got a scalar of shape {tuple(h.shape)}")
    return h.unsqueeze(-2).expand(*h.shape[:-1], n, h.shape[-1])


def contract_streams(x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Model exit: ``[..., n, C]`` -> ``[..., C]`` by the mean (default) or sum of the streams.

    The mean makes the exit of a model whose streams are identical copies (as at initialisation)
    equal to the residual model's hidden state; the final norm makes the two choices differ only
    in scale.
    """
    check_streams(x)
    if reduction == "mean":
        return x.mean(dim=-2)
    if reduction == "sum":
        return x.sum(dim=-2)
    raise ValueError(f"contract_streams reduction must be 'mean' or 'sum', got {reduction!r}")
