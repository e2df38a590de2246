"""Discrete-event simulation of a pipeline schedule: bubbles, exposed communication, memory.

Each rank runs its program (``program.py``) in order on one compute stream. An op starts when
the rank is free and its input is there: the previous stage's forward (or the next stage's
backward) plus, across ranks, the time to move the stage tensor. Costs, in units of one
forward of ``layers / pp`` layers on one micro-batch:

- forward ``F`` = 1 / chunks per rank, backward ``B`` (input and weight gradients) = 2 ``F``;
- a message between stages costs ``comm_ratio x expansion_rate`` (the n-stream tensor is n
  times the residual's: ``comm_ratio`` is the residual model's send time relative to ``F``);
- with ``a2a_ratio`` (MoE expert parallelism), every pass also waits for its all-to-alls
  (dispatch and combine), ``a2a_ratio x`` its compute, on the same stream.

With ``overlap_pairs`` (DualPipeV under ``--overlap-moe-expert-parallel-comm``) each F&B pair of
the program runs as one unit, as the runtime does: it starts when both passes' inputs are there,
its two outputs leave when it ends, and one pass's all-to-alls hide behind the other's compute,
so the unit takes ``max(compute, all-to-all)`` of the two passes together instead of their sum.

Megatron's 1F1B and interleaved schedules (without ``--overlap-p2p-communication``) wait on
their p2p calls before computing again: a send is issued together with the receive of the next
input (``send_forward_recv_backward`` and the like) and the schedule waits for both, so it is
modelled as a sender that waits until its message is delivered. DualPipeV posts its sends asynchronously and
keeps computing; its receives are posted ahead, so a message in flight only costs time when
its receiver has nothing else to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .program import Op, pair_units, placement, program

BLOCKING_SENDS = {"1f1b": True, "interleaved": True, "dualpipev": False}


@dataclass
class Event:
    rank: int
    op: Op
    start: float
    end: float
    comm_wait: float  # time this op waited on a message already computed but still in flight


@dataclass
class Simulation:
    schedule: str
    num_ranks: int
    microbatches: int
    expansion_rate: int
    comm_ratio: float
    events: list[Event] = field(default_factory=list)
    makespan: float = 0.0
    peak_activations: list[float] = field(default_factory=list)

    def order(self, rank: int) -> list[Op]:
        """The ops of ``rank`` in the order they ran."""
        return [e.op for e in sorted(self.events, key=lambda e: e.start) if e.rank == rank]

    @property
    def busy(self) -> float:
        return sum(e.end - e.start for e in self.events)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all ranks' time (includes waiting on communication)."""
        return 1.0 - self.busy / (self.makespan * self.num_ranks)

    @property
    def exposed_comm_fraction(self) -> float:
        """Share of all ranks' time spent waiting on messages: in flight to the rank, or (1F1B and
        interleaved) its own, until delivered."""
        return sum(e.comm_wait for e in self.events) / (self.makespan * self.num_ranks)

    def summary(self) -> dict:
        return {
            "schedule": self.schedule,
            "pp": self.num_ranks,
            "microbatches": self.microbatches,
            "expansion_rate": self.expansion_rate,
            "comm_ratio": self.comm_ratio,
            "step_time": round(self.makespan, 4),
            "bubble_fraction": round(self.bubble_fraction, 4),
            "exposed_comm_fraction": round(self.exposed_comm_fraction, 4),
            "peak_activations": [round(a, 3) for a in self.peak_activations],
        }


def simulate(
    schedule: str,
    num_ranks: int,
    microbatches: int,
    *,
    expansion_rate: int = 1,
    comm_ratio: float = 0.0,
    virtual_stages: int | None = None,
    a2a_ratio: float = 0.0,
    overlap_pairs: bool = False,
) -> Simulation:
    """Simulate one step of ``schedule`` over ``num_ranks`` pipeline ranks."""
    if comm_ratio < 0:
        raise ValueError(f"comm_ratio must be >= 0, got {comm_ratio}")
    if a2a_ratio < 0:
        raise ValueError(f"a2a_ratio must be >= 0, got {a2a_ratio}")
    if expansion_rate < 1:
        raise ValueError(f"expansion_rate must be >= 1, got {expansion_rate}")
    if overlap_pairs and schedule != "dualpipev":
        raise ValueError(f"overlapped F&B pairs are DualPipeV's; the {schedule} schedule has none")
    place = placement(schedule, num_ranks, virtual_stages)
    programs = [program(schedule, r, num_ranks, microbatches, virtual_stages) for r in range(num_ranks)]
    units = [pair_units(ops) if overlap_pairs else [(op,) for op in ops] for ops in programs]
    unit = 1.0 / place.chunks_per_rank  # F of one chunk
    comm = comm_ratio * expansion_rate
    blocking = BLOCKING_SENDS[schedule]

    done: dict[tuple[str, int, int], float] = {}  # (kind, stage, mb) -> end time
    free = [0.0] * num_ranks
    cursor = [0] * num_ranks
    live = [0.0] * num_ranks
    peak = [0.0] * num_ranks
    sim = Simulation(schedule, num_ranks, microbatches, expansion_rate, comm_ratio)

    def source(op: Op):
        """(producer key, crosses ranks) of the op's input, or None (data loader / same op)."""
        peer = place.input_stage(op)
        if peer is not None:
            return (op.kind, peer, op.microbatch), place.receives(op)
        if op.kind == "F":
            return None
        return ("F", op.stage, op.microbatch), False  # the last stage's B: its own F

    def compute(op: Op) -> float:
        return unit if op.kind == "F" else 2 * unit

    pending = sum(len(ops) for rank_units in units for ops in rank_units)
    while pending:
        progressed = False
        for rank in range(num_ranks):
            while cursor[rank] < len(units[rank]):
                ops = units[rank][cursor[rank]]
                ready, wait, blocked_on = free[rank], 0.0, False
                for op in ops:
                    src = source(op)
                    if src is None:
                        continue
                    key, remote = src
                    if key not in done:
                        blocked_on = True
                        break
                    arrival = done[key] + (comm if remote else 0.0)
                    if arrival > ready:
                        wait += min(arrival - ready, comm if remote else 0.0)
                        ready = arrival
                if blocked_on:
                    break
                work = sum(compute(op) for op in ops)
                a2a = a2a_ratio * work
                cost = max(work, a2a) if len(ops) == 2 else work + a2a
                end = ready + cost
                blocked = comm * sum(1 for op in ops if blocking and place.sends(op))
                start = ready
                for k, op in enumerate(ops):  # a pair's cost split between its passes in proportion
                    share = cost * compute(op) / work
                    sim.events.append(Event(rank, op, start, start + share, wait if k == 0 else 0.0))
                    start += share
                    done[(op.kind, op.stage, op.microbatch)] = end
                    # activations: stored by F, freed by its B
                    live[rank] += unit if op.kind == "F" else -unit
                    peak[rank] = max(peak[rank], live[rank])
                sim.events[-1].comm_wait += blocked
                free[rank] = end + blocked
                cursor[rank] += 1
                pending -= len(ops)
                progressed = True
        if not progressed:
            stuck = {r: " ".join(map(str, units[r][cursor[r]])) for r in range(num_ranks) if cursor[r] < len(units[r])}
            raise RuntimeError(f"the {schedule} programs deadlock; next ops per rank: {stuck}")
    sim.makespan = max(free)
    sim.peak_activations = peak
    return sim
