"""The DualPipeV pipeline schedule for Megatron model chunks, carrying the n-stream residual.

Placement (the "V"): pipeline rank r of P holds two model chunks, stage r (chunk 0, the way
down) and stage 2P-1-r (chunk 1, the way back up). Rank 0 therefore holds both the embedding
and the loss, and rank P-1 hands its chunk-0 output to its own chunk 1 without communication.

The order of work is the program of ``program.py`` (the one the simulator runs); this module
only executes it. What it adds over Megatron's schedules:

- every send is asynchronous and every receive is posted ahead of the op that needs it, so the
  n-stream tensors (n times the residual's bytes) travel while the rank computes the other half
  of an F&B pair;
- each message travels on one of four process groups, one per kind (activation, gradient) and
  direction (down or up the ranks), so that every communicator carries messages one way only and
  in micro-batch order. NCCL runs a communicator's point-to-point calls in the order they were
  issued and a call waits until the peer's matching call runs: two neighbours that each queue a
  receive from the other ahead of their send would wait for each other forever (gloo hides this).
  :func:`rank_events` is the whole communication plan of a rank, the list the runtime executes and
  the tests replay against those semantics;
- each stage keeps the tensor it received as its own first input until its backward is done,
  so recomputing the stage's first mHC block reads a local tensor and never waits on a peer.

All state of one step lives in :class:`_Step`.
"""

from __future__ import annotations

import collections
import contextlib
import copy
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .program import Op, check_microbatches, pair_units, placement, program

SCHEDULE = "dualpipev"
_LOOKAHEAD = 2  # ops ahead whose inputs are already being received


# ---------------------------------------------------------------------------------------------
# building the two chunks of a rank


@contextlib.contextmanager
def pipeline_rank_seen_as(rank: int):
    """megatron-core's own override of the pipeline rank, set while one chunk is built (so every
    rank-dependent choice: layer offset, per-layer MoE pattern, recompute blocks, is the V's
    stage's) or while megatron-core's combined step decides whether chunk 1 computes the loss;
    the previous override comes back afterwards."""
    from megatron.core import parallel_state

    previous = parallel_state._MPU_PIPELINE_MODEL_PARALLEL_RANK  # no public getter for the override itself
    parallel_state.set_pipeline_model_parallel_rank(rank)
    try:
        yield
    finally:
        parallel_state.set_pipeline_model_parallel_rank(previous)


class MirroredPipelineGroup:
    """The pipeline group as seen by the way-up chunk: rank r reports rank P-1-r.

    Megatron places a chunk with ``vp_stage`` v on rank r at stage ``v*P + r``; for v = 1 the
    mirrored rank gives ``P + (P-1-r) = 2P-1-r``, the V's stage, so layer numbers, recompute
    blocks and distributed-checkpoint keys come out right without changing Megatron.
    Only rank queries are mirrored; the object is never used to communicate.
    """

    def __init__(self, group):
        self._group = group

    def rank(self) -> int:
        return self._group.size() - 1 - self._group.rank()

    def size(self) -> int:
        return self._group.size()

    def __getattr__(self, name):
        return getattr(self._group, name)


@dataclass(frozen=True)
class ChunkPlacement:
    """What ``model_provider`` needs to build one of this rank's DualPipeV chunks."""

    vp_stage: int  # 0: way down, 1: way up
    stage: int
    pre_process: bool
    post_process: bool
    pp_rank: int  # the rank Megatron's offset arithmetic must see (mirrored for chunk 1)


def chunk_placements(pp_rank: int, pp_size: int) -> list[ChunkPlacement]:
    return [
        ChunkPlacement(0, pp_rank, pp_rank == 0, False, pp_rank),
        ChunkPlacement(1, 2 * pp_size - 1 - pp_rank, False, pp_rank == 0, pp_size - 1 - pp_rank),
    ]


def chunk_pg_collection(pg_collection, chunk: ChunkPlacement):
    """The process groups chunk ``chunk`` is built with (the pipeline group mirrored for chunk 1)."""
    if chunk.vp_stage == 0:
        return pg_collection
    mirrored = copy.copy(pg_collection)
    mirrored.pp = MirroredPipelineGroup(pg_collection.pp)
    return mirrored


def check_dualpipev_config(config, num_layers: int | None = None) -> None:
    """Refuse settings the DualPipeV runtime does not handle, naming the fix."""
    pp = config.pipeline_model_parallel_size or 1
    vpp = getattr(config, "virtual_pipeline_model_parallel_size", None)
    if vpp != 2:
        raise ValueError(
            f"DualPipeV runs exactly two stages per pipeline rank (2 x {pp} = {2 * pp} stages, an even "
            f"number by construction); got virtual_pipeline_model_parallel_size={vpp}: set it to 2 "
            "(mhc-pretrain-gpt --pipeline-schedule dualpipev does)"
        )
    layers = config.num_layers if num_layers is None else num_layers
    if layers % (2 * pp):
        raise ValueError(
            f"DualPipeV splits the {layers} layers over {2 * pp} stages (2 x pipeline size {pp}); "
            f"{layers} is not a multiple of {2 * pp}: change --num-layers or --pipeline-model-parallel-size"
        )
    if getattr(config, "pipeline_model_parallel_layout", None) is not None or getattr(
        config, "num_layers_in_first_pipeline_stage", None
    ) or getattr(config, "num_layers_in_last_pipeline_stage", None):
        raise ValueError(
            "DualPipeV needs the layers split evenly over its stages; drop "
            "--pipeline-model-parallel-layout / --decoder-first/last-pipeline-num-layers"
        )
    if getattr(config, "param_sync_func", None) is not None:
        raise ValueError("DualPipeV does not overlap parameter all-gathers yet: drop --overlap-param-gather")
    if getattr(config, "mtp_num_layers", None):
        raise ValueError("DualPipeV with multi-token prediction is not supported yet: drop --mtp-num-layers")


# ---------------------------------------------------------------------------------------------
# communication


CHANNELS = ("act-down", "act-up", "grad-down", "grad-up")


def channel(kind: str, src: int, dst: int) -> str:
    """The process group a message of ``kind`` ("act" or "grad") from pipeline rank ``src`` to
    ``dst`` travels on: one per kind and direction (see the module docstring)."""
    return f"{kind}-{'down' if dst > src else 'up'}"


@dataclass(frozen=True)
class Message:
    """One stage tensor crossing ranks: ``kind`` "act" (into ``stage``'s forward) or "grad" (into
    its backward) of ``microbatch``, from pipeline rank ``src`` to ``dst``."""

    kind: str
    stage: int
    microbatch: int
    src: int
    dst: int

    @property
    def channel(self) -> str:
        return channel(self.kind, self.src, self.dst)


def _incoming(place, rank: int, op: Op, forward_only: bool) -> Message | None:
    peer = place.input_stage(op)
    if peer is None or place.rank_of(peer) == rank or (forward_only and op.kind != "F"):
        return None
    return Message("act" if op.kind == "F" else "grad", op.stage, op.microbatch, place.rank_of(peer), rank)


def _outgoing(place, rank: int, op: Op) -> Message | None:
    peer = place.output_stage(op)
    if peer is None or place.rank_of(peer) == rank:  # the loss, or the bottom of the V (in memory)
        return None
    return Message("act" if op.kind == "F" else "grad", peer, op.microbatch, rank, place.rank_of(peer))


def rank_events(place, rank: int, ops: list[Op], forward_only: bool = False,
                overlap_pairs: bool = False) -> list[tuple[str, object]]:
    """The communication plan of ``rank`` running ``ops``, in issue order:

    - ``("post_recv", m)``: post the receive of message ``m`` (up to ``_LOOKAHEAD`` ops ahead);
    - ``("wait_recv", m)``: the next unit reads ``m``;
    - ``("wait_send", m)``: the next unit (with a backward) frees the activation ``m`` carried, so
      ``m`` must have left;
    - ``("run", unit)``: a single op, or with ``overlap_pairs`` an F&B pair run interleaved
      (:func:`pair_units`); then ``("send", m)`` for each output that goes to another rank;
    - ``("wait_sends", None)`` at the end of the step.
    """
    events: list[tuple[str, object]] = []
    posted: set[Message] = set()
    sent_activation: dict[tuple[int, int], Message] = {}  # (stage, mb) -> its forward's send
    units = pair_units(ops) if overlap_pairs else [(op,) for op in ops]
    i = 0
    for unit in units:
        for ahead in ops[i : i + len(unit) + _LOOKAHEAD]:
            m = _incoming(place, rank, ahead, forward_only)
            if m is not None and m not in posted:
                posted.add(m)
                events.append(("post_recv", m))
        i += len(unit)
        for op in unit:
            m = _incoming(place, rank, op, forward_only)
            if m is not None:
                events.append(("wait_recv", m))
        for op in unit:
            if op.kind == "B" and (op.stage, op.microbatch) in sent_activation:
                events.append(("wait_send", sent_activation.pop((op.stage, op.microbatch))))
        events.append(("run", unit))
        for op in unit:
            m = _outgoing(place, rank, op)
            if m is not None:
                events.append(("send", m))
                if op.kind == "F" and not forward_only:
                    sent_activation[(op.stage, op.microbatch)] = m
    events.append(("wait_sends", None))
    return events


_GROUPS: dict[tuple[int, ...], dict[str, object]] = {}


def _channel_groups(pp_group) -> dict[str, object]:
    """The four process groups of :data:`CHANNELS` over this pipeline's ranks.

    Built once per pipeline group. ``new_group`` is collective over the world, so every rank
    learns every pipeline's ranks first and all create the groups in the same order.
    """
    ranks = tuple(dist.get_process_group_ranks(pp_group))
    if ranks not in _GROUPS:
        world = [None] * dist.get_world_size()
        dist.all_gather_object(world, ranks)
        for pipeline in sorted(set(world)):
            groups = {name: dist.new_group(list(pipeline)) for name in CHANNELS}
            if pipeline == ranks:
                _GROUPS[ranks] = groups
    return _GROUPS[ranks]


@dataclass
class _Step:
    """Everything one DualPipeV step keeps between events."""

    received: dict = field(default_factory=dict)  # Message -> (work, buffer) of a posted receive
    inbox: dict = field(default_factory=dict)  # (kind, stage, mb) -> input of the op that reads it
    outbox: dict = field(default_factory=dict)  # (kind, stage, mb) -> output bound for another rank
    sends: dict = field(default_factory=dict)  # Message -> (work, payload, activation to free once sent)
    sent_early: set = field(default_factory=set)  # forward outputs sent from inside their pair
    stage_inputs: dict = field(default_factory=dict)  # (stage, mb) -> this stage's first input
    stage_outputs: dict = field(default_factory=dict)  # (stage, mb) -> output (graph kept for B)
    forward_data: list = field(default_factory=list)
    num_tokens: torch.Tensor | None = None
    executed: list = field(default_factory=list)


class DualPipeV:
    """Runs DualPipeV steps over this rank's two model chunks."""

    def __init__(self, model_chunks, config, pp_group, *, seq_length, micro_batch_size, expansion_rate=None):
        if len(model_chunks) != 2:
            raise ValueError(f"DualPipeV needs this rank's two model chunks (way down, way up), got {len(model_chunks)}")
        check_dualpipev_config(config)
        self.chunks = list(model_chunks)
        self.config = config
        self.pp_group = pp_group
        self.rank = pp_group.rank()
        self.size = pp_group.size()
        self.place = placement(SCHEDULE, self.size)
        self.last_stage = self.place.num_stages - 1
        self.peers = dist.get_process_group_ranks(pp_group)
        self.groups = _channel_groups(pp_group)
        if expansion_rate is None:
            from ..mcore.sublayer import streams_of

            expansion_rate = streams_of(self.chunks)
        self.shape = stage_tensor_shape(config, seq_length, micro_batch_size, expansion_rate)
        self.dtype = config.pipeline_dtype or torch.float32
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        # F&B pairs run layer by layer interleaved through megatron-core's combined-1F1B step (its
        # schedule nodes: one pass's all-to-all and sends overlap the other's compute)
        self.overlap = bool(getattr(config, "overlap_moe_expert_parallel_comm", False))

    # -- entry point ------------------------------------------------------------------------

    def step(self, forward_step_func, data_iterator, num_microbatches, *, forward_only=False,
             collect_non_loss_data=False, finalize_kwargs=None):
        """One training (or evaluation) step over ``num_microbatches`` micro-batches.

        Returns the loss records of the last stage (on pipeline rank 0), as Megatron's
        schedules do, and keeps the executed op order in ``self.executed``.
        """
        iterators = chunk_iterators(data_iterator)
        if forward_only:
            ops = [Op("F", s, m) for s in self.place.stages_of(self.rank) for m in range(num_microbatches)]
        else:
            check_microbatches(SCHEDULE, self.size, num_microbatches)
            ops = program(SCHEDULE, self.rank, self.size, num_microbatches)
        self.state = _Step(num_tokens=torch.zeros((), dtype=torch.int, device=self.device))
        self.num_microbatches, self.forward_step_func = num_microbatches, forward_step_func
        self.iterators, self.forward_only, self.collect_non_loss_data = iterators, forward_only, collect_non_loss_data

        handlers = {"post_recv": self._post_recv, "wait_recv": self._wait_recv, "wait_send": self._wait_send,
                    "run": self._run, "send": self._send, "wait_sends": self._wait_sends}
        self.overlapping = overlap = self.overlap and not forward_only
        if overlap:
            from megatron.core.pipeline_parallel.utils import set_streams

            set_streams(high_priority=getattr(self.config, "high_priority_a2a_comm_stream", False))
        with self._no_grad_sync():
            for event, item in rank_events(self.place, self.rank, ops, forward_only, overlap_pairs=overlap):
                handlers[event](item)
        state = self.state
        assert not (state.received or state.inbox or state.outbox or state.sends or state.sent_early
                    or state.stage_outputs), \
            "DualPipeV step left tensors behind"
        self.executed = state.executed
        if not forward_only:
            self._finalize_grads(finalize_kwargs or {})
        return state.forward_data

    # -- ops --------------------------------------------------------------------------------

    def _run(self, unit: tuple[Op, ...]) -> None:
        if self.overlapping:
            self._combined(*unit)
        else:
            for op in unit:
                (self._forward if op.kind == "F" else self._backward)(op)
        self.state.executed.extend(unit)
        self._retire_delivered_sends()

    def _forward_input(self, op: Op):
        x = None if op.stage == 0 else self.state.inbox.pop(("act", op.stage, op.microbatch))
        if x is not None and not self.forward_only:
            x.requires_grad_(True)
        return x

    def _forward(self, op: Op) -> None:
        from megatron.core.pipeline_parallel.schedules import forward_step

        chunk_index = self.place.chunk_of(op.stage)
        x = self._forward_input(op)
        output, tokens = forward_step(
            self.forward_step_func, self.iterators[chunk_index], self.chunks[chunk_index],
            self.num_microbatches, x, self.state.forward_data, self.config,
            cp_group_size=_cp_size(), collect_non_loss_data=self.collect_non_loss_data,
            is_first_microbatch=op.microbatch == 0, current_microbatch=op.microbatch,
            vp_stage=chunk_index, is_last_stage=op.stage == self.last_stage,
        )
        self._forward_done(op, x, output, tokens)

    def _forward_done(self, op: Op, x, output, tokens) -> None:
        if op.stage == self.last_stage:
            self.state.num_tokens += tokens
        elif self.place.rank_of(op.stage + 1) == self.rank:  # bottom of the V: hand over in memory
            self.state.inbox[("act", op.stage + 1, op.microbatch)] = output.detach().clone()
            if not self.forward_only:
                self._free_output(output)
        elif _outgoing(self.place, self.rank, op) not in self.state.sent_early:
            self.state.outbox[("act", op.stage + 1, op.microbatch)] = output
        if not self.forward_only:
            self.state.stage_inputs[(op.stage, op.microbatch)] = x
            self.state.stage_outputs[(op.stage, op.microbatch)] = output

    def _backward_inputs(self, op: Op):
        key = (op.stage, op.microbatch)
        grad = None if op.stage == self.last_stage else self.state.inbox.pop(("grad", *key))
        return self.state.stage_inputs.pop(key), self.state.stage_outputs.pop(key), grad

    def _backward(self, op: Op) -> None:
        from megatron.core.pipeline_parallel.schedules import backward_step

        x, output, grad = self._backward_inputs(op)
        self._backward_done(op, backward_step(x, output, grad, self.config))

    def _backward_done(self, op: Op, input_grad) -> None:
        if op.stage > 0:
            box = self.state.inbox if self.place.rank_of(op.stage - 1) == self.rank else self.state.outbox
            box[("grad", op.stage - 1, op.microbatch)] = input_grad

    def _combined(self, *unit: Op) -> None:
        """One unit through megatron-core's combined forward-backward step: an F&B pair's layers
        interleaved (F of layer i with B of layer L-1-i), or a single F or B as schedule nodes, so
        that every backward finds the schedule plan its forward left on the output."""
        from megatron.core.pipeline_parallel.combined_1f1b import combined_forward_backward_step

        f = next((op for op in unit if op.kind == "F"), None)
        b = next((op for op in unit if op.kind == "B"), None)
        x = self._forward_input(f) if f is not None else None
        bx, b_out, b_grad = self._backward_inputs(b) if b is not None else (None, None, None)
        f_chunk = self.place.chunk_of(f.stage) if f is not None else None
        b_chunk = self.place.chunk_of(b.stage) if b is not None else None
        # megatron-core finds the loss stage from the pipeline rank: chunk 1's is the mirrored one
        seen_rank = self.size - 1 - self.rank if f_chunk == 1 else self.rank
        early = _outgoing(self.place, self.rank, f) if f is not None else None
        post_forward = None
        if early is not None and b is not None:
            # the forward's output leaves as soon as its last layer is done, while the backward's
            # last pieces still run (megatron-core calls this on its communication stream)
            def post_forward(out, vp_stage):
                self._isend(early, out)
                self.state.sent_early.add(early)
        with pipeline_rank_seen_as(seen_rank):
            output, tokens, input_grad = combined_forward_backward_step(
                self.forward_step_func, self.iterators[f_chunk] if f is not None else None,
                self.chunks[f_chunk] if f is not None else None, self.num_microbatches, x,
                self.state.forward_data, self.chunks[b_chunk] if b is not None else None, bx, b_out, b_grad,
                self.config, f_model_chunk_id=f_chunk, collect_non_loss_data=self.collect_non_loss_data,
                is_first_microbatch=f is not None and f.microbatch == 0,
                current_microbatch=f.microbatch if f is not None else None, post_forward=post_forward,
            )
        if f is not None:
            self._forward_done(f, x, output, tokens)
        if b is not None:
            self._backward_done(b, input_grad)

    # -- data movement (the events of rank_events) -------------------------------------------

    def _post_recv(self, m: Message) -> None:
        buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        work = dist.irecv(buffer, src=self.peers[m.src], group=self.groups[m.channel])
        self.state.received[m] = (work, buffer)

    def _wait_recv(self, m: Message) -> None:
        work, buffer = self.state.received.pop(m)
        work.wait()
        self.state.inbox[(m.kind, m.stage, m.microbatch)] = buffer

    def _send(self, m: Message) -> None:
        if m in self.state.sent_early:  # issued from inside its overlapped pair
            self.state.sent_early.discard(m)
            return
        self._isend(m, self.state.outbox.pop((m.kind, m.stage, m.microbatch)))

    def _isend(self, m: Message, tensor: torch.Tensor) -> None:
        if tuple(tensor.shape) != self.shape:
            raise RuntimeError(
                f"stage {m.stage - 1 if m.kind == 'act' else m.stage + 1} produced a {tuple(tensor.shape)} "
                f"tensor but DualPipeV moves {self.shape} between stages ([seq, micro-batch, n*hidden])"
            )
        payload = tensor.detach().to(self.dtype).contiguous()
        work = dist.isend(payload, dst=self.peers[m.dst], group=self.groups[m.channel])
        # a sent activation is pseudo-freed once delivered: its backward needs only the graph
        self.state.sends[m] = (work, payload, tensor if m.kind == "act" and not self.forward_only else None)

    def _wait_send(self, m: Message) -> None:
        entry = self.state.sends.pop(m, None)
        if entry is None:  # already delivered and retired
            return
        work, _, sent = entry
        work.wait()
        self._free_output(sent)

    def _wait_sends(self, _=None) -> None:
        for m in list(self.state.sends):
            self._wait_send(m)

    def _retire_delivered_sends(self) -> None:
        for m, (work, _, sent) in list(self.state.sends.items()):
            if work.is_completed():
                del self.state.sends[m]
                self._free_output(sent)

    def _free_output(self, output) -> None:
        """Pseudo-free a sent activation (Megatron's ``deallocate_pipeline_outputs``): only its
        autograd node is needed for the backward."""
        from megatron.core.pipeline_parallel.schedules import deallocate_output_tensor

        deallocate_output_tensor(output, self.config.deallocate_pipeline_outputs)

    # -- gradient reduction -----------------------------------------------------------------

    @contextlib.contextmanager
    def _no_grad_sync(self):
        funcs = self.config.no_sync_func
        if self.forward_only or funcs is None:
            yield
            return
        funcs = funcs if isinstance(funcs, list) else [funcs] * len(self.chunks)
        with contextlib.ExitStack() as stack:
            for f in funcs:
                stack.enter_context(f())
            yield

    def _finalize_grads(self, finalize_kwargs: dict) -> None:
        if self.config.grad_sync_func is not None:
            funcs = self.config.grad_sync_func
            funcs = funcs if isinstance(funcs, list) else [funcs] * len(self.chunks)
            for f, chunk in zip(funcs, self.chunks):
                f(chunk.parameters())
        if self.config.finalize_model_grads_func is not None:
            tokens = None
            if self.config.calculate_per_token_loss:
                # counted on rank 0 (the loss end of the V); Megatron broadcasts it from the last rank
                tokens = self.state.num_tokens
                dist.broadcast(tokens, src=self.peers[0], group=self.pp_group)
            kwargs = {k: v for k, v in finalize_kwargs.items() if v is not None}
            self.config.finalize_model_grads_func(self.chunks, tokens, **kwargs)


class _SharedMicrobatches:
    """One data iterator read by both chunks of rank 0: chunk 0 (the embedding) draws micro-batch
    i and keeps it until chunk 1 (the loss) asks for micro-batch i, so tokens and labels come from
    the same draw. Chunk 0's forward of a micro-batch always runs before chunk 1's."""

    def __init__(self, source):
        self.source = source
        self.pending: collections.deque = collections.deque()

    def way_down(self):
        while True:
            try:
                batch = next(self.source)
            except StopIteration:
                return
            self.pending.append(batch)
            yield batch

    def way_up(self):
        while True:
            if not self.pending:
                raise RuntimeError("DualPipeV: the loss chunk asked for a micro-batch the embedding chunk has not read")
            yield self.pending.popleft()


def chunk_iterators(data_iterator) -> list:
    """The data iterator of each chunk: Megatron's list (one iterator per chunk, each over the same
    micro-batches) as it is, or one shared iterator split so both chunks see the same draws."""
    if isinstance(data_iterator, (list, tuple)):
        if len(data_iterator) != 2:
            raise ValueError(f"DualPipeV takes one data iterator or one per chunk (2), got {len(data_iterator)}")
        return list(data_iterator)
    if data_iterator is None:
        return [None, None]
    shared = _SharedMicrobatches(data_iterator)
    return [shared.way_down(), shared.way_up()]


def stage_tensor_shape(config, seq_length: int, micro_batch_size: int, expansion_rate: int) -> tuple:
    """``[seq, micro-batch, n*hidden]``: what crosses a stage boundary (seq split by CP, and by TP under SP)."""
    seq = seq_length // (config.context_parallel_size or 1)
    if config.sequence_parallel:
        seq //= config.tensor_model_parallel_size
    return (seq, micro_batch_size, expansion_rate * config.hidden_size)


def _cp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_world_size()
