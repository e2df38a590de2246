"""mhc-megatron profile on a tiny CPU model: timings, overhead and breakdown are consistent."""

import json
import os

import pytest

from mhc_megatron.bench.profile import ProfileConfig, run_profile
from mhc_megatron.cli import main as cli_main

TINY = dict(layers=2, hidden=32, heads=2, seq_len=16, batch_size=2, steps=3, warmup=1, profile_steps=1, device="cpu")


@pytest.mark.parametrize("recompute", [False, True])
def test_profile_reports_overhead_and_a_breakdown_that_adds_up(tmp_path, recompute):
    report = run_profile(ProfileConfig(modes=("residual", "hc", "mhc"), recompute=recompute, **TINY), out_dir=str(tmp_path))
    res, hc, mhc = report["results"]
    assert res["overhead_percent"] is None
    for r in (hc, mhc):
        assert r["overhead_percent"] == pytest.approx(100 * (r["step_ms_median"] / res["step_ms_median"] - 1), abs=0.5)  # ms rounded to 1 us
        b = r["breakdown_ms"]
        assert b["mhc_forward"] > 0 and b["mhc_backward"] > 0
        assert sum(b.values()) == pytest.approx(r["step_ms_median"], rel=1e-3)
    assert res["breakdown_ms"]["mhc_forward"] == 0 and res["breakdown_ms"]["mhc_backward"] == 0
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
