"""The DualPipeV schedule on Megatron model chunks: same loss and gradients as the single-process
model (gloo, 2 and 4 ranks), executed order equal to DeepSeek's published one (transcribed in
tests/dualpipev_reference.py), activations in flight bounded, bad layouts refused."""

import pytest

from mcore_helpers import run_distributed
from pipeline_workers import assert_gradients_match, dualpipev, reference

from dualpipev_reference import unmarked, dualpipev_order, peak_in_flight

pytestmark = pytest.mark.slow


def _assert_matches(ref, ranks):
    assert ranks[0]["losses"] == pytest.approx(ref["losses"], rel=1e-5)  # the loss lives on rank 0
    assert all(not r["losses"] for r in ranks[1:])
    assert_gradients_match(ref, ranks)


@pytest.mark.parametrize(
    "pp,layers,microbatches,mode",
    [(2, 4, 4, "mhc"), (2, 4, 6, "hc"), (4, 8, 8, "mhc")],
    ids=["pp2-mhc", "pp2-hc-6mb", "pp4-mhc"],
)
def test_dualpipev_matches_single_process_and_deepseeks_order(tmp_path, pp, layers, microbatches, mode):
    state = str(tmp_path / "ref.pt")
    (ref,) = run_distributed(reference, 1, mode, state, False, layers, microbatches)
    ranks = run_distributed(dualpipev, pp, mode, state, layers, microbatches)
    _assert_matches(ref, ranks)
    # the order each rank ran is DeepSeek's
    for rank, r in enumerate(ranks):
        assert r["executed"] == unmarked(dualpipev_order(rank, pp, microbatches)), rank
        assert peak_in_flight(r["executed"]) <= pp + 1


def test_dualpipev_with_recompute_blocks_inside_chunks_over_two_steps(tmp_path):
    state = str(tmp_path / "ref.pt")
    (ref,) = run_distributed(reference, 1, "mhc", state, True, 8, 4)
    ranks = run_distributed(dualpipev, 2, "mhc", state, 8, 4, True, 2)
    # the second step starts from zeroed gradients: what is left equals one step's gradients
    _assert_matches(ref, ranks)
    for r in ranks:
        spans = [(min(s), max(s)) for s in r["chunk_sublayers"]]
        assert r["blocks"]
        for first, size in r["blocks"]:
            assert any(lo <= first and first + size - 1 <= hi for lo, hi in spans), (first, size, spans)


def test_dualpipev_forward_only_evaluates_any_number_of_microbatches(tmp_path):
    state = str(tmp_path / "ref.pt")
    (ref,) = run_distributed(reference, 1, "mhc", state, False, 4, 3)
    ranks = run_distributed(dualpipev, 2, "mhc", state, 4, 3, False, 1, True)  # 3 < 2P: fine without backward
    assert ranks[0]["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert all(r["grads"] == 0 for r in ranks)


def test_one_shared_data_iterator_gives_both_chunks_the_same_microbatches():
    """Rank 0 holds the embedding (chunk 0) and the loss (chunk 1) of the V: with a single data
    iterator, chunk 1 must see the micro-batch chunk 0 drew, in order."""
    from mhc_megatron.pipeline.dualpipev import chunk_iterators

    down, up = chunk_iterators(iter(range(5)))
    assert [next(down), next(down), next(up), next(down), next(up), next(up)] == [0, 1, 0, 2, 1, 2]
    with pytest.raises(RuntimeError, match="has not read"):
        next(up)
    a, b = iter("ab"), iter("ab")
    assert chunk_iterators([a, b]) == [a, b] and chunk_iterators(None) == [None, None]
    with pytest.raises(ValueError, match="one per chunk"):
        chunk_iterators([a])
