"""``mhc-megatron``: the command-line tools. Each subcommand lives in its own module and
registers itself through ``add_parser(subparsers)``; ``main`` only dispatches."""

from __future__ import annotations

import argparse
import sys

from . import (
    bench_cmd,
    convert_checkpoint_cmd,
    demo_cmd,
    plan_recompute_cmd,
    profile_cmd,
    simulate_pipeline_cmd,
    stability_cmd,
    validate_config_cmd,
)

_COMMANDS = (
    bench_cmd, convert_checkpoint_cmd, demo_cmd, plan_recompute_cmd, profile_cmd, simulate_pipeline_cmd, stability_cmd, validate_config_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mhc-megatron",
        description="Manifold-Constrained Hyper-Connections (mHC) for Megatron-LM: tools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ValueError as err:  # bad input: a clear message, no traceback
        print(f"mhc-megatron {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
