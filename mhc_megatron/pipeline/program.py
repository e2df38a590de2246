"""Pipeline schedules as per-rank programs: the order in which each rank runs its chunks.

A program is a list of :class:`Op` per rank. The same programs drive the discrete-event
simulator (``simulator.py``) and the DualPipeV runtime (``dualpipev.py``), so what the
simulator predicts is what the runtime executes.

Stages are numbered globally, 0 (embedding) to ``num_stages - 1`` (loss). An op is a forward
``F`` or a backward ``B`` (input and weight gradients) of one micro-batch through one stage.
There are no separate weight-gradient passes (``W``): splitting a backward needs layers that can
defer their weight gradients (Transformer Engine's ``delay_wgrad_compute`` with a model that
exposes ``backward_dw``), which megatron-core 0.19's ``GPTModel`` does not.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("1f1b", "interleaved", "dualpipev")


@dataclass(frozen=True)
class Op:
    kind: str  # "F" or "B"
    stage: int
    microbatch: int
    paired: bool = False  # F/B run back to back with the other half of an F&B pair

    def __str__(self) -> str:
        return f"{self.kind}{self.stage}.{self.microbatch}"


@dataclass(frozen=True)
class Placement:
    """Which rank holds which stage."""

    schedule: str
    num_ranks: int
    chunks_per_rank: int

    @property
    def num_stages(self) -> int:
        return self.num_ranks * self.chunks_per_rank

    def rank_of(self, stage: int) -> int:
        if self.schedule == "dualpipev":  # V shape: down the ranks and back up
            return stage if stage < self.num_ranks else 2 * self.num_ranks - 1 - stage
        return stage % self.num_ranks  # 1F1B (one chunk) and interleaved (round robin)

    def stages_of(self, rank: int) -> list[int]:
        return [s for s in range(self.num_stages) if self.rank_of(s) == rank]

    def chunk_of(self, stage: int) -> int:
        """Index of ``stage`` among its rank's model chunks."""
        return self.stages_of(self.rank_of(stage)).index(stage)

    # The one home of "what does a pass exchange with another stage": the simulator, the runtime
    # and validate-config's message counts all ask these.
    def input_stage(self, op: Op) -> int | None:
        """The stage whose output ``op`` reads: F reads the previous stage's activations, B the next
        stage's gradient; None where the input is local (first F: data; last B: its own loss)."""
        if op.kind == "F":
            return op.stage - 1 if op.stage > 0 else None
        if op.kind == "B":
            return op.stage + 1 if op.stage < self.num_stages - 1 else None
        return None

    def output_stage(self, op: Op) -> int | None:
        """The stage that reads ``op``'s output (F: the next, B: the previous), or None."""
        if op.kind == "F":
            return op.stage + 1 if op.stage < self.num_stages - 1 else None
        if op.kind == "B":
            return op.stage - 1 if op.stage > 0 else None
        return None

    def receives(self, op: Op) -> bool:
        """``op``'s input comes from another rank."""
        peer = self.input_stage(op)
        return peer is not None and self.rank_of(peer) != self.rank_of(op.stage)

    def sends(self, op: Op) -> bool:
        """``op``'s output goes to another rank."""
        peer = self.output_stage(op)
        return peer is not None and self.rank_of(peer) != self.rank_of(op.stage)


def placement(schedule: str, num_ranks: int, virtual_stages: int | None = None) -> Placement:
    check_schedule(schedule)
    if num_ranks < 1:
        raise ValueError(f"the pipeline needs at least one rank, got {num_ranks}")
    chunks = {"1f1b": 1, "dualpipev": 2}.get(schedule, virtual_stages or 2)
    if schedule == "interleaved" and chunks < 2:
        raise ValueError(f"the interleaved schedule needs >= 2 virtual stages per rank, got {chunks}")
    return Placement(schedule, num_ranks, chunks)


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def min_microbatches(schedule: str, num_ranks: int) -> int:
    return 2 * num_ranks if schedule == "dualpipev" else 1


def check_microbatches(schedule: str, num_ranks: int, microbatches: int) -> None:
    need = min_microbatches(schedule, num_ranks)
    if microbatches < need:
        raise ValueError(
            f"the {schedule} schedule over {num_ranks} pipeline ranks needs at least {need} "
            f"micro-batches per step (2 x pipeline size), got {microbatches}; raise the global batch "
            "size or lower the micro-batch size"
        )
    if schedule == "interleaved" and microbatches % num_ranks:
        raise ValueError(
            f"the interleaved schedule needs the number of micro-batches ({microbatches}) to be a "
            f"multiple of the pipeline size ({num_ranks})"
        )


def program(schedule: str, rank: int, num_ranks: int, microbatches: int, virtual_stages: int | None = None) -> list[Op]:
    """The ops rank ``rank`` runs in one training step, in order."""
    check_schedule(schedule)
    if not 0 <= rank < num_ranks:
        raise ValueError(f"rank {rank} is outside a pipeline of {num_ranks} ranks")
    check_microbatches(schedule, num_ranks, microbatches)
    if schedule == "1f1b":
        return _one_f_one_b(rank, num_ranks, microbatches)
    if schedule == "interleaved":
        return _interleaved(rank, num_ranks, microbatches, placement(schedule, num_ranks, virtual_stages).chunks_per_rank)
    return _dualpipev(rank, num_ranks, microbatches)


def _one_f_one_b(rank: int, ranks: int, mbs: int) -> list[Op]:
    warmup = min(ranks - rank - 1, mbs)
    ops = [Op("F", rank, m) for m in range(warmup)]
    for m in range(mbs - warmup):
        ops += [Op("F", rank, m + warmup), Op("B", rank, m)]
    ops += [Op("B", rank, m) for m in range(mbs - warmup, mbs)]
    return ops


def _interleaved(rank: int, ranks: int, mbs: int, chunks: int) -> list[Op]:
    """Megatron's interleaved 1F1B: micro-batches in groups of ``ranks`` per virtual stage."""
    total = mbs * chunks

    def unit(k: int, backward: bool) -> tuple[int, int]:
        chunk = (k // ranks) % chunks
        if backward:
            chunk = chunks - 1 - chunk
        return chunk * ranks + rank, (k // (ranks * chunks)) * ranks + k % ranks

    warmup = min((ranks - rank - 1) * 2 + (chunks - 1) * ranks, total)
    ops = [Op("F", *unit(k, False)) for k in range(warmup)]
    for k in range(total - warmup):
        ops += [Op("F", *unit(k + warmup, False)), Op("B", *unit(k, True))]
    ops += [Op("B", *unit(k, True)) for k in range(total - warmup, total)]
    return ops


def _dualpipev(rank: int, ranks: int, mbs: int) -> list[Op]:
    """DualPipeV: rank r holds stage r (chunk 0, going down) and stage 2P-1-r (chunk 1, coming back).

    The eight phases of DeepSeek's V-shaped DualPipe, with its weight-gradient passes left out:
    the backward passes DeepSeek splits compute their weight gradients in place (see the module
    docstring), so phases 3 and 7 are plain backwards and phase 8 is empty.
    """
    down, up = rank, 2 * ranks - 1 - rank
    nxt = {down: 0, up: 0}  # next micro-batch per stage and pass
    nxt_b = {down: 0, up: 0}
    ops: list[Op] = []

    def f(stage, paired=False):
        ops.append(Op("F", stage, nxt[stage], paired=paired))
        nxt[stage] += 1

    def b(stage, paired=False):
        ops.append(Op("B", stage, nxt_b[stage], paired=paired))
        nxt_b[stage] += 1

    before_turn = ranks - rank - 1  # ranks between this one and the bottom of the V
    for _ in range(2 * before_turn):  # 1. fill: forwards of the down chunk
        f(down)
    for _ in range(rank + 1):  # 2. forwards of both chunks
        f(down)
        f(up)
    for _ in range(before_turn):  # 3. first backwards of the up chunk
        b(up)
        f(up)
    for i in range(mbs - 2 * ranks + rank + 1):  # 4. steady state: F&B pairs of both chunks
        # the bottom rank's first pair runs unpaired: its F feeds its own B
        solo = i == 0 and rank == ranks - 1
        f(down, paired=not solo)
        b(up, paired=not solo)
        f(up, paired=True)
        b(down, paired=True)
    for _ in range(before_turn):  # 5. drain the up chunk's forwards
        b(up)
        f(up, paired=True)
        b(down, paired=True)
    for _ in range(rank + 1):  # 6. backwards of both chunks
        b(up)
        b(down)
    for _ in range(before_turn):  # 7. the down chunk's last backwards
        b(down)
    return ops


def pair_units(ops: list[Op]) -> list[tuple[Op, ...]]:
    """``ops`` cut into what runs as one unit: an overlapped F&B pair (a paired F followed by its
    paired B) or a single op."""
    units, i = [], 0
    while i < len(ops):
        op = ops[i]
        nxt = ops[i + 1] if i + 1 < len(ops) else None
        if op.kind == "F" and op.paired and nxt is not None and nxt.kind == "B" and nxt.paired:
            units.append((op, nxt))
            i += 2
        else:
            units.append((op,))
            i += 1
    return units
