"""``mhc-megatron profile``: the overhead of mHC against the residual baseline, measured."""

from __future__ import annotations

import json
import os
import shlex
import sys


CONFIG_FIELDS = ("layers", "hidden", "heads", "seq_len", "batch_size", "expansion_rate")


def add_parser(sub) -> None:
    from ..bench.profile import ProfileConfig

    d = ProfileConfig()
    p = sub.add_parser(
        "profile",
        help="measure the time mHC adds to a training step and where it goes (torch.profiler)",
        description=(
            "Train the residual baseline and the mHC model (same architecture, seed and batches) one step "
            "each in turn; after --warmup steps time --steps steps of each (device synchronised) and report "
            "the median time per step and the overhead in percent. A torch.profiler window of "
            "--profile-steps steps per mode splits the step into mHC forward (the mhc.* ranges), mHC "
            "backward (autograd nodes created in them), communication and the rest, and is saved as a "
            "Chrome trace per mode plus a PNG under --out. Uses the GPU when there is one."
        ),
    )
    p.add_argument("--config", metavar="YAML", help="take the model from a launch config (mhc-megatron "
                   "validate-config's format): depth, width, heads, sequence, micro-batch, residual mode, n, mHC "
                   "recompute, MoE layers, multi-latent attention, a hybrid layer pattern of '*', '-', 'E'; the flags "
                   "below override it; MTP and other hybrid layers are refused. A launch of more than one process "
                   "(tensor, pipeline, context or expert parallel size above 1) is run as it is, twice with "
                   "torchrun (residual, then as configured), on mock data, timed by Megatron's iteration log")
    p.add_argument("--modes", default=None, help=f"comma-separated, residual first (default {','.join(d.modes)}; "
                   "with --config: residual and the config's residual_mode)")
    for name in ("layers", "hidden", "heads", "seq_len", "batch_size", "expansion_rate", "steps", "warmup", "profile_steps"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"(default {getattr(d, name)}{'; or the config' if name in CONFIG_FIELDS else ''})")
    p.add_argument("--recompute", action="store_true", default=None, help="profile with mHC recompute on")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device, help="(default %(default)s)")
    p.add_argument("--out", default="profile-out", help="directory for traces, PNG and JSON (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--entry", metavar="SCRIPT", default=None,
                   help="multi-process profile only: run this python script in place of mhc-pretrain-gpt under "
                   "torchrun (e.g. a site wrapper that sets up the environment and calls its main)")
    p.set_defaults(run=run)


def run(args) -> int:
    import dataclasses
    import os

    from ..bench.profile import ProfileConfig, run_profile

    given = {name: getattr(args, name) for name in (*CONFIG_FIELDS, "steps", "warmup", "profile_steps", "recompute")}
    if args.modes is not None:
        given["modes"] = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    notes: list[str] = []
    if args.config:
        from ..bench.profile_multiprocess import launch_world_size
        from ..launch.config import load_launch_config

        if launch_world_size(load_launch_config(args.config)) > 1:
            return run_multiprocess(args, given)
    if args.entry:
        raise ValueError("--entry runs a launch of more than one process; this profile is one process")
    if args.config:
        from ..bench.profile_launch import profile_config_from_launch

        cfg, notes = profile_config_from_launch(args.config, given, args.device)
    else:
        cfg = ProfileConfig(**{k: v for k, v in given.items() if v is not None})
    cfg = dataclasses.replace(cfg, device=args.device)
    cfg.validate()
    report = run_profile(cfg, out_dir=args.out)
    if args.config:
        report["launch_config"], report["not_reproduced"] = args.config, notes
    if _save_report(report, args):
        return 0
    c = report["config"]
    if args.config:
        print(f"model of {args.config} (one process, megatron-core local spec, GELU MLP, RMSNorm)")
        if notes:
            print(f"not reproduced from the config: {'; '.join(notes)}")
        for r in report["results"]:
            print(f"built {r['mode']}: {describe(r['model'])}")
    print(f"device {report['device']}: {c['layers']} layers, hidden {c['hidden']}, seq {c['seq_len']} x batch "
          f"{c['batch_size']}, n = {c['expansion_rate']}; {c['steps']} timed steps after {c['warmup']} warm-up, "
          f"alternating\n")
    print(f"{'mode':<9}{'ms/step':>9}{'tokens/s':>10}{'overhead':>10}{'mHC fwd':>9}{'mHC bwd':>9}{'comm':>7}{'rest':>8}")
    for r in report["results"]:
        b = r["breakdown_ms"]
        over = "-" if r["overhead_percent"] is None else f"{r['overhead_percent']:+.1f}%"
        print(f"{r['mode']:<9}{r['step_ms_median']:>9.2f}{r['tokens_per_s']:>10.0f}{over:>10}"
              f"{b['mhc_forward']:>9.2f}{b['mhc_backward']:>9.2f}{b['communication']:>7.2f}{b['rest']:>8.2f}")
    print(f"\n(ms per step; breakdown from torch.profiler over {c['profile_steps']} steps)")
    print(f"traces: {', '.join(report['traces'].values())}; plot: {report['plot']}")
    return 0


LAUNCH_KEYS = {"layers": "num_layers", "hidden": "hidden_size", "heads": "num_attention_heads", "seq_len": "seq_length",
               "batch_size": "micro_batch_size", "expansion_rate": "expansion_rate", "recompute": "mhc_recompute"}


def run_multiprocess(args, given: dict) -> int:
    """The launch of more than one process, run for real with torchrun (bench/profile_multiprocess.py)."""
    from ..bench.profile import ProfileConfig
    from ..bench.profile_multiprocess import ProfileRunFailed, profile_multiprocess

    d = ProfileConfig()
    try:
        report = profile_multiprocess(
            args.config, modes=given.get("modes"), steps=d.steps if args.steps is None else args.steps,
            warmup=d.warmup if args.warmup is None else args.warmup, entry=args.entry, out_dir=args.out,
            overrides={LAUNCH_KEYS[k]: given[k] for k in LAUNCH_KEYS if given.get(k) is not None})
    except ProfileRunFailed as err:
        print(f"mhc-megatron profile: error: {err}", file=sys.stderr)
        return 1
    if _save_report(report, args):
        return 0
    lay = report["layout"]
    cpu = report["device"] == "cpu"
    print(f"{args.config}: the real launch in {report['processes']} processes (TP {lay['tp']} x PP {lay['pp']} x "
          f"CP {lay['cp']} x DP {lay['dp']}, EP {lay['ep']}) through torchrun, on {report['data']}; "
          f"{report['steps']} timed iterations after {report['warmup']} warm-up, one run per mode")
    if cpu:
        print("device cpu: these are CPU times (no GPU for every process; --entry runs Megatron on the CPU); "
              "they say nothing about the GPU step")
    print(f"\n{'mode':<9}{'ms/step':>10}{'tokens/s':>10}{'overhead':>10}")
    for r in report["results"]:
        over = "-" if r["overhead_percent"] is None else f"{r['overhead_percent']:+.1f}%"
        print(f"{r['mode']:<9}{r['step_ms_median']:>10.2f}{r['tokens_per_s']:>10.0f}{over:>10}")
    print(f"\n(ms per step: median of Megatron's 'elapsed time per iteration (ms)' on the last rank; "
          f"{report['global_batch_size']} x {report['seq_length']} tokens per step)")
    for r in report["results"]:
        print(f"{r['mode']} run: {shlex.join(r['command'])}")
    print(f"logs: {', '.join(r['log'] for r in report['results'])}; report: {os.path.join(args.out, 'profile.json')}")
    return 0


def _save_report(report: dict, args) -> bool:
    """Write ``profile.json`` under ``--out``; with ``--json`` also print it (True: nothing else to print)."""
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(report, f, indent=1)
    if args.json:
        print(json.dumps(report))
    return args.json


def describe(model: dict) -> str:
    """One line of what the built model holds (counted from its modules)."""
    parts = [f"{model['class']}, {model['parameters']:,} parameters, {model['layers']} layers"]
    if model["moe_layers"]:
        experts = "/".join(str(e) for e in model["experts_per_moe_layer"])
        parts.append(f"{model['moe_layers']} MoE layers of {experts} experts"
                     + (f" + a shared expert in {model['shared_experts']}" if model["shared_experts"] else ""))
    if model["mla_layers"]:
        parts.append(f"{model['mla_layers']} multi-latent attention layers")
    return ", ".join(parts)
