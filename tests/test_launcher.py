"""The mhc-pretrain-gpt launcher: flags, validation, and the model it builds."""

import argparse
import os
import subprocess
import sys

import pytest

from launcher_workers import TINY_GPT_ARGS, build_from_cli, dualpipev_from_cli, hybrid_from_cli
from mcore_helpers import run_distributed
from mhc_megatron.training import mhc_settings_from_args
from mhc_megatron.training.arguments import add_mhc_arguments

LAUNCHER = [sys.executable, "-m", "mhc_megatron.training.launcher"]


def _run(args, timeout=300):
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", PYTHONWARNINGS="ignore")
    return subprocess.run(LAUNCHER + args, capture_output=True, text=True, timeout=timeout, env=env)


def test_help_lists_megatron_and_mhc_flags():
    out = _run(["--help"])
    assert out.returncode == 0, out.stderr
    for flag in ("--residual-mode", "--expansion-rate", "--mhc-sinkhorn-iters", "--megatron-lm",
                 "--tensor-model-parallel-size", "--pipeline-model-parallel-size"):
        assert flag in out.stdout, flag


def test_expansion_rate_without_mhc_mode_is_refused():
    out = _run([*TINY_GPT_ARGS, "--expansion-rate", "4"])
    assert out.returncode == 2
    assert "--expansion-rate 4 needs --residual-mode hc or mhc" in out.stderr


def test_bad_expansion_rate_is_refused_before_training():
    out = _run([*TINY_GPT_ARGS, "--residual-mode", "mhc", "--expansion-rate", "0"])
    assert out.returncode == 2
    assert "expansion rate must be an integer >= 1, got 0" in out.stderr


def test_upstream_mhc_flag_is_refused_by_the_real_parser():
    """With Megatron-LM main (0.20) the parser has --enable-mhc-connections (a TransformerConfig
    field) and we refuse the pair; megatron-core 0.19 does not know the flag at all."""
    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig

    out = _run([*TINY_GPT_ARGS, "--residual-mode", "mhc", "--enable-mhc-connections"])
    assert out.returncode == 2
    if "enable_mhc_connections" in {f.name for f in dataclasses.fields(TransformerConfig)}:
        assert "--residual-mode mhc and upstream Megatron's --enable-mhc-connections" in out.stderr, out.stderr
    else:
        assert "unrecognized arguments: --enable-mhc-connections" in out.stderr, out.stderr


def test_reference_only_numerics_with_triton_are_refused_at_parse_time():
    out = _run([*TINY_GPT_ARGS, "--residual-mode", "mhc", "--mhc-sinkhorn-order", "rows-first", "--mhc-kernels", "triton"])
    assert out.returncode == 2
    assert "--mhc-sinkhorn-order rows-first: implemented in the PyTorch reference ops only" in out.stderr
    assert "add --mhc-kernels reference" in out.stderr


def test_missing_checkout_is_named():
    out = _run(["--megatron-lm", "/nonexistent", *TINY_GPT_ARGS])
    assert out.returncode == 2 and "no pretrain_gpt.py there" in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode,n", [("mhc", 3), ("hc", 2), ("residual", None)])
def test_cli_builds_the_mhc_model(mode, n):
    extra = ["--residual-mode", mode] + (["--expansion-rate", str(n)] if n else [])
    (result,) = run_distributed(build_from_cli, 1, extra)
    settings = result["settings"]
    assert settings.mode == mode and settings.expansion_rate == (n or 4)
    expected = "MHCSublayerInput" if mode != "residual" else "RMSNorm"
    assert result["input_module"] == expected
    assert result["final_norm"] == ("MHCStreamContraction" if mode != "residual" else "RMSNorm")
    assert result["loss"] > 0


def _parse(argv):
    parser = add_mhc_arguments(argparse.ArgumentParser())
    return parser.parse_args(argv)


def test_settings_defaults_and_upstream_flag_clash():
    s = mhc_settings_from_args(_parse(["--residual-mode", "mhc"]))
    assert s.expansion_rate == 4 and s.sinkhorn_iters == 20 and s.alpha_init == 0.01
    args = _parse(["--residual-mode", "mhc"])
    args.enable_mhc_connections = True  # upstream Megatron-LM main's own flag
    with pytest.raises(ValueError, match="use one of them"):
        mhc_settings_from_args(args)


def test_prebuilt_dataset_helpers_skip_the_make_step():
    """The wheel ships the compiled helpers and no Makefile: skip the make step. A Megatron-LM
    checkout has the Makefile (and no compiled helpers until built): keep Megatron's step."""
    import importlib.util

    from mhc_megatron import hooks

    import megatron.core.datasets as datasets
    import megatron.training.initialize as initialize

    from mhc_megatron.training.launcher import skip_dataset_helper_compile_if_prebuilt

    prebuilt = importlib.util.find_spec("megatron.core.datasets.helpers_cpp") is not None and not os.path.exists(
        os.path.join(os.path.dirname(datasets.__file__), "Makefile"))
    original = initialize._compile_dependencies
    try:
        assert skip_dataset_helper_compile_if_prebuilt() == prebuilt
        assert (initialize._compile_dependencies is not original) == prebuilt
    finally:
        hooks.uninstall("dataset-helpers")
    assert initialize._compile_dependencies is original


@pytest.mark.slow
def test_dualpipev_from_the_command_line():
    ranks = run_distributed(dualpipev_from_cli, 2, ["--residual-mode", "mhc", "--expansion-rate", "4"])
    assert [r["layer_numbers"] for r in ranks] == [[[1], [4]], [[2], [3]]]  # the V
    assert [r["pre_post"] for r in ranks] == [[(True, False), (False, True)], [(False, False), (False, False)]]
    assert [r["holds_batch"] for r in ranks] == [[True, True], [False, False]]
    # the loss is computed on rank 0 and handed to the last rank, where Megatron logs it
    assert ranks[0]["losses"] == [] and len(ranks[1]["losses"]) == 4 and all(x > 0 for x in ranks[1]["losses"])
    from dualpipev_reference import unmarked, dualpipev_order

    assert [r["executed"] for r in ranks] == [unmarked(dualpipev_order(k, 2, 4)) for k in range(2)]
    assert all(r["post_res_stream"] for r in ranks)
    assert all(r["grads"] == r["params"] for r in ranks)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--pipeline-schedule", "dualpipev", "--num-virtual-stages-per-pipeline-rank", "3"], "got --num-virtual-stages-per-pipeline-rank 3"),
        (["--pipeline-schedule", "dualpipev", "--num-layers-per-virtual-pipeline-stage", "2"], "drop --num-layers-per-virtual"),
    ],
)
def test_dualpipev_launch_refusals(argv, match):
    from mhc_megatron.training.launcher import apply_schedule_defaults

    with pytest.raises(ValueError, match=match):
        apply_schedule_defaults(argv)


def test_dualpipev_sets_two_virtual_stages():
    from mhc_megatron.training.launcher import apply_schedule_defaults

    assert apply_schedule_defaults(["--pipeline-schedule", "dualpipev"])[-2:] == [
        "--num-virtual-stages-per-pipeline-rank", "2"]
    assert apply_schedule_defaults(["--pp", "2"]) == ["--pp", "2"]


@pytest.mark.slow
def test_hybrid_layer_pattern_builds_the_mhc_hybrid_model():
    (result,) = run_distributed(hybrid_from_cli, 1, ["--residual-mode", "mhc", "--expansion-rate", "2"])
    assert result["types"] == ["MHCSublayerInput"] * 4 and result["loss"] > 0


@pytest.mark.slow
def test_cli_builds_mhc_with_multi_token_prediction():
    (result,) = run_distributed(build_from_cli, 1, ["--residual-mode", "mhc", "--mtp-num-layers", "1", "--position-embedding-type", "none"])
    assert result["input_module"] == "MHCSublayerInput" and result["loss"] > 0
