"""Stability diagnostics (docs/maths.md, "Stability diagnostics"): Amax gain magnitudes of stream-mixing matrices."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check_square(m: torch.Tensor, name: str) -> None:
    if m.dim() < 2 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"{name} expects matrices [..., n, n], got shape {tuple(m.shape)}")


def amax_gain(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(forward_gain, backward_gain)`` of mapping matrices ``[..., n, n]``.

    Forward gain: the largest absolute row sum (how much ``x -> M x`` can amplify a signal);
    backward gain: the largest absolute column sum (the same for gradients, ``g -> M^T g``).
    Each is averaged over the leading dims (tokens). Returns 0-dim float tensors.
    """
    _check_square(m, "amax_gain")
    a = m.detach().abs().to(torch.float64 if m.dtype == torch.float64 else torch.float32)
    return a.sum(dim=-1).amax(dim=-1).mean(), a.sum(dim=-2).amax(dim=-1).mean()


def composite_mapping(
    h_res_layers: Sequence[torch.Tensor] | torch.Tensor, cumulative: bool = False
) -> torch.Tensor:
    """Product of per-layer mixing matrices, first layer rightmost: ``H_{L-1} ... H_1 H_0``.

    ``h_res_layers`` is a sequence of L tensors ``[..., n, n]`` (or one ``[L, ..., n, n]``
    tensor). With ``cumulative=True`` returns every prefix product ``[L, ..., n, n]`` (entry l
    maps the model input to the output of layer l), else the full product ``[..., n, n]``.
    """
    layers = list(h_res_layers)
    if not layers:
        raise ValueError("composite_mapping needs at least one layer")
    for m in layers:
        _check_square(m, "composite_mapping")
    prod = layers[0]
    prefixes = [prod]
    for m in layers[1:]:
        prod = m @ prod
        prefixes.append(prod)
    return torch.stack(prefixes) if cumulative else prod


def composite_amax_gain(
    h_res_layers: Sequence[torch.Tensor] | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Amax gains of the composite mapping over all layers (see :func:`amax_gain`)."""
    return amax_gain(composite_mapping(h_res_layers))


def gain_profile(h_res_layers: Sequence[torch.Tensor]) -> dict:
    """Everything the stability reports print, as plain floats: the Amax gains of every layer
    and of the composite mapping from the first layer to every depth (docs/stability.md)."""
    layers = list(h_res_layers)
    if not layers:  # no mixing at all: a residual model
        return {
            "single_forward_gain": [], "single_backward_gain": [],
            "composite_forward_gain_by_depth": [], "composite_backward_gain_by_depth": [],
            "max_single_forward_gain": 1.0, "max_single_backward_gain": 1.0,
            "composite_forward_gain": 1.0, "composite_backward_gain": 1.0,
        }
    single = [tuple(float(g) for g in amax_gain(m)) for m in layers]
    composite = [tuple(float(g) for g in amax_gain(p)) for p in composite_mapping(layers, cumulative=True)]
    return {
        "single_forward_gain": [f for f, _ in single],
        "single_backward_gain": [b for _, b in single],
        "composite_forward_gain_by_depth": [f for f, _ in composite],
        "composite_backward_gain_by_depth": [b for _, b in composite],
        "max_single_forward_gain": max(f for f, _ in single),
        "max_single_backward_gain": max(b for _, b in single),
        "composite_forward_gain": composite[-1][0],
        "composite_backward_gain": composite[-1][1],
    }
