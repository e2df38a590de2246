"""Discrete-event simulation of a pipeline schedule: bubbles, exposed communication, memory.

Each rank runs its program (``program.py``) in order on one compute stream. An op starts when
the rank is free and its input is there: the previous stage's forward (or the next stage's
backward) plus, across ranks, the time to move the stage tensor. Costs, in units of one
forward of ``layers / pp`` layers on one micro-batch:

- forward ``F`` = 1 / chunks per rank, backward ``B`` (input and weight gradients) = 2 ``F``;
- a message between stages costs ``comm_ratio x expansion_rate`` (the n-stream tensor is n
  times the residual's: ``comm_ratio`` is the residual model's send time relative to ``F``).

Megatron's 1F1B and interleaved schedules (without ``--overlap-p2p-communication``) wait on
their p2p calls before computing again: a send is issued together with the receive of the next
input (``send_forward_recv_backward`` and the like) and the schedule waits for both, so it is
modelled as a sender that waits until its message is delivered. DualPipeV posts its sends asynchronously and
keeps computing; its receives are posted ahead, so a message in flight only costs time when
its receiver has nothing else to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .program import Op, placement, program

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
) -> Simulation:
    """Simulate one step of ``schedule`` over ``num_ranks`` pipeline ranks."""
    if comm_ratio < 0:
        raise ValueError(f"comm_ratio must be >= 0, got {comm_ratio}")
    if expansion_rate < 1:
        raise ValueError(f"expansion_rate must be >= 1, got {expansion_rate}")
    place = placement(schedule, num_ranks, virtual_stages)
    programs = [program(schedule, r, num_ranks, microbatches, virtual_stages) for r in range(num_ranks)]
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

    pending = sum(len(p) for p in programs)
    while pending:
        progressed = False
        for rank in range(num_ranks):
            while cursor[rank] < len(programs[rank]):
                op = programs[rank][cursor[rank]]
                src = source(op)
                ready, wait = free[rank], 0.0
                if src is not None:
                    key, remote = src
                    if key not in done:
                        break
                    arrival = done[key] + (comm if remote else 0.0)
                    if arrival > ready:
                        wait = min(arrival - ready, comm if remote else 0.0)
                        ready = arrival
                cost = unit if op.kind == "F" else 2 * unit
                end = ready + cost
                blocked = comm if (blocking and place.sends(op)) else 0.0
                sim.events.append(Event(rank, op, ready, end, wait + blocked))
                done[(op.kind, op.stage, op.microbatch)] = end
                free[rank] = end + blocked
                # activations: stored by F, freed by the pass that last needs them
                if op.kind == "F":
                    live[rank] += unit
                    peak[rank] = max(peak[rank], live[rank])
                else:
                    live[rank] -= unit
                cursor[rank] += 1
                pending -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(programs[r][cursor[r]]) for r in range(num_ranks) if cursor[r] < len(programs[r])}
            raise RuntimeError(f"the {schedule} programs deadlock; next ops per rank: {stuck}")
    sim.makespan = max(free)
    sim.peak_activations = peak
    return sim
