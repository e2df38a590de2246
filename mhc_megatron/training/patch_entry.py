"""The patch route (patches/megatron-lm-pretrain-gpt-mhc.patch): a Megatron-LM ``pretrain_gpt.py``
that adds the mHC flags itself and runs without the launcher's hooks.

Four flags need those hooks (``--pipeline-schedule dualpipev``: the DualPipeV schedule;
``--mhc-log-interval N``: the diagnostics writer; ``--mhc-lr-step-decay``: the step LR schedule;
``--mhc-profile-ranges``: the NVTX ranges switched on), so the patched script refuses them while Megatron
parses, before it prints its arguments, instead of ignoring them. And a patched script run through
``mhc-pretrain-gpt --megatron-lm`` would add the flags twice: the launcher says so instead of
argparse's "conflicting option string".
"""

from __future__ import annotations

import argparse

PATCH = "patches/megatron-lm-pretrain-gpt-mhc.patch"


# why each launcher-only flag cannot run in the patched script
LAUNCHER_ONLY = {
    "--pipeline-schedule": "it needs the DualPipeV model builder and schedule; the patched script would run plain 1F1B",
    "--mhc-log-interval": "it needs the diagnostics recorder and writer; the patched script would log no mHC statistics",
    "--mhc-lr-step-decay": "it needs the lr-step-decay hook; the patched script would run --lr-decay-style alone",
    "--mhc-profile-ranges": "it needs the launcher to switch the mHC NVTX ranges on; the patched script would record none",
}


def _refuse(parser, flag: str, shown: str) -> None:
    parser.exit(2, (
        f"{parser.prog}: error: {flag}{shown}: not supported by the patched pretrain_gpt.py "
        f"({LAUNCHER_ONLY[flag]}); launch with mhc-pretrain-gpt instead (docs/megatron.md), or drop {flag}\n"))


class LauncherOnly(argparse._StoreAction):
    """A flag whose non-default values only ``mhc-pretrain-gpt`` implements: refuse them."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values != self.default:
            from .lr_schedule import format_step_decay

            shown = format_step_decay(values) if isinstance(values, tuple) else values  # the parsed step list
            _refuse(parser, self.option_strings[0], f" {shown}")
        super().__call__(parser, namespace, values, option_string)


class LauncherOnlySwitch(argparse._StoreTrueAction):
    """A ``store_true`` flag only ``mhc-pretrain-gpt`` implements: refuse it when given."""

    def __call__(self, parser, namespace, values, option_string=None):
        _refuse(parser, self.option_strings[0], "")


def add_mhc_patch_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The patched script's ``extra_args_provider``: the mHC flags, launcher-only values refused."""
    from .arguments import add_mhc_arguments

    return add_mhc_arguments(parser, launcher_only_action=LauncherOnly, launcher_only_switch_action=LauncherOnlySwitch)


def refuse_a_second_mhc_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Launcher provider, run before it adds the mHC flags: the entry script must not have added them."""
    if "--residual-mode" in parser._option_string_actions:
        raise ValueError(
            f"--megatron-lm: the checkout's pretrain_gpt.py already adds the mHC flags ({PATCH} is applied), "
            "and mhc-pretrain-gpt adds them again. Use one route: undo the patch (git apply -R "
            f"{PATCH}) and keep launching with mhc-pretrain-gpt (recommended), or run the patched script "
            "directly (python pretrain_gpt.py ...)"
        )
    return parser
