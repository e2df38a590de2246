"""YAML launch configurations: layout checks, flags, and validate-config on the examples."""

import json
import re
import os
import subprocess
import sys

import pytest
import yaml

from mhc_megatron.launch import check_layout, load_launch_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = {name: os.path.join(ROOT, "examples", name, "config.yaml") for name in ("moe_27b", "small_dense", "small_moe")}


def _cli(*args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "mhc_megatron.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _variant(tmp_path, base="moe_27b", **changes):
    """The example config with ``section.key`` values replaced (None deletes)."""
    with open(EXAMPLES[base]) as f:
        data = yaml.safe_load(f)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        if value is None:
            data[section].pop(key, None)
        else:
            data[section][key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_the_27b_layout():
    layout = check_layout(load_launch_config(EXAMPLES["moe_27b"]))
    assert (layout.world_size, layout.dp, layout.schedule, layout.layers_per_chunk, layout.microbatches) == (
        24, 8, "dualpipev", 5, 160)
    assert layout.expansion_rate == 4


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"parallel__pipeline_model_parallel_size": 4, "cluster__nodes": 4}, r"30 layers do not split evenly over 8 pipeline stages"),
        ({"cluster__nodes": 2}, r"16 GPUs .* do not split into tensor 1 x pipeline 3"),
        ({"parallel__expert_model_parallel_size": 16}, r"72 experts do not split over expert parallel size 16"),
        ({"training__global_batch_size": 40}, r"needs >= 6 micro-batches per step, the layout gives 5"),
        ({"training__global_batch_size": 1281}, r"global batch 1281 is not a multiple of micro-batch 1 x data parallel 8"),
        ({"model__untie_embeddings_and_output_weights": None}, "untie_embeddings_and_output_weights: true"),
        ({"mhc__expansion_rate": 0}, "expansion rate"),
        ({"parallel__tensor_model_parallel_size": 3, "cluster__nodes": 9}, "32 attention heads do not split over tensor parallel size 3"),
    ],
)
def test_inconsistent_layouts_are_named(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        check_layout(load_launch_config(_variant(tmp_path, **changes)))


def test_bad_files_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: {num_layers: 2}\n")
    with pytest.raises(ValueError, match="unknown section"):
        load_launch_config(str(bad))
    bad.write_text("model: {num-layers: 2}\n")
    with pytest.raises(ValueError, match="underscores"):
        load_launch_config(str(bad))


def test_flags_follow_megatron_spelling():
    cfg = load_launch_config(EXAMPLES["moe_27b"])
    argv = cfg.argv()
    assert argv[argv.index("--moe-layer-freq") + 1] == "([0]+[1]*29)"
    assert "--multi-latent-attention" in argv and "--pipeline-schedule" in argv
    out = _cli("launch-args", EXAMPLES["moe_27b"])
    assert out.returncode == 0 and out.stdout.startswith("--num-layers 30 --hidden-size 2560")
    assert "'([0]+[1]*29)'" in out.stdout  # shell-quoted
    lines = _cli("launch-args", "--lines", EXAMPLES["moe_27b"]).stdout.splitlines()
    assert lines == argv


@pytest.mark.slow
def test_validate_config_builds_the_27b_model_on_the_meta_device():
    out = _cli("validate-config", EXAMPLES["moe_27b"], "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["total_parameters"] == pytest.approx(27.0e9, rel=0.01)  # the paper's "about 27.0B"
    assert 3.5e9 < report["active_parameters"] < 4.6e9
    assert report["mhc_parameters"] == 60 * 2560 * 4 * (16 + 8) + 60 * (24 + 3)  # phi + bias + alpha per sublayer
    assert [r["stages"] for r in report["per_rank"]] == [[0, 5], [1, 4], [2, 3]]
    assert all(0 < r["memory_gib"] < 80 for r in report["per_rank"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["small_dense", "small_moe"])
def test_validate_config_small_examples(name):
    out = _cli("validate-config", EXAMPLES[name])
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{name}/config.yaml: OK" in out.stdout


@pytest.mark.slow
def test_validate_config_takes_the_expert_parallel_overlap_example():
    """--overlap-moe-expert-parallel-comm is a schedule choice megatron-core allows only with EP > 1;
    the single-process meta-device build must not see it."""
    path = os.path.join(ROOT, "examples", "small_moe", "ep2_overlap.yaml")
    out = _cli("validate-config", path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ep2_overlap.yaml: OK" in out.stdout and "EP 2" in out.stdout


def test_validate_config_exits_2_on_a_bad_layout(tmp_path):
    out = _cli("validate-config", _variant(tmp_path, **{"parallel__pipeline_model_parallel_size": 4, "cluster__nodes": 4}))
    assert out.returncode == 2 and "do not split evenly" in out.stderr


def test_sbatch_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "examples", "moe_27b", "sbatch.sh")]).returncode == 0


# the user's mistakes in a config, each refused naming the key, the value and the fix
@pytest.mark.parametrize("key,value,says", [
    ("model__moe_token_dispatcher_type", "alltoal", r"model\.moe_token_dispatcher_type: 'alltoal' is not a choice of "
     r"--moe-token-dispatcher-type \(.*alltoall.*\): use one of them \(did you mean 'alltoall'\?\)"),
    ("model__transformer_impl", "transformer-engine", r"model\.transformer_impl: 'transformer-engine' is not a choice of "
     r"--transformer-impl .*\(did you mean 'transformer_engine'\?\)"),
    ("model__tokenizer_type", "HuggingFaceTokenizr", r"model\.tokenizer_type: 'HuggingFaceTokenizr' is not a choice of "
     r"--tokenizer-type .*\(did you mean 'HuggingFaceTokenizer'\?\)"),
])
def test_misspelt_values_are_named(tmp_path, key, value, says):
    with pytest.raises(ValueError, match=says):
        check_layout(load_launch_config(_variant(tmp_path, **{key: value})))


@pytest.mark.parametrize("key", ["num_layers", "seq_length"])
def test_missing_model_keys_are_named(tmp_path, key):
    with pytest.raises(ValueError, match=rf"model\.{key} is missing: Megatron has no default for it; add '{key}: N' under model"):
        check_layout(load_launch_config(_variant(tmp_path, **{f"model__{key}": None})))


def test_malformed_yaml_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: 2\n hidden_size: 64\n")  # line 3 dedented by one
    with pytest.raises(ValueError, match=r"bad\.yaml: not valid YAML at line 3, column 2: .*; fix the file"):
        load_launch_config(str(bad))


@pytest.mark.parametrize("vocab,divisible,tp,padded", [(129280, 128, 1, 129280), (50257, 128, 2, 50432),
                                                       (50257, None, 1, 50304), (1000, 64, 4, 1024)])
def test_validate_config_reports_megatrons_padded_vocabulary(tmp_path, vocab, divisible, tp, padded):
    from mhc_megatron.launch.vocabulary import vocabulary

    cfg = load_launch_config(_variant(tmp_path, model__vocab_size=vocab, model__make_vocab_size_divisible_by=divisible))
    report = vocabulary(cfg, tp)
    assert report["padded_vocab_size"] == padded  # ceil(vocab / (divisible x TP)) x divisible x TP, 128 by default
    assert report["meta_build_padded_vocab_size"] == -(-vocab // (divisible or 128)) * (divisible or 128)


def test_validate_config_says_a_huggingface_tokenizer_decides_the_vocabulary(tmp_path):
    from mhc_megatron.launch.vocabulary import vocabulary

    hf = vocabulary(load_launch_config(_variant(tmp_path, model__tokenizer_type="HuggingFaceTokenizer")), 1)["note"]
    assert hf.startswith("tokenizer_type HuggingFaceTokenizer: Megatron uses the tokenizer's own vocabulary size")
    assert "with --tokenizer-type HuggingFaceTokenizer" in vocabulary(load_launch_config(EXAMPLES["moe_27b"]), 1)["note"]
    assert vocabulary(load_launch_config(_variant(tmp_path, model__tokenizer_type="NullTokenizer")), 1)["note"] == ""


def test_validate_config_warns_for_an_expansion_rate_without_kernels():
    from mhc_megatron.launch.estimate import ParameterCounts, _warnings

    counts = ParameterCounts(total=1000, active=1000, expert=0, mhc=250, per_layer={}, embedding=0, output=0)
    (warning,) = _warnings("mhc", 64, counts)
    assert warning.startswith("expansion_rate 64: no Triton kernel") and "n^2" in warning and "25.00%" in warning
    assert _warnings("mhc", 8, counts) == [] and _warnings("residual", 64, counts) == []


@pytest.mark.slow
def test_validate_config_prints_the_warning_and_the_mhc_share(tmp_path):
    out = _cli("validate-config", _variant(tmp_path, "small_dense", mhc__expansion_rate=16))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mhc-megatron validate-config: WARNING: expansion_rate 16: no Triton kernel" in out.stderr
    assert re.search(r"M in mHC coefficients \(\d+\.\d{3}% of the total\)", out.stdout), out.stdout
    assert "vocabulary: 50304 padded to 50304 (a multiple of make_vocab_size_divisible_by 128 x TP 1)" in out.stdout
