"""Synthetic stability report: how far do HC and mHC residual mappings amplify over depth?

Each of L layers gets coefficient inputs drawn as a trained model might have them, and the real
coefficient functions of :mod:`mhc_megatron.ops` turn them into per-token ``H_res`` matrices.
The draw (documented in docs/stability.md):

* layer input ``x ~ N(0, 1)``, ``[tokens, n, C]``;
* projections at their initial scale (``phi ~ N(0, 1/(nC))``, ``theta ~ N(0, 1/C)``), gates
  ``alpha = --alpha`` for both modes, so each token gets its own matrix;
* the static part drifted away from initialisation: mHC's ``H_res`` logits get
  ``N(0, mhc_spread^2)`` added (default 1, the spread at which ``t_max = 20`` Sinkhorn keeps
  column sums within 1e-3 of 1), HC's ``H_res`` entries get ``N(0, hc_spread^2)`` added to the
  identity (default 0.2: single-layer gains of about 1.8 on average and a composite gain that
  grows exponentially with depth, about 35 at 60 layers; the paper measured up to ~3000 in its
  trained 27B HC model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops


@dataclass(frozen=True)
class StabilitySettings:
    layers: int = 64
    expansion_rate: int = 4
    hidden: int = 64
    tokens: int = 256
    alpha: float = 0.1
    mhc_spread: float = 1.0
    hc_spread: float = 0.2
    iters: int = 20
    seed: int = 0

    def validate(self) -> None:
        ops.check_expansion_rate(self.expansion_rate)
        ops.check_iters(self.iters)
        for name in ("layers", "hidden", "tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("alpha", "mhc_spread", "hc_spread"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


def _layer_h_res(mode: str, layer: int, s: StabilitySettings, gen: torch.Generator):
    n, C = s.expansion_rate, s.hidden
    x = torch.randn(s.tokens, n, C, generator=gen, dtype=torch.float64)
    gates = torch.full((3,), s.alpha, dtype=torch.float64)
    if mode == "mhc":
        p = ops.init_mhc_parameters(n, C, dtype=torch.float64, generator=gen)
        bias = p.bias.clone()
        bias[2 * n :] += s.mhc_spread * torch.randn(n * n, generator=gen, dtype=torch.float64)
        return ops.mhc_coefficients(x, p.phi, bias, gates, iters=s.iters)[2]
    p = ops.init_hc_parameters(n, C, layer, dtype=torch.float64)
    bias = p.bias.clone()
    bias[2 * n :] += s.hc_spread * torch.randn(n * n, generator=gen, dtype=torch.float64)
    theta = torch.randn(C, n + 2, generator=gen, dtype=torch.float64) / C**0.5
    return ops.hc_coefficients(x, theta, bias, gates)[2]


def stability_report(settings: StabilitySettings) -> dict:
    """Per mode: single-layer gains (per layer, and their max) and composite gains."""
    settings.validate()
    report = {}
    for mode in ("hc", "mhc"):
        gen = torch.Generator().manual_seed(settings.seed)
        h_res = [_layer_h_res(mode, layer, settings, gen) for layer in range(settings.layers)]
        report[mode] = ops.gain_profile(h_res)
    return report


def format_report(report: dict, settings: StabilitySettings) -> str:
    s = settings
    lines = [
        f"Amax gains over {s.layers} layers, n={s.expansion_rate}, {s.tokens} tokens, "
        f"alpha={s.alpha}, mhc_spread={s.mhc_spread}, hc_spread={s.hc_spread}, iters={s.iters}",
        "",
        f"{'mode':<5} {'max single fwd':>15} {'max single bwd':>15} "
        f"{'composite fwd':>14} {'composite bwd':>14}",
    ]
    for mode, r in report.items():
        lines.append(
            f"{mode:<5} {r['max_single_forward_gain']:>15.4f} {r['max_single_backward_gain']:>15.4f} "
            f"{r['composite_forward_gain']:>14.4g} {r['composite_backward_gain']:>14.4g}"
        )
    return "\n".join(lines)
