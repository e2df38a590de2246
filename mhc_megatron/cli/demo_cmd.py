"""``mhc-megatron demo``: train a tiny megatron-core GPT per residual mode and compare."""

from __future__ import annotations


def add_parser(sub) -> None:
    from ..demo.config import DemoConfig

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
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per mode (default %(default)s)")
    p.add_argument("--layers", type=int, default=d.layers, help="transformer layers (default %(default)s)")
    p.add_argument("--hidden", type=int, default=d.hidden, help="hidden size C (default %(default)s)")
    p.add_argument("--heads", type=int, default=d.heads, help="attention heads (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="sequence length in bytes (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step (default %(default)s)")
    p.add_argument("--expansion-rate", type=int, default=d.expansion_rate, help="streams n for hc/mhc (default %(default)s)")
    p.add_argument("--sinkhorn-iters", type=int, default=d.sinkhorn_iters, help="Sinkhorn iterations (default %(default)s)")
    p.add_argument("--res-init-diag", type=float, default=d.res_init_diag,
                   help="initial diagonal of mHC's H_res logits: 0 = uniform, 4-8 = near identity (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate, AdamW (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="validation interval in steps (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default %(default)s)")
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA if available, else CPU (default %(default)s)")
    p.add_argument("--model", choices=("gpt", "hybrid"), default=d.model,
                   help="GPTModel, or the same layers as a HybridModel with the pattern '*-*-...' "
                   "(no position embedding) (default %(default)s)")
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
    from ..demo.config import DemoConfig
    from ..demo.train import run_demo

    cfg = DemoConfig(
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
