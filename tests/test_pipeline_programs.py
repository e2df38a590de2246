"""Per-rank pipeline programs and the schedule simulator (pure Python, fast)."""

import json

import pytest
import torch

from mhc_megatron.cli import main as cli_main
from mhc_megatron.pipeline import placement, program, simulate
from mhc_megatron.pipeline.dualpipev import chunk_placements, check_dualpipev_config

CASES = [(s, p, m) for s in ("1f1b", "interleaved", "dualpipev") for p in (1, 2, 3, 4) for m in (12, 24)]


@pytest.mark.parametrize("schedule,pp,mbs", CASES)
def test_every_pass_runs_once_on_the_rank_holding_its_stage(schedule, pp, mbs):
    place = placement(schedule, pp)
    seen = []
    for rank in range(pp):
        ops = program(schedule, rank, pp, mbs)
        assert all(place.rank_of(op.stage) == rank for op in ops)
        seen += [(op.kind, op.stage, op.microbatch) for op in ops]
    expected = [(k, s, m) for k in "FB" for s in range(place.num_stages) for m in range(mbs)]
    assert sorted(seen) == sorted(expected)


def test_dualpipev_places_the_v():
    place = placement("dualpipev", 4)
    assert [place.stages_of(r) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert [(c.stage, c.pre_process, c.post_process, c.pp_rank) for c in chunk_placements(0, 4)] == [
        (0, True, False, 0), (7, False, True, 3)]
    assert [c.stage for c in chunk_placements(3, 4)] == [3, 4]


@pytest.mark.parametrize("pp,mbs", [(2, 8), (4, 16), (8, 32)])
def test_1f1b_bubble_matches_the_closed_form(pp, mbs):
    sim = simulate("1f1b", pp, mbs)  # F = 1, B = 2, no communication
    assert sim.makespan == pytest.approx(3 * (mbs + pp - 1))
    assert sim.bubble_fraction == pytest.approx((pp - 1) / (mbs + pp - 1))
    assert sim.peak_activations == [pp - r for r in range(pp)]
    assert sim.exposed_comm_fraction == 0


def test_dualpipev_hides_most_of_the_n_stream_communication():
    one_f_one_b = simulate("1f1b", 4, 16, expansion_rate=4, comm_ratio=0.1)
    dualpipev = simulate("dualpipev", 4, 16, expansion_rate=4, comm_ratio=0.1)
    assert dualpipev.exposed_comm_fraction < 0.5 * one_f_one_b.exposed_comm_fraction
    assert dualpipev.bubble_fraction < one_f_one_b.bubble_fraction
    # more streams, more communication to hide
    assert simulate("dualpipev", 4, 16, expansion_rate=1, comm_ratio=0.1).makespan < dualpipev.makespan


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved", "dualpipev"])
def test_every_schedule_does_the_same_work(schedule):
    """F + B (= 2 F) per micro-batch and stage, whatever the order: 3 x 4 x 8 units of a
    1F1B stage over PP=4 and 8 micro-batches."""
    assert simulate(schedule, 4, 8).busy == pytest.approx(3 * 4 * 8)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: program("dualpipev", 0, 4, 7), r"at least 8 micro-batches .*2 x pipeline size"),
        (lambda: program("interleaved", 0, 4, 6), "multiple of the pipeline size"),
        (lambda: program("zero-bubble", 0, 4, 8), "one of 1f1b, interleaved, dualpipev"),
        (lambda: program("1f1b", 4, 4, 8), "outside a pipeline of 4"),
        (lambda: simulate("1f1b", 2, 4, comm_ratio=-1), "comm_ratio"),
        (lambda: simulate("1f1b", 2, 4, a2a_ratio=-1), "a2a_ratio"),
        (lambda: simulate("1f1b", 2, 4, overlap_pairs=True), "the 1f1b schedule has none"),
    ],
)
def test_bad_schedules_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _config(**overrides):
    from mcore_helpers import tiny_config

    kw = dict(num_layers=8, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
              pipeline_dtype=torch.float32)
    kw.update(overrides)
    return tiny_config(**kw)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(virtual_pipeline_model_parallel_size=3, num_layers=12), "exactly two stages per pipeline rank"),
        (dict(num_layers=6), "6 is not a multiple of 4"),
        (dict(mtp_num_layers=1), "multi-token prediction"),
    ],
)
def test_dualpipev_refuses_layouts_it_cannot_run(overrides, match):
    cfg = _config(**overrides)
    with pytest.raises(ValueError, match=match):
        check_dualpipev_config(cfg)


def test_simulate_pipeline_cli_json_and_timeline(tmp_path, capsys):
    png = tmp_path / "timeline.png"
    assert cli_main(["simulate-pipeline", "--schedule", "dualpipev", "--pp", "2", "--microbatches", "4",
                     "--expansion-rate", "4", "--comm-ratio", "0.2", "--out", str(png), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"bubble_fraction", "exposed_comm_fraction", "peak_activations"} <= out.keys()
    assert len(out["peak_activations"]) == 2 and 0 <= out["bubble_fraction"] < 1
    assert png.stat().st_size > 1000
    assert cli_main(["simulate-pipeline", "--schedule", "dualpipev", "--pp", "4", "--microbatches", "4"]) == 2
    assert "2 x pipeline size" in capsys.readouterr().err


@pytest.mark.parametrize("pp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("extra", [0, 1, 5])
def test_dualpipev_program_is_deepseeks_published_order(pp, extra):
    """The program the runtime and the simulator run equals an independent transcription of
    DeepSeek's eight-step DualPipeV, per rank, with its weight passes left out (every backward
    computes its weight gradients), including which F and B run as overlapped pairs."""
    from dualpipev_reference import as_reference, dualpipev_order

    mbs = 2 * pp + extra
    for rank in range(pp):
        assert as_reference(program("dualpipev", rank, pp, mbs)) == dualpipev_order(rank, pp, mbs), rank


@pytest.mark.parametrize("pp,mbs", [(2, 4), (4, 16), (8, 32)])
def test_dualpipev_keeps_at_most_pp_plus_one_microbatches_of_activations(pp, mbs):
    from dualpipev_reference import peak_in_flight

    peaks = [peak_in_flight([str(op) for op in program("dualpipev", r, pp, mbs)]) for r in range(pp)]
    assert max(peaks) <= pp + 1, peaks
    gpipe = [f"F{s}.{m}" for s in (0, 1) for m in range(mbs)] + [f"B{s}.{m}" for s in (1, 0) for m in range(mbs)]
    assert peak_in_flight(gpipe) == mbs > pp + 1  # the bound can fail: a GPipe order breaks it


@pytest.mark.parametrize("a2a", [0.0, 0.5, 1.0, 2.0])
def test_overlapped_pairs_hide_one_pass_all_to_all_behind_the_other(a2a):
    """Work per rank, counted from the program: an F costs 1/2 (a chunk is half a 1F1B stage), a B
    1; a pass alone also waits for its all-to-alls (a2a x its compute), an overlapped F&B pair
    takes max(compute, all-to-all) of the two."""
    pp, mbs = 4, 12
    serial = simulate("dualpipev", pp, mbs, a2a_ratio=a2a)
    overlapped = simulate("dualpipev", pp, mbs, a2a_ratio=a2a, overlap_pairs=True)
    for rank in range(pp):
        ops = program("dualpipev", rank, pp, mbs)
        work = {"F": 0.5, "B": 1.0}
        paired = sum(work[op.kind] for op in ops if op.paired)
        alone = sum(work[op.kind] for op in ops if not op.paired)

        def busy(sim):
            return sum(e.end - e.start for e in sim.events if e.rank == rank)

        assert busy(serial) == pytest.approx((paired + alone) * (1 + a2a))
        assert busy(overlapped) == pytest.approx(paired * max(1.0, a2a) + alone * (1 + a2a))
    # a pair's two passes run back to back in one unit, the forward first
    order = overlapped.order(0)
    for first, second in zip(order, order[1:]):
        if first.kind == "F" and first.paired and second.paired and second.kind == "B":
            e1, e2 = (next(e for e in overlapped.events if e.rank == 0 and e.op == op) for op in (first, second))
            assert e1.end == pytest.approx(e2.start)

