"""The demo end to end (tiny settings, subprocess: it owns its process group)."""

import json
import math
import subprocess
import sys

import pytest

UNIFORM = math.log(256)  # the loss of guessing bytes uniformly
KEYS = {"diverged_at", "max_loss_spike", "final_train_loss", "final_val_loss", "max_grad_norm", "composite_forward_gain", "tokens_per_s"}


@pytest.mark.slow
def test_demo_writes_results_and_plots(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "mhc_megatron.cli", "demo", "--steps", "12", "--layers", "2", "--hidden", "32",
           "--seq-len", "32", "--batch-size", "4", "--eval-every", "6", "--lr", "0.02", "--no-progress", "--device", "cpu",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "overhead" in proc.stdout and "mhc" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["residual", "hc", "mhc"]
    for mode, r in results.items():
        assert KEYS <= set(r), mode
        # a model that learned nothing scores ln 256 = 5.55 nats per byte; 12 steps of this tiny model
        # reach about 3.3 (byte frequencies learned), so 4.5 fails an untrained model and passes a trained one
        assert 0 < r["final_val_loss"] < UNIFORM - 1.0, (mode, r["final_val_loss"])
        assert r["tokens_per_s"] > 0 and r["max_grad_norm"] > 0
    assert results["residual"]["composite_forward_gain"] == 1.0
    assert abs(results["mhc"]["composite_forward_gain"] - 1.0) < 1e-4  # rows of H_res sum to 1
    assert results["hc"]["composite_forward_gain"] >= 1.0
    assert len(results["mhc"]["gains"]["single_forward_gain"]) == 4  # 2 layers x 2 sublayers
    for png in ("loss_curves.png", "gains.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_rejects_bad_options(capsys):
    from mhc_megatron.cli import main

    assert main(["demo", "--hidden", "30", "--heads", "4"]) == 2
    assert "--hidden 30 must be divisible by --heads 4" in capsys.readouterr().err
    assert main(["demo", "--modes", "residual,bogus"]) == 2
    assert "residual mode must be one of" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_hybrid_model(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "mhc_megatron.cli", "demo", "--model", "hybrid", "--modes", "residual,mhc",
           "--steps", "8", "--layers", "2", "--hidden", "32", "--seq-len", "32", "--batch-size", "4",
           "--eval-every", "4", "--no-progress", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HybridModel" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert len(results["mhc"]["gains"]["single_forward_gain"]) == 4  # pattern '*-*-': one sublayer per layer
    assert abs(results["mhc"]["composite_forward_gain"] - 1.0) < 1e-4


def test_stress_preset_settings_and_explicit_options_win():
    from mhc_megatron.demo.config import PRESETS, preset_config

    stress = preset_config("stress")
    assert stress.preset == "stress" and stress.layers > preset_config().layers and stress.lr > preset_config().lr
    assert {k: getattr(stress, k) for k in PRESETS["stress"]} == PRESETS["stress"]
    assert preset_config("stress", layers=2, lr=None).layers == 2  # given options override, None = not given
    with pytest.raises(ValueError, match="--preset must be one of default, stress, got 'wild'"):
        preset_config("wild")


def test_divergence_is_read_from_the_loss_curve():
    from mhc_megatron.demo.divergence import diverged_at, max_spike

    steady = [(1, 5.6), (2, 4.0), (3, 3.0), (4, 2.5)]
    assert diverged_at(steady, 256, warmup=1) is None and max_spike(steady) == pytest.approx(0.0)
    back_to_uniform = [(1, 5.6), (2, 3.0), (3, 4.5), (4, 5.6), (5, 7.0)]
    assert diverged_at(back_to_uniform, 256, warmup=1) == 4
    assert max_spike(back_to_uniform) == pytest.approx(4.0)
    assert diverged_at([(1, 5.6), (2, 3.0), (3, float("nan"))], 256, warmup=1) == 3
    assert diverged_at([(1, 5.7), (2, 3.0)], 256, warmup=1) is None  # the first steps may sit at uniform


def test_report_says_which_mode_diverged():
    from mhc_megatron.demo.config import preset_config
    from mhc_megatron.demo.report import format_table
    from mhc_megatron.demo.train import ModeResult

    def result(mode, losses, gain, diverged):
        return ModeResult(mode, train_loss=list(enumerate(losses, 1)), val_loss=[(len(losses), losses[-1])],
                          grad_norms=[1.0], seconds=1.0, timed_tokens=100, gains={"composite_forward_gain": gain,
                          "composite_backward_gain": gain}, diverged_at=diverged)

    results = {"hc": result("hc", [5.5, 3.0, float("nan")], 3.1e4, 3), "mhc": result("mhc", [5.5, 3.0, 2.8], 1.0, None)}
    table = format_table(results, preset_config("stress"), "cpu")
    hc_row = next(line for line in table.splitlines() if line.startswith("hc "))
    mhc_row = next(line for line in table.splitlines() if line.startswith("mhc "))
    assert hc_row.endswith("step 3") and mhc_row.endswith("-")
    assert "hc diverged at step 3 (training loss nan; composite gain 3.1e+04)" in table
    assert "mhc trained through all 3 steps" in table and "(preset stress)" in table
