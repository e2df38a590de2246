"""The Megatron-LM checkout patch must keep calling names that exist, with working signatures."""

import argparse
import re
from pathlib import Path

import mhc_megatron.training as training

PATCH = Path(__file__).resolve().parents[1] / "patches" / "megatron-lm-pretrain-gpt-mhc.patch"


def added_lines():
    return [l[1:] for l in PATCH.read_text().splitlines() if l.startswith("+") and not l.startswith("+++")]


def test_patch_imports_exist():
    added = "\n".join(added_lines())
    block = re.search(r"from mhc_megatron\.training import \((.*?)\)", added, re.S).group(1)
    names = [n.strip() for n in re.sub(r"#.*", "", block).split(",") if n.strip()]
    assert names == ["add_mhc_arguments", "apply_mhc_to_gpt_config", "chain_args_providers", "mhc_settings_from_args"]
    for name in names:
        assert callable(getattr(training, name)), name


def test_patched_calls_work():
    # extra_args_provider=chain_args_providers(<modelopt or None>, add_mhc_arguments)
    parser = training.chain_args_providers(None, training.add_mhc_arguments)(argparse.ArgumentParser())
    args = parser.parse_args(["--residual-mode", "mhc", "--expansion-rate", "4"])
    settings = training.mhc_settings_from_args(args)
    assert settings.mode == "mhc" and settings.expansion_rate == 4
    assert "model_cfg = apply_mhc_to_gpt_config(model_cfg, mhc_settings_from_args(args))" in "\n".join(added_lines())
