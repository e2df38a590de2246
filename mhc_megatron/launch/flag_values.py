"""Every key of a launch configuration checked against the parser ``mhc-pretrain-gpt`` runs.

The parser is Megatron's own (``add_megatron_arguments``) plus the mHC flags, built once; each
key must name one of its flags, and its value must be what that flag's action takes: ``true`` /
``false`` for switches, a value its ``type`` converts and one of its ``choices`` for the rest, a
list only where the flag takes several values. The choices are read from the parser, never
copied, so a megatron-core upgrade that changes them is followed. Keys that ``validate-config``
drops for its meta-device build (the dispatcher, the transformer implementation, the tokenizer)
are checked here too, so a typo in them cannot pass as "OK".
"""

from __future__ import annotations

import argparse
import difflib
import functools

from .config import LaunchConfig


@functools.lru_cache(maxsize=1)
def launcher_parser() -> argparse.ArgumentParser:
    """The flags of ``mhc-pretrain-gpt``: Megatron's parser with the mHC group added."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.training.arguments import add_megatron_arguments

        from ..training.arguments import add_mhc_arguments

        parser = argparse.ArgumentParser(prog="mhc-pretrain-gpt", allow_abbrev=False)
        return add_mhc_arguments(add_megatron_arguments(parser))


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_flag_values(cfg: LaunchConfig) -> None:
    """Raise ``ValueError`` for the first key that is no flag or whose value the flag refuses."""
    actions = launcher_parser()._option_string_actions
    for key, value in cfg.flags.items():
        where = f"{cfg.path}: {cfg.sections.get(key, '?')}.{key}"
        flag = "--" + key.replace("_", "-")
        action = actions.get(flag)
        if action is None:
            names = [o[2:].replace("-", "_") for o in actions if o.startswith("--")]
            raise ValueError(f"{where}: no flag {flag} in mhc-pretrain-gpt (Megatron-LM or mHC){_suggest(key, names)}; "
                             "fix the name or remove the key")
        if value is None:
            continue
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise ValueError(f"{where}: {flag} is a switch, got {value!r}: write true (add the flag) or "
                                 "false (leave it out)")
            continue
        if isinstance(value, bool):
            if value is False:
                continue  # false leaves the flag out, as for a switch
            raise ValueError(f"{where}: {flag} takes a value, got true: write the value")
        many = action.nargs in ("*", "+") or isinstance(action.nargs, int) and action.nargs > 1
        if isinstance(value, list) and not many:
            raise ValueError(f"{where}: {flag} takes one value, got the list {value!r}: write one value")
        for item in value if isinstance(value, list) else [value]:
            _check_one(where, flag, action, item)


def _check_one(where: str, flag: str, action: argparse.Action, item) -> None:
    text = str(item)
    converted = text
    if callable(action.type):
        try:
            converted = action.type(text)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            kind = getattr(action.type, "__name__", "value")
            raise ValueError(f"{where}: {flag} takes {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {item!r} "
                             f"({err}): fix the value") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(str(c) for c in action.choices)
        raise ValueError(f"{where}: {item!r} is not a choice of {flag} ({choices}): use one of them"
                         f"{_suggest(text, action.choices)}")
