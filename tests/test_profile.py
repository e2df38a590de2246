"""mhc-megatron profile on a tiny CPU model: timings, overhead and breakdown are consistent."""

import json
import os

import pytest

from mhc_megatron.bench.profile import ProfileConfig, run_profile
from mhc_megatron.cli import main as cli_main

TINY = dict(layers=2, hidden=32, heads=2, seq_len=16, batch_size=2, steps=5, warmup=1, profile_steps=1, device="cpu")


@pytest.mark.parametrize("recompute", [False, True])
def test_profile_breakdown_agrees_with_what_is_measured_separately(tmp_path, recompute):
    report = run_profile(ProfileConfig(modes=("residual", "hc", "mhc"), recompute=recompute, **TINY), out_dir=str(tmp_path))
    res, hc, mhc = report["results"]
    assert res["overhead_percent"] is None
    sublayers = 2 * TINY["layers"]
    for r in (hc, mhc):
        assert r["overhead_percent"] == pytest.approx(100 * (r["step_ms_median"] / res["step_ms_median"] - 1), abs=0.5)  # ms rounded to 1 us
        # op counts, from the model's structure: the forward share is the time inside exactly these ranges
        assert r["ranges_per_step"] == {"mhc.contract": 1, "mhc.expand": 1, "mhc.post_res": sublayers, "mhc.pre": sublayers}
        # the profiler's mHC share against the time the residual model does not spend, both medians of
        # unprofiled steps timed around the whole step (loose bounds: a shared 2-core machine is noisy)
        b = r["breakdown_ms"]
        extra = r["step_ms_median"] - res["step_ms_median"]
        assert 0.4 * extra < b["mhc_forward"] + b["mhc_backward"] < 2.5 * extra, (b, extra)
    assert res["breakdown_ms"]["mhc_forward"] == 0 and res["breakdown_ms"]["mhc_backward"] == 0
    assert res["ranges_per_step"] == {}
    for path in report["traces"].values():
        with open(path) as f:
            assert any(e.get("name", "").startswith("mhc.") for e in json.load(f)["traceEvents"]) or path.endswith("residual.json")
    assert os.path.getsize(report["plot"]) > 1000


def test_profile_cli_json(tmp_path, capsys):
    args = ["profile", "--out", str(tmp_path), "--json"] + [
        x for k, v in TINY.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    assert cli_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in report["results"]] == ["residual", "mhc"]
    assert os.path.exists(tmp_path / "profile.json")


@pytest.mark.parametrize(
    "modes,match", [(("mhc",), "needs 'residual'"), (("residual", "mhcc"), "unknown mode")]
)
def test_profile_refuses_bad_modes(modes, match):
    with pytest.raises(ValueError, match=match):
        ProfileConfig(modes=modes).validate()
