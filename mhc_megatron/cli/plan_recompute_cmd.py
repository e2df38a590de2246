"""``mhc-megatron plan-recompute``: choose L_r per stage and predict the activation bytes."""

from __future__ import annotations

import json


def _block(text: str):
    return text if text == "auto" else int(text)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan-recompute",
        help="choose the mHC recompute block size per pipeline stage and predict memory",
        description=(
            "Choose L_r (sublayers per mHC recompute block; attention and MLP each count) per pipeline "
            "stage from the formula L_r* = sqrt(n L / (n + 2)) (integer minimiser of "
            "n ceil(L/L_r) + (n+2) L_r over the stage's sublayers), print the formula's curve over L_r and "
            "the predicted stored and transient mHC activation bytes per micro-batch on a stage, with and "
            "without mHC recompute (beyond what the residual model keeps)."
        ),
    )
    p.add_argument("--layers", type=int, required=True, help="transformer layers L")
    p.add_argument("--hidden", type=int, required=True, help="hidden size C")
    p.add_argument("--expansion-rate", type=int, default=4, help="streams n (default %(default)s)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (default %(default)s)")
    p.add_argument("--vpp", type=int, default=1, help="virtual chunks per stage (default %(default)s)")
    p.add_argument("--seq", type=int, default=4096, help="sequence length (default %(default)s)")
    p.add_argument("--micro-batch", type=int, default=1, help="micro-batch size (default %(default)s)")
    p.add_argument("--dtype-bytes", type=int, default=2, help="activation bytes per element (default %(default)s, bf16)")
    p.add_argument("--block-size", type=_block, default="auto", help="'auto' or a fixed L_r (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f} GiB"


def run(args) -> int:
    from ..recompute_plan import plan_recompute

    plan = plan_recompute(
        args.layers, args.hidden, args.expansion_rate, pp=args.pp, vpp=args.vpp, seq=args.seq,
        micro_batch=args.micro_batch, act_bytes=args.dtype_bytes, block_size=args.block_size,
    )
    if args.json:
        print(json.dumps(plan.as_dict()))
        return 0
    print(
        f"{plan.layers} layers, C={plan.hidden}, n={plan.expansion_rate}, PP={plan.pp} x VPP={plan.vpp}: "
        f"{plan.sublayers_per_stage} sublayers per stage chunk, {plan.tokens_per_microbatch} tokens per micro-batch"
    )
    print(f"L_r* = {plan.block_size_star:.2f} -> block size {plan.block_size} on every stage "
          f"({plan.blocks_per_stage} blocks per stage)\n")
    print(f"{'L_r':>4}{'n ceil(L/L_r)+(n+2)L_r':>24}{'stored':>12}{'transient':>12}")
    for row in plan.curve:
        mark = " <" if row["block_size"] == plan.block_size else ""
        print(f"{row['block_size']:>4}{row['spec_cost_C']:>22} C{_gib(row['stored_bytes']):>12}"
              f"{_gib(row['transient_bytes']):>12}{mark}")
    print(f"\nmHC activations per micro-batch on a stage: {_gib(plan.stored_bytes_without)} without recompute, "
          f"{_gib(plan.stored_bytes_with)} stored + {_gib(plan.transient_bytes_with)} transient with it")
    return 0
