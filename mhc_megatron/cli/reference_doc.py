"""Write ``docs/flags.md`` from the argument parsers themselves, so the reference and ``--help``
cannot drift apart (``tests/test_docs.py`` compares the file with this output).

    python -m mhc_megatron.cli.reference_doc > docs/flags.md
"""

from __future__ import annotations

import argparse

HEADER = """# Flags and commands

Generated from the parsers by `python -m mhc_megatron.cli.reference_doc > docs/flags.md`; the
test suite checks that this file matches them, so it is what `--help` says.

"""


def _cell(text: str) -> str:
    return " ".join((text or "").split()).replace("|", "\\\\|").replace("%%", "%")


def _flag_rows(parser: argparse.ArgumentParser, actions=None) -> list[str]:
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for action in actions if actions is not None else parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
        if action.choices and not isinstance(action.choices, dict):
            name += " {" + ",".join(map(str, action.choices)) + "}"
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        default = "" if hidden or not action.option_strings else f"`{action.default}`"
        help_text = (action.help or "") % {"default": action.default} if action.help else ""
        rows.append(f"| {name} | {default} | {_cell(help_text)} |")
    return rows if len(rows) > 2 else []


def render() -> str:
    from . import build_parser
    from ..training.arguments import add_mhc_arguments

    out = [HEADER, "## `mhc-pretrain-gpt` (added to Megatron-LM's own flags)\n"]
    launcher = add_mhc_arguments(argparse.ArgumentParser(add_help=False))
    out += _flag_rows(launcher)
    out += ["", "Plus `--megatron-lm PATH` (default `$MEGATRON_LM`): run PATH/pretrain_gpt.py of a "
            "Megatron-LM checkout instead of the built-in entry.", "", "## `mhc-megatron` commands\n"]
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    for name, parser in sub.choices.items():
        out += [f"### `mhc-megatron {name}`", "", _cell(parser.description or helps.get(name, "")), ""]
        out += _flag_rows(parser)
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for group in nested:
            for sub_name, sub_parser in group.choices.items():
                out += ["", f"#### `mhc-megatron {name} {sub_name}`", "", _cell(sub_parser.description or ""), ""]
                out += _flag_rows(sub_parser)
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
