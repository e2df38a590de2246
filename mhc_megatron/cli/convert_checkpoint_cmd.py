"""``mhc-megatron convert-checkpoint``: torch_dist checkpoints between mhc-megatron and upstream
Megatron-LM's mHC."""

from __future__ import annotations

import json

FORMATS = ("upstream-mhc", "mhc-megatron")  # the same as mhc_megatron.checkpoints.layouts.FORMATS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert-checkpoint",
        help="convert a torch_dist checkpoint between mhc-megatron and upstream Megatron-LM's mHC",
        description=(
            "Convert a Megatron torch_dist checkpoint of an mHC GPT model between mhc-megatron's layout "
            "and upstream Megatron-LM's (--enable-mhc-connections). IN is a --save directory (with "
            "latest_checkpointed_iteration.txt) or one iteration directory; OUT gets the same structure. "
            "Any tensor/pipeline layout on either side: the tensors are read and written whole through "
            "megatron-core's dist_checkpointing and load into any layout. The model weights and the "
            "expansion rate / Sinkhorn metadata (in Megatron's args) are carried; the optimizer and RNG "
            "state are not (the args record that, so Megatron loads the weights alone). Converted to "
            "mhc-megatron, the args select upstream's numerics; the command prints the flags to continue with."
        ),
    )
    p.add_argument("--from", dest="source", required=True, choices=FORMATS, help="layout of IN")
    p.add_argument("--to", dest="target", required=True, choices=FORMATS, help="layout to write to OUT")
    p.add_argument("input", metavar="IN", help="the checkpoint to convert")
    p.add_argument("output", metavar="OUT", help="a new (or empty) directory for the converted checkpoint")
    p.add_argument("--json", action="store_true", help="print the conversion report as one JSON object")
    p.set_defaults(run=run)


def run(args) -> int:
    import dataclasses

    from ..checkpoints.convert import convert_checkpoint

    result = convert_checkpoint(args.input, args.output, args.source, args.target)
    if args.json:
        report = dataclasses.asdict(result)
        print(json.dumps(report, default=str, indent=2))
        return 0
    f = result.found
    print(f"converted {args.input} ({result.source}, {'HybridModel' if f.hybrid else 'GPT'}, n = {f.expansion_rate}, "
          f"C = {f.hidden_size}, {result.sinkhorn_iters} Sinkhorn iterations) -> {args.output} ({result.target}): "
          f"{result.converted} tensors")
    if result.not_carried:
        print(f"not carried: {len(result.not_carried)} optimizer/RNG entries (the checkpoint's args say so)")
    for note in result.notes:
        print(f"note: {note}")
    print("continue with: " + " ".join(result.continue_flags))
    return 0
