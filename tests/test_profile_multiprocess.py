"""mhc-megatron profile --config of a launch of more than one process: the real launch through torchrun
(residual, then as configured), timed by Megatron's own iteration log. Run here with the functional
tests' entry (tests/functional/launch_entry.py: Megatron on the CPU with gloo)."""

import json
import os
import sys

import pytest

from mhc_megatron.bench.profile_multiprocess import iteration_times, launch_world_size, run_flags
from mhc_megatron.cli import main as cli_main
from mhc_megatron.launch.config import LaunchConfig, load_launch_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "tests", "functional", "launch_entry.py")

# the functional tests' TINY_GPT (tests/functional/harness.py) as a launch config, TP 2, with what
# the profile must not carry into its runs: a run length, data path, checkpoint and TensorBoard directory
TP2_LAUNCH = """\
model:
  num_layers: 2
  hidden_size: 64
  num_attention_heads: 4
  seq_length: 32
  max_position_embeddings: 32
  vocab_size: 128
  make_vocab_size_divisible_by: 32
  transformer_impl: local
  normalization: RMSNorm
  no_gradient_accumulation_fusion: true
  no_persist_layer_norm: true
  no_masked_softmax_fusion: true
  no_bias_gelu_fusion: true
  no_bias_dropout_fusion: true
  no_rope_fusion: true
  hidden_dropout: 0
  attention_dropout: 0
  use_cpu_initialization: true
mhc:
  residual_mode: mhc
  expansion_rate: 2
  mhc_sinkhorn_iters: 10
parallel:
  tensor_model_parallel_size: 2
training:
  micro_batch_size: 2
  global_batch_size: 2
  train_iters: 1000
  lr: 1.0e-3
  lr_decay_style: constant
  lr_warmup_iters: 100
  seed: 1234
data:
  tokenizer_type: NullTokenizer
  num_workers: 0
  data_path: DATA
checkpoint:
  save: SAVE
  save_interval: 1
logging:
  log_interval: 10
  tensorboard_dir: TB
"""


def _launch(tmp_path, text=TP2_LAUNCH) -> str:
    path = tmp_path / "launch.yaml"
    path.write_text(text.replace("DATA", str(tmp_path / "data")).replace("SAVE", str(tmp_path / "save"))
                    .replace("TB", str(tmp_path / "tb")))
    return str(path)


@pytest.mark.parametrize("flags,world", [
    ({}, 1),
    ({"tensor_model_parallel_size": 2}, 2),
    ({"pipeline_model_parallel_size": 2}, 2),
    ({"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "context_parallel_size": 2}, 8),
    ({"num_experts": 8, "expert_model_parallel_size": 4}, 4),  # data parallel 4 holds the 4 expert ranks
    ({"tensor_model_parallel_size": 2, "expert_model_parallel_size": 2}, 4),  # expert TP defaults to TP: 2 x 2
    ({"tensor_model_parallel_size": 2, "expert_model_parallel_size": 2, "expert_tensor_parallel_size": 1}, 2),
    ({"tensor_model_parallel_size": 2, "expert_model_parallel_size": 4, "expert_tensor_parallel_size": 1,
      "pipeline_model_parallel_size": 2}, 8),
])
def test_world_size_is_the_smallest_megatron_accepts(flags, world):
    assert launch_world_size(LaunchConfig(path="x.yaml", flags=flags)) == world


def test_residual_run_drops_expansion_rate_and_every_mhc_flag(tmp_path):
    cfg = load_launch_config(_launch(tmp_path))
    residual, mhc = (run_flags(cfg, mode, steps=4, warmup=2) for mode in ("residual", "mhc"))
    assert residual[:2] == ["--residual-mode", "residual"] and residual.count("--residual-mode") == 1
    assert "--expansion-rate" not in residual and not [f for f in residual if f.startswith("--mhc-")]
    assert mhc[:2] == ["--residual-mode", "mhc"] and mhc.count("--residual-mode") == 1
    assert mhc[mhc.index("--expansion-rate") + 1] == "2" and mhc[mhc.index("--mhc-sinkhorn-iters") + 1] == "10"
    for run in (residual, mhc):
        # the profile's length, log and evaluation replace the config's; no data path, checkpoint or TensorBoard
        assert run[-9:] == ["--train-iters", "6", "--log-interval", "1", "--eval-iters", "0", "--eval-interval",
                            "1000000000", "--mock-data"]
        assert run.count("--train-iters") == 1 and run.count("--log-interval") == 1
        for gone in ("--data-path", "--save", "--save-interval", "--tensorboard-dir", "--lr-warmup-iters"):
            assert gone not in run
        assert run[run.index("--tensor-model-parallel-size") + 1] == "2" and "--lr" in run
    # the rest is the same in both runs
    def without(run, *flags):
        return [f for i, f in enumerate(run) if f not in flags and (i == 0 or run[i - 1] not in flags)]

    assert without(mhc, "--residual-mode", "--expansion-rate", "--mhc-sinkhorn-iters") == without(residual, "--residual-mode")


def test_iteration_times_are_read_from_megatrons_training_log():
    log = (" [2026-12-02 18:24:58] iteration        1/       5 | consumed samples:            2 | elapsed time per "
           "iteration (ms): 90.5 | learning rate: 1.000000E-03 | global batch size:     2 | lm loss: 4.9E+00 |\n"
           "noise elapsed time per iteration (ms): 7.0\n"
           " [2026-12-02 18:24:58] iteration        2/       5 | consumed samples:            4 | elapsed time per "
           "iteration (ms): 76.8 | learning rate: 1.000000E-03 |\n")
    assert iteration_times(log) == {1: 90.5, 2: 76.8}


@pytest.mark.slow
def test_profile_of_a_tp2_launch_runs_both_modes_through_torchrun(tmp_path, capsys):
    path = _launch(tmp_path)
    out_dir = tmp_path / "out"
    assert cli_main(["profile", "--config", path, "--entry", ENTRY, "--steps", "3", "--warmup", "2",
                     "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "the real launch in 2 processes (TP 2 x PP 1" in out and "CPU times" in out and "mock data" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("residual ", "mhc ")) and " run: " not in line]
    assert [r[0] for r in rows] == ["residual", "mhc"] and rows[1][3].endswith("%")
    report = json.loads((out_dir / "profile.json").read_text())
    residual, mhc = report["results"]
    assert (residual["mode"], mhc["mode"]) == ("residual", "mhc") and report["device"] == "cpu"
    for r in (residual, mhc):
        assert r["step_ms_median"] > 0 and r["tokens_per_s"] > 0 and r["timed_iterations"] == 3
        assert len(r["iteration_ms"]) == 5  # Megatron logged every iteration: 2 warm-up + 3 timed
        cmd = r["command"]
        assert cmd[cmd.index("--nproc-per-node") + 1] == "2" and ENTRY in cmd
        assert f"{r['mode']} run: " in out and os.path.exists(r["log"])
    assert residual["overhead_percent"] is None
    assert mhc["overhead_percent"] == pytest.approx(100 * (mhc["step_ms_median"] / residual["step_ms_median"] - 1),
                                                    abs=0.01)
    assert "--expansion-rate" not in residual["command"] and "--expansion-rate" in mhc["command"]
    for gone in ("save", "tb"):  # the config's checkpoint and TensorBoard directories were not used
        assert not (tmp_path / gone).exists()


FAILING_ENTRY = """\
import os, sys
if os.environ.get("RANK") == "1":
    for i in range(1, 1 + int(os.environ["ENTRY_ITERATIONS"])):  # Megatron's log line, a run that fails after it
        print(f" iteration {i:8d}/      13 | elapsed time per iteration (ms): 5.0 |")
    print("rank 1 went wrong here", flush=True)
    sys.exit(int(os.environ["ENTRY_RC"]))
"""


@pytest.mark.parametrize("rc,iterations,match", [("3", "13", "the residual run exited with 1"),
                                                 ("0", "3", "the residual run printed no iteration time after the warm-up")])
def test_a_failed_run_is_named_with_its_log_tail(tmp_path, capsys, monkeypatch, rc, iterations, match):
    entry = tmp_path / "entry.py"
    entry.write_text(FAILING_ENTRY)
    monkeypatch.setenv("ENTRY_RC", rc)
    monkeypatch.setenv("ENTRY_ITERATIONS", iterations)
    assert cli_main(["profile", "--config", _launch(tmp_path), "--entry", str(entry), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert match in err and "--nproc-per-node 2" in err and "rank 1 went wrong here" in err


@pytest.mark.skipif(sys.platform != "linux", reason="torch.cuda.device_count on this machine")
def test_without_the_gpus_the_default_entry_is_refused(tmp_path, capsys):
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the 2 GPUs the launch needs")
    assert cli_main(["profile", "--config", _launch(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "the launch needs 2 processes, one GPU each" in capsys.readouterr().err


def test_json_report_from_the_runs_iteration_logs(tmp_path, capsys, monkeypatch):
    """--json prints the report; the medians are of the iterations after the warm-up (runs faked: their logs)."""
    from mhc_megatron.bench import profile_multiprocess as pm

    logs = {"residual": [50.0, 30.0, 10.0, 11.0, 15.0], "mhc": [90.0, 60.0, 15.0, 18.0, 16.5]}

    def fake_run(mode, nproc, entry, flags, out_dir, timeout):
        cmd = pm.torchrun_command(nproc, entry, flags, 1234)
        log = "".join(f" iteration {i:8d}/       5 | elapsed time per iteration (ms): {t} |\n"
                      for i, t in enumerate(logs[mode], 1))
        return pm.MultiProcessRun(mode, cmd, 0, log, pm.iteration_times(log))

    monkeypatch.setattr(pm, "run_one", fake_run)
    assert cli_main(["profile", "--config", _launch(tmp_path), "--entry", ENTRY, "--steps", "3", "--warmup", "2",
                     "--out", str(tmp_path / "o"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    residual, mhc = report["results"]
    assert (residual["step_ms_median"], mhc["step_ms_median"]) == (11.0, 16.5)
    assert mhc["overhead_percent"] == 50.0 and residual["tokens_per_s"] == round(2 * 32 / 0.011, 1)
    assert report["processes"] == 2 and report["data"].startswith("mock") and report["device"] == "cpu"
    assert json.loads((tmp_path / "o" / "profile.json").read_text()) == report


def test_entry_is_refused_for_a_one_process_profile(tmp_path, capsys):
    assert cli_main(["profile", "--entry", ENTRY, "--out", str(tmp_path)]) == 2
    assert "--entry runs a launch of more than one process" in capsys.readouterr().err


@pytest.mark.parametrize("edit,modes,match", [
    (("residual_mode: mhc", "residual_mode: residual"), None, "got modes residual,residual: set residual_mode: mhc"),
    (None, "mhc,residual", "the profile compares hc or mhc against residual, got modes mhc,residual"),
])
def test_modes_are_residual_first_then_hc_or_mhc(tmp_path, edit, modes, match):
    from mhc_megatron.bench.profile_multiprocess import profile_multiprocess

    text = TP2_LAUNCH.replace(*edit) if edit else TP2_LAUNCH
    with pytest.raises(ValueError, match=match):
        profile_multiprocess(_launch(tmp_path, text), modes=tuple(modes.split(",")) if modes else None,
                             entry=ENTRY, out_dir=str(tmp_path / "o"))
