"""DualPipeV's communication cannot deadlock or mismatch on NCCL: every rank's plan (the event list
the runtime executes) replayed against NCCL's in-order, blocking-until-matched semantics
(tests/nccl_replay.py), for PP in {2, 4, 8} and several micro-batch counts."""

import pytest

from mhc_megatron.pipeline import dualpipev
from mhc_megatron.pipeline.program import placement, program
from nccl_replay import Deadlock, replay


def _plans(pp: int, microbatches: int, forward_only: bool = False) -> dict:
    place = placement("dualpipev", pp)
    plans = {}
    for rank in range(pp):
        if forward_only:  # the runtime's evaluation order: each chunk's forwards in turn
            ops = [dualpipev.Op("F", s, m) for s in place.stages_of(rank) for m in range(microbatches)]
        else:
            ops = program("dualpipev", rank, pp, microbatches)
        plans[rank] = dualpipev.rank_events(place, rank, ops, forward_only)
    return plans


def _messages(pp: int, microbatches: int) -> int:
    """Messages of one training step counted from the V: every stage boundary but the bottom one
    crosses ranks, once forward (activation) and once backward (gradient) per micro-batch."""
    boundaries = 2 * pp - 1 - 1
    return 2 * boundaries * microbatches


@pytest.mark.parametrize("pp", [2, 4, 8])
@pytest.mark.parametrize("extra", [0, 1, 3, 10])
def test_training_step_replays_without_deadlock(pp, extra):
    microbatches = 2 * pp + extra
    assert replay(_plans(pp, microbatches)) == _messages(pp, microbatches)


@pytest.mark.parametrize("pp,microbatches", [(2, 1), (4, 3), (8, 5)])
def test_evaluation_step_replays_without_deadlock(pp, microbatches):
    assert replay(_plans(pp, microbatches, forward_only=True)) == _messages(pp, microbatches) // 2


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_one_group_per_kind_in_both_directions_deadlocks(pp, monkeypatch):
    """The runtime's previous channels (one "act" and one "grad" group carrying both directions):
    two neighbours each queue a receive from the other ahead of their send, and wait forever."""
    monkeypatch.setattr(dualpipev, "channel", lambda kind, src, dst: kind)
    with pytest.raises(Deadlock, match="wait cycle"):
        replay(_plans(pp, 2 * pp))


def test_the_replay_catches_a_message_matched_with_another():
    """A plan that posts two receives on one channel in the opposite order of the sends: NCCL would
    hand the first message to the second receive."""
    a = dualpipev.Message("act", 1, 0, 0, 1)
    b = dualpipev.Message("act", 1, 1, 0, 1)
    plans = {0: [("send", a), ("send", b), ("wait_sends", None)],
             1: [("post_recv", b), ("post_recv", a), ("wait_recv", a), ("wait_recv", b)]}
    with pytest.raises(AssertionError, match="wrong data"):
        replay(plans)


def test_each_communicator_carries_one_kind_one_way():
    """On a communicator (a channel between two ranks) every message has the same kind and
    direction, so both ends see its messages in micro-batch order."""
    for pp in (2, 4):
        carried = {}
        for plan in _plans(pp, 2 * pp + 1).values():
            for event, m in plan:
                if event in ("send", "post_recv"):
                    carried.setdefault((m.channel, frozenset((m.src, m.dst))), set()).add((m.kind, m.src, m.dst))
        assert carried and all(len(v) == 1 for v in carried.values()), carried
