"""``mhc-megatron stability``: single-layer and composite Amax gains of HC vs mHC."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    from ..stability import StabilitySettings

    d = StabilitySettings()
    p = sub.add_parser(
        "stability",
        help="report single-layer and composite Amax gains for hc and mhc",
        description=(
            "Draw per-layer coefficient inputs at a realistic spread (see docs/stability.md), "
            "compute H_res with the real coefficient functions and report the single-layer and "
            "composite Amax gains (max absolute row sum = forward, column sum = backward) for "
            "unconstrained HC and for mHC."
        ),
    )
    p.add_argument("--layers", type=int, default=d.layers, help="number of layers L (default %(default)s)")
    p.add_argument("--expansion-rate", type=int, default=d.expansion_rate, help="streams n (default %(default)s)")
    p.add_argument("--hidden", type=int, default=d.hidden, help="stream width C of the drawn inputs (default %(default)s)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="tokens per layer, gains are averaged over them (default %(default)s)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="gates of the dynamic part (default %(default)s)")
    p.add_argument("--mhc-spread", type=float, default=d.mhc_spread, help="std of the drift of mHC's H_res logits (default %(default)s)")
    p.add_argument("--hc-spread", type=float, default=d.hc_spread, help="std of the drift of HC's H_res entries from I (default %(default)s)")
    p.add_argument("--iters", type=int, default=d.iters, help="Sinkhorn iterations t_max (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object keyed by mode (hc, mhc)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..stability import StabilitySettings, format_report, stability_report

    settings = StabilitySettings(
        layers=args.layers,
        expansion_rate=args.expansion_rate,
        hidden=args.hidden,
        tokens=args.tokens,
        alpha=args.alpha,
        mhc_spread=args.mhc_spread,
        hc_spread=args.hc_spread,
        iters=args.iters,
        seed=args.seed,
    )
    report = stability_report(settings)
    print(json.dumps(report) if args.json else format_report(report, settings))
    return 0
