import json

from mhc_megatron.cli import main


def test_stability_json_mhc_bounded_hc_grows(capsys):
    assert main(["stability", "--layers", "64", "--expansion-rate", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"hc", "mhc"}
    mhc, hc = report["mhc"], report["hc"]
    assert abs(mhc["composite_forward_gain"] - 1) < 1e-6
    assert 1 - 1e-9 < mhc["composite_backward_gain"] < 1.06
    assert hc["composite_forward_gain"] > 10 and hc["composite_backward_gain"] > 10
    assert len(hc["composite_forward_gain_by_depth"]) == 64
    depth = hc["composite_forward_gain_by_depth"]
    assert depth[-1] > depth[7]  # the unconstrained composite grows with depth


def test_stability_table(capsys):
    assert main(["stability", "--layers", "4", "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "composite fwd" in out and out.count("\nhc ") == 1 and out.count("\nmhc ") == 1


def test_stability_bad_expansion_rate(capsys):
    assert main(["stability", "--expansion-rate", "0"]) == 2
    assert "expansion rate must be an integer >= 1, got 0" in capsys.readouterr().err
