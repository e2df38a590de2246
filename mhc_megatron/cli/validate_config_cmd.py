"""``mhc-megatron validate-config`` and ``mhc-megatron launch-args``: check a YAML launch
configuration on a laptop, and turn it into ``mhc-pretrain-gpt`` flags."""

from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "validate-config",
        help="check a YAML launch config and estimate parameters, memory and traffic per GPU",
        description=(
            "Parse a YAML launch configuration (examples/*/config.yaml), check that its parallel layout fits "
            "the model and the cluster, build the model with Megatron on the meta device (no GPU, no "
            "memory) and print the parameter count (with the mHC share), the vocabulary Megatron pads to, and "
            "per-pipeline-rank estimates: weights and optimizer "
            "state, activations of the micro-batches in flight (from the schedule simulator), mHC "
            "activations, pipeline traffic per step, and a planning step time. Warns (on stderr) about what it "
            "accepts but should be known, such as an expansion_rate above 8 (no Triton kernel). Exits 2 with a "
            "message naming the mismatch when the layout is inconsistent."
        ),
    )
    p.add_argument("path", help="the YAML launch configuration")
    p.add_argument("--mfu", type=float, default=0.35, help="assumed model-FLOP utilisation for the step time (default %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak per GPU in TFLOP/s for the step time (default %(default)s, H100 SXM)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)

    q = sub.add_parser(
        "launch-args",
        help="print the mhc-pretrain-gpt flags of a YAML launch config",
        description="Print the flags of a YAML launch configuration for scripts: one shell-quoted command "
        "line, or one argument per line with --lines (for bash's mapfile, as examples/moe_27b/sbatch.sh "
        "does). The layout is checked first.",
    )
    q.add_argument("path", help="the YAML launch configuration")
    q.add_argument("--lines", action="store_true", help="one argument per line, unquoted")
    q.set_defaults(run=run_launch_args)


def run_launch_args(args) -> int:
    import shlex
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from ..launch import check_layout, load_launch_config

        cfg = load_launch_config(args.path)
        check_layout(cfg)
    print("\n".join(cfg.argv()) if args.lines else shlex.join(cfg.argv()))
    return 0


def _gb(x: float) -> str:
    return f"{x:.1f}"


def run(args) -> int:
    import warnings

    from ..launch import load_launch_config
    from ..launch.estimate import estimate

    with warnings.catch_warnings():  # megatron-core's import-time notes about absent TE/apex
        warnings.simplefilter("ignore")
        report = estimate(load_launch_config(args.path), mfu=args.mfu, peak_tflops=args.peak_tflops)
    for warning in report["warnings"]:
        print(f"mhc-megatron validate-config: WARNING: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
        return 0
    lay = report["layout"]
    print(f"{report['config']}: OK")
    print(f"{report['world_size']} GPUs = TP {lay['tp']} x PP {lay['pp']} x CP {lay['cp']} x DP {lay['dp']} "
          f"(EP {lay['ep']}, ETP {lay['etp']}); {lay['schedule']}, {lay['stages_per_rank']} stage(s) per rank "
          f"of {lay['layers_per_stage']} layers; {lay['microbatches']} micro-batches per step")
    print(f"residual mode {report['residual_mode']}, n = {report['expansion_rate']}")
    print(f"parameters: {report['total_parameters'] / 1e9:.2f}B total, {report['active_parameters'] / 1e9:.2f}B "
          f"active per token, {report['mhc_parameters'] / 1e6:.1f}M in mHC coefficients "
          f"({report['mhc_parameter_share']:.3%} of the total)")
    voc = report["vocabulary"]
    print(f"vocabulary: {voc['vocab_size']} padded to {voc['padded_vocab_size']} (a multiple of "
          f"make_vocab_size_divisible_by {voc['make_vocab_size_divisible_by']} x TP {voc['tensor_model_parallel_size']})"
          + (f"; the meta build pads to {voc['meta_build_padded_vocab_size']} (TP 1), so the counts above use that"
             if voc["meta_build_padded_vocab_size"] != voc["padded_vocab_size"] else ""))
    if voc["note"]:
        print(voc["note"])
    print()
    print(f"{'rank':>4} {'stages':>8} {'layers':>12} {'params/GPU':>11} {'weights+opt':>12} {'in flight':>10} "
          f"{'activations':>12} {'mHC act.':>9} {'total GiB':>10} {'PP traffic/step':>16}")
    for r in report["per_rank"]:
        layers = ",".join(f"{a}-{b}" for a, b in r["layers"])
        print(f"{r['rank']:>4} {','.join(map(str, r['stages'])):>8} {layers:>12} "
              f"{r['parameters_per_gpu'] / 1e9:>10.2f}B {_gb(r['weights_and_optimizer_gib']):>12} "
              f"{r['in_flight_microbatches']:>10} {_gb(r['activations_gib']):>12} {_gb(r['mhc_activations_gib']):>9} "
              f"{_gb(r['memory_gib']):>10} {r['pipeline_gib_per_step']:>11.1f} GiB")
    print(f"\nlargest estimate: {report['max_memory_gib']:.1f} GiB per GPU (before framework buffers and "
          "fragmentation)" + (f"; a stage message is {report['pipeline_message_mib']} MiB" if lay["pp"] > 1 else ""))
    print(f"planning step time: {report['estimated_step_seconds']} s ({report['step_time_assumptions']}, "
          f"bubble {report['bubble_fraction']:.1%})")
    return 0
