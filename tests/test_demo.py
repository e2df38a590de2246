"""The demo end to end (tiny settings, subprocess: it owns its process group)."""

import json
import subprocess
import sys

import pytest

KEYS = {"final_train_loss", "final_val_loss", "max_grad_norm", "composite_forward_gain", "tokens_per_s"}


@pytest.mark.slow
def test_demo_writes_results_and_plots(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "mhc_megatron.cli", "demo", "--steps", "12", "--layers", "2", "--hidden", "32",
           "--seq-len", "32", "--batch-size", "4", "--eval-every", "6", "--no-progress", "--device", "cpu",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "overhead" in proc.stdout and "mhc" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["residual", "hc", "mhc"]
    for mode, r in results.items():
        assert KEYS <= set(r), mode
        assert 0 < r["final_val_loss"] < 6 and r["tokens_per_s"] > 0 and r["max_grad_norm"] > 0
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
