"""Megatron's own pipeline schedules with the n-stream residual: PP=2 and PP=4, with and without
virtual stages, against the single-process model (gloo, several processes)."""

import pytest

from mcore_helpers import run_distributed
from pipeline_workers import assert_gradients_match, megatron_pipeline, reference

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "pp,vpp,mode",
    [(2, None, "mhc"), (4, None, "mhc"), (2, 2, "mhc"), (2, None, "hc"), (2, None, "residual")],
    ids=["pp2", "pp4", "pp2-vpp2", "pp2-hc", "pp2-residual"],
)
def test_megatron_schedules_match_single_process(tmp_path, pp, vpp, mode):
    state = str(tmp_path / "ref.pt")
    (ref,) = run_distributed(reference, 1, mode, state)
    ranks = run_distributed(megatron_pipeline, pp, mode, state, vpp)
    last = ranks[-1]
    assert last["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert_gradients_match(ref, ranks)


def test_recompute_blocks_stay_inside_stages_under_pp2(tmp_path):
    state = str(tmp_path / "ref.pt")
    (ref,) = run_distributed(reference, 1, "mhc", state, True)
    ranks = run_distributed(megatron_pipeline, 2, "mhc", state, None, True)
    for r in ranks:
        lo, hi = min(r["sublayers"]), max(r["sublayers"])
        assert r["blocks"] and all(lo <= first and first + size - 1 <= hi for first, size in r["blocks"])
    assert_gradients_match(ref, ranks)


@pytest.mark.parametrize("mode", ["mhc", "residual"])
def test_hybrid_pipeline_segments_carry_the_streams(tmp_path, mode):
    from pipeline_workers import hybrid_pipeline, hybrid_reference

    state = str(tmp_path / "ref.pt")
    (ref,) = run_distributed(hybrid_reference, 1, mode, state)
    ranks = run_distributed(hybrid_pipeline, 2, mode, state)
    assert ranks[-1]["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert_gradients_match(ref, ranks)
