"""``mhc-megatron demo``: train a tiny megatron-core GPT per residual mode and compare."""

from __future__ import annotations


def _default(name: str) -> str:
    """'default X', plus the value each preset sets instead."""
    from ..demo.config import PRESETS, DemoConfig

    others = [f"{p}: {v[name]}" for p, v in PRESETS.items() if name in v]
    return f"default {getattr(DemoConfig(), name)}" + "".join(f"; {o}" for o in others)


def add_parser(sub) -> None:
    from ..demo.config import PRESETS, DemoConfig

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="train a tiny GPT once per residual mode (residual, hc, mhc) and compare them",
        description=(
            "Train a tiny megatron-core GPTModel built from the mHC specs on the bundled corpus "
            "(Genesis, King James Version; byte-level) once per mode, then print final train and "
            "validation loss, max gradient norm, the composite Amax gain of the trained H_res, "
            "tokens per second and the time overhead against residual. Writes results.json, "
            "config.json, loss_curves.png and gains.png to --out."
        ),
    )
    p.add_argument("--modes", default=",".join(d.modes), help="comma-separated modes (default %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="training steps per mode (" + _default("steps") + ")")
    p.add_argument("--layers", type=int, default=None, help="transformer layers (" + _default("layers") + ")")
    p.add_argument("--hidden", type=int, default=None, help="hidden size C (" + _default("hidden") + ")")
    p.add_argument("--heads", type=int, default=None, help="attention heads (" + _default("heads") + ")")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length in bytes (" + _default("seq_len") + ")")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (" + _default("batch_size") + ")")
    p.add_argument("--expansion-rate", type=int, default=None, help="streams n for hc/mhc (" + _default("expansion_rate") + ")")
    p.add_argument("--sinkhorn-iters", type=int, default=None, help="Sinkhorn iterations (" + _default("sinkhorn_iters") + ")")
    p.add_argument("--res-init-diag", type=float, default=d.res_init_diag,
                   help="initial diagonal of mHC's H_res logits: 0 = uniform, 4-8 = near identity (default %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate, AdamW (" + _default("lr") + ")")
    p.add_argument("--eval-every", type=int, default=None, help="validation interval in steps (" + _default("eval_every") + ")")
    p.add_argument("--seed", type=int, default=None, help="random seed (" + _default("seed") + ")")
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA if available, else CPU (default %(default)s)")
    p.add_argument("--model", choices=("gpt", "hybrid"), default=d.model,
                   help="GPTModel, or the same layers as a HybridModel with the pattern '*-*-...' "
                   "(no position embedding) (default %(default)s)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="default",
                   help="default: the 4-layer demo; stress: deeper with a higher learning rate, where HC's loss "
                   "spikes while mHC trains (options given explicitly override the preset) (default %(default)s)")
    p.add_argument("--out", default="demo-out", help="output folder (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _quiet_megatron() -> None:
    """The demo's output is its table: hide megatron-core's import-time warnings (missing apex
    and transformer-engine, which the demo does not use) and the GPTModel deprecation notice."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", message=r".*(Apex|absl|Transformer Engine|transformer_engine).*")
    logging.getLogger("megatron").setLevel(logging.ERROR)


def run(args) -> int:
    _quiet_megatron()
    from ..demo.report import format_table, write_outputs
    from ..demo.config import preset_config
    from ..demo.train import run_demo

    cfg = preset_config(
        args.preset,
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        steps=args.steps,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        expansion_rate=args.expansion_rate,
        sinkhorn_iters=args.sinkhorn_iters,
        res_init_diag=args.res_init_diag,
        lr=args.lr,
        eval_every=args.eval_every,
        seed=args.seed,
        device=args.device,
        model=args.model,
    )
    results = run_demo(cfg, show_progress=not args.no_progress)
    print(format_table(results, cfg, str(cfg.resolve_device())))
    for path in write_outputs(results, cfg, args.out):
        print(f"wrote {path}")
    return 0
