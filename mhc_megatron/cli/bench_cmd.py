"""``mhc-megatron bench kernels``: the kernel benchmark (see mhc_megatron/bench/kernels.py)."""

from __future__ import annotations

import json


def _ints(text: str, flag: str = "") -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise ValueError(f"{flag} {text!r}: expected comma-separated positive integers such as 8,16")
    return values


# --device cpu runs Triton's interpreter (numpy, about a second per launch at these sizes), so its
# defaults are a smoke-sized shape; flags given on the command line are obeyed on either device
CUDA_DEFAULTS = {"tokens": "4096,16384", "hidden": "2048,4096,7168", "impls": "triton,reference,compile,liger", "reps": 20}
CPU_DEFAULTS = {"tokens": "8", "hidden": "32", "impls": "triton,reference", "reps": 1}


def _cpu_defaults_text() -> str:
    return " ".join(f"--{k} {v}" for k, v in CPU_DEFAULTS.items())


def kernel_shapes(args) -> dict:
    """The benchmark's tokens, widths, implementations and repetitions: the flags given, else the
    device's defaults; ``defaulted`` names the flags that took a CPU default (printed)."""
    defaults = CPU_DEFAULTS if args.device == "cpu" else CUDA_DEFAULTS
    chosen, defaulted = {}, []
    for key, default in defaults.items():
        value = getattr(args, key)
        if value is None:
            value = default
            if args.device == "cpu":
                defaulted.append(f"--{key} {default}")
        chosen[key] = value
    if chosen["reps"] < 1:
        raise ValueError(f"--reps {chosen['reps']}: must be >= 1")
    return {"tokens": _ints(str(chosen["tokens"]), "--tokens"), "hidden": _ints(str(chosen["hidden"]), "--hidden"),
            "impls": tuple(i.strip() for i in chosen["impls"].split(",") if i.strip()),
            "reps": chosen["reps"], "defaulted": defaulted}


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print tables", description="Benchmarks that print tables.")
    bench = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    k = bench.add_parser(
        "kernels",
        help="time the mHC ops per implementation against the memory-traffic floor",
        description=(
            "Time coefficients, pre-mix, post+residual and the whole mHC sublayer, forward and "
            "backward, for our Triton kernels, the PyTorch reference, torch.compile of the reference "
            "and Liger-Kernel (liger in --impls needs liger_kernel installed); print time, GB/s against the memory-traffic floor, "
            "the fraction of the measured copy bandwidth, and the speed-up over the reference. "
            "--device cpu runs Triton's interpreter (slow; timings meaningless) with small defaults "
            f"({_cpu_defaults_text()}) that explicit flags override."
        ),
    )
    k.add_argument("--tokens", default=None, help=f"comma-separated token counts (default {CUDA_DEFAULTS['tokens']}; "
                   f"{CPU_DEFAULTS['tokens']} with --device cpu)")
    k.add_argument("--hidden", default=None, help=f"comma-separated widths C (default {CUDA_DEFAULTS['hidden']}; "
                   f"{CPU_DEFAULTS['hidden']} with --device cpu)")
    k.add_argument("--expansion-rate", type=int, default=4, help="streams n (default %(default)s)")
    k.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="activation dtype (default %(default)s)")
    k.add_argument("--sinkhorn-iters", type=int, default=20, help="Sinkhorn iterations (default %(default)s)")
    k.add_argument("--impls", default=None, help=f"implementations (default {CUDA_DEFAULTS['impls']}; "
                   f"{CPU_DEFAULTS['impls']} with --device cpu)")
    k.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda, or cpu for the interpreted smoke run")
    k.add_argument("--reps", type=int, default=None, help=f"timed repetitions (default {CUDA_DEFAULTS['reps']}; "
                   f"{CPU_DEFAULTS['reps']} with --device cpu)")
    k.add_argument("--json", action="store_true", help="print the records as JSON")
    k.set_defaults(run=run)

    a = bench.add_parser(
        "activations",
        help="count the activation bytes saved for backward: residual vs mhc vs mhc+recompute",
        description=(
            "Count the distinct storages autograd keeps during one forward pass (parameters excluded), per "
            "token, for the demo model and a 27B-like layer (C=2560, n=4), for residual, mhc and mhc with "
            "recompute; 'mHC extra' is the difference to residual and 'planned' the planner's prediction of "
            "it for the Triton kernels. On CPU --backend triton runs the kernels in Triton's interpreter."
        ),
    )
    a.add_argument("--shapes", default="demo,27b-layer", help="comma-separated shapes (default %(default)s)")
    a.add_argument("--backend", choices=("reference", "triton"), default="triton", help="mHC ops backend (default %(default)s)")
    a.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default %(default)s)")
    a.set_defaults(run=run_activations)
    _add_traffic_parser(bench)


def _add_traffic_parser(bench) -> None:
    from ..bench.traffic import TrafficConfig

    d = TrafficConfig()
    t = bench.add_parser(
        "traffic",
        help="count the bytes and launches of one mHC sublayer, forward + backward (CPU, Triton interpreter)",
        description=(
            "Run one mHC sublayer (the product's modules, Triton kernels, an opaque F) forward and backward in "
            "Triton's CPU interpreter and count, per launch, the bytes its loads and stores touch (masked lanes "
            "excluded; unique = compulsory bytes, requested = every lane of every program) and every other "
            "torch launch on the path; print per-kernel and per-sublayer tables against the floors and an "
            "H200 time estimate (counted bytes / --bandwidth-gbps, labelled an estimate). Runs at --tokens and "
            "twice that: the difference is the per-token traffic, the rest the per-call traffic (parameters)."
        ),
    )
    t.add_argument("--tokens", type=int, default=d.tokens, help="tokens, a multiple of 32 (default %(default)s)")
    t.add_argument("--hidden", type=int, default=d.hidden, help="width C (default %(default)s)")
    t.add_argument("--expansion-rate", type=int, default=d.n, help="streams n (default %(default)s)")
    t.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=d.dtype, help="stream dtype (default %(default)s)")
    t.add_argument("--sinkhorn-iters", type=int, default=d.sinkhorn_iters, help="t_max (default %(default)s)")
    t.add_argument("--recompute", action="store_true", help="also run a recompute block and report the extra bytes")
    t.add_argument("--block-size", type=int, default=d.block_size, help="recompute block size L_r (default %(default)s)")
    t.add_argument("--bias", action="store_true", help="the sublayer output has a bias (Megatron's add_bias_linear)")
    t.add_argument("--dropout", type=float, default=d.dropout, help="hidden dropout (Megatron's GPT default 0.1; default %(default)s)")
    t.add_argument("--no-bda-fusion", action="store_true", help="as Megatron's --no-bias-dropout-fusion")
    t.add_argument("--bandwidth-gbps", type=float, default=d.bandwidth_gbps, help="for the time estimate (default %(default)s, H200 peak)")
    t.add_argument("--estimate-tokens", type=int, default=d.estimate_tokens, help="tokens of the estimate (default %(default)s)")
    t.add_argument("--sms", type=int, default=d.sms, help="SMs the launch heuristics assume (default %(default)s, H200)")
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.set_defaults(run=run_traffic)


def run(args) -> int:
    import torch

    from ..bench import kernels as kb

    shapes = kernel_shapes(args)
    tokens, hidden, impls, reps = shapes["tokens"], shapes["hidden"], shapes["impls"], shapes["reps"]
    if args.device == "cpu":
        kb.enable_cpu_interpreter()
        warmup = 1
        if shapes["defaulted"] and not args.json:
            print(f"--device cpu: Triton's interpreter is slow, so the CPU defaults apply: {' '.join(shapes['defaulted'])} "
                  "(give the flags to choose other values)\n")
    else:
        if not torch.cuda.is_available():
            raise ValueError("bench kernels needs a CUDA device; use --device cpu for the interpreted smoke run")
        warmup = 5
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    records, copy_gbps = kb.run_benchmark(
        tokens=tokens, hidden=hidden, n=args.expansion_rate, dtype=dtype, iters=args.sinkhorn_iters,
        impls=impls, device=args.device, warmup=warmup, reps=reps,
    )
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter: timings meaningless)"
    if args.json:
        print(json.dumps({"device": name, "cpu_defaults_applied": shapes["defaulted"], "copy_gbps": copy_gbps, "records": [r.as_dict() for r in records]}))
    else:
        print(kb.format_table(records, copy_gbps, name))
    return 0


def run_activations(args) -> int:
    import logging
    import warnings

    from ..bench import kernels as kb

    if args.device == "cpu" and args.backend == "triton":
        kb.enable_cpu_interpreter()
    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    from ..bench import activations as ab

    records = []
    for shape in (s.strip() for s in args.shapes.split(",") if s.strip()):
        if shape not in ab.SHAPES:
            raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(ab.SHAPES)}")
        records += ab.measure(shape, args.backend, args.device)
    print(ab.format_table(records))
    return 0


def run_traffic(args) -> int:
    import logging
    import warnings

    from ..bench import kernels as kb

    kb.enable_cpu_interpreter()
    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    from ..bench.traffic import TrafficConfig, format_report, measure

    cfg = TrafficConfig(
        tokens=args.tokens, hidden=args.hidden, n=args.expansion_rate, dtype=args.dtype, recompute=args.recompute,
        block_size=args.block_size, bias=args.bias, dropout=args.dropout, fused_bda=not args.no_bda_fusion,
        sinkhorn_iters=args.sinkhorn_iters, bandwidth_gbps=args.bandwidth_gbps, estimate_tokens=args.estimate_tokens,
        sms=args.sms,
    )
    cfg.validate()
    report = measure(cfg)
    print(json.dumps(report) if args.json else format_report(report))
    return 0
