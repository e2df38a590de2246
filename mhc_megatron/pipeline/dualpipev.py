"""The DualPipeV pipeline schedule for Megatron model chunks, carrying the n-stream residual.

Placement (the "V"): pipeline rank r of P holds two model chunks, stage r (chunk 0, the way
down) and stage 2P-1-r (chunk 1, the way back up). Rank 0 therefore holds both the embedding
and the loss, and rank P-1 hands its chunk-0 output to its own chunk 1 without communication.

The order of work is the program of ``program.py`` (the one the simulator runs); this module
only executes it. What it adds over Megatron's schedules:

- every send is asynchronous and every receive is posted ahead of the op that needs it, so the
  n-stream tensors (n times the residual's bytes) travel while the rank computes the other half
  of an F&B pair;
- activations and gradients travel on separate process groups, so each channel delivers its
  messages in micro-batch order on NCCL (which matches messages by order, not tag) as on gloo;
- each stage keeps the tensor it received as its own first input until its backward is done,
  so recomputing the stage's first mHC block reads a local tensor and never waits on a peer.

All state of one step lives in :class:`_Step`. Weight-gradient deferral (the ``W`` ops) needs
layers that can split their backward (Transformer Engine's ``delay_wgrad_compute``); with other
layers ``B`` computes weight gradients too and ``W`` is empty, which the schedule logs once.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .program import Op, check_microbatches, placement, program

log = logging.getLogger(__name__)

SCHEDULE = "dualpipev"
_LOOKAHEAD = 2  # ops ahead whose inputs are already being received


# ---------------------------------------------------------------------------------------------
# building the two chunks of a rank


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


_CHANNELS: dict[tuple[int, ...], dict[str, object]] = {}


def _channels(pp_group) -> dict[str, object]:
    """Two process groups over this pipeline's ranks: one for activations, one for gradients.

    Built once per pipeline group. ``new_group`` is collective over the world, so every rank
    learns every pipeline's ranks first and all create the groups in the same order.
    """
    ranks = tuple(dist.get_process_group_ranks(pp_group))
    if ranks not in _CHANNELS:
        world = [None] * dist.get_world_size()
        dist.all_gather_object(world, ranks)
        for pipeline in sorted(set(world)):
            groups = {kind: dist.new_group(list(pipeline)) for kind in ("act", "grad")}
            if pipeline == ranks:
                _CHANNELS[ranks] = groups
    return _CHANNELS[ranks]


@dataclass
class _Step:
    """Everything one DualPipeV step keeps between ops."""

    received: dict = field(default_factory=dict)  # (kind, stage, mb) -> (work | None, tensor)
    stage_inputs: dict = field(default_factory=dict)  # (stage, mb) -> this stage's first input
    stage_outputs: dict = field(default_factory=dict)  # (stage, mb) -> output (graph kept for B)
    local: dict = field(default_factory=dict)  # hand-offs between the two chunks of one rank
    sends: list = field(default_factory=list)  # (work, tensor, pseudo-free after delivery)
    deferred_weights: list = field(default_factory=list)
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
        self.groups = _channels(pp_group)
        if expansion_rate is None:
            from ..mcore.sublayer import streams_of

            expansion_rate = streams_of(self.chunks)
        self.shape = stage_tensor_shape(config, seq_length, micro_batch_size, expansion_rate)
        self.dtype = config.pipeline_dtype or torch.float32
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self._warned_weights = False

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

        with self._no_grad_sync():
            for i, op in enumerate(ops):
                for ahead in ops[i : i + _LOOKAHEAD + 1]:
                    self._post_receive(ahead)
                {"F": self._forward, "B": self._backward, "W": self._weights}[op.kind](op)
                self.state.executed.append(op)
                self._retire_sends(block=False)
            self._retire_sends(block=True)
        assert not self.state.received and not self.state.stage_outputs, "DualPipeV step left tensors behind"
        self.executed = self.state.executed
        if not forward_only:
            self._finalize_grads(finalize_kwargs or {})
        return self.state.forward_data

    # -- ops --------------------------------------------------------------------------------

    def _forward(self, op: Op) -> None:
        from megatron.core.pipeline_parallel.schedules import forward_step

        chunk_index = self.place.chunk_of(op.stage)
        x = None if op.stage == 0 else self._take_input("act", op)
        if x is not None and not self.forward_only:
            x.requires_grad_(True)
        output, tokens = forward_step(
            self.forward_step_func, self.iterators[chunk_index], self.chunks[chunk_index],
            self.num_microbatches, x, self.state.forward_data, self.config,
            cp_group_size=_cp_size(), collect_non_loss_data=self.collect_non_loss_data,
            is_first_microbatch=op.microbatch == 0, current_microbatch=op.microbatch,
            vp_stage=chunk_index, is_last_stage=op.stage == self.last_stage,
        )
        if op.stage == self.last_stage:
            self.state.num_tokens += tokens
        else:
            self._send("act", op.stage + 1, op.microbatch, output, free_after=not self.forward_only)
        if not self.forward_only:
            self.state.stage_inputs[(op.stage, op.microbatch)] = x
            self.state.stage_outputs[(op.stage, op.microbatch)] = output

    def _backward(self, op: Op) -> None:
        from megatron.core.pipeline_parallel.schedules import backward_step

        key = (op.stage, op.microbatch)
        grad = None if op.stage == self.last_stage else self._take_input("grad", op)
        x, output = self.state.stage_inputs.pop(key), self.state.stage_outputs.pop(key)
        self._retire_sends(block=False, output=output)  # its send must be done (and the tensor freed)
        input_grad = backward_step(x, output, grad, self.config)
        if not op.with_weights:
            self.state.deferred_weights.append(self._weight_pass(self.chunks[self.place.chunk_of(op.stage)]))
        if op.stage > 0:
            self._send("grad", op.stage - 1, op.microbatch, input_grad, free_after=False)

    def _weights(self, op: Op) -> None:
        self.state.deferred_weights.pop(0)()

    def _weight_pass(self, chunk):
        """The deferred weight-gradient pass of ``chunk``'s last backward, if its layers can defer."""
        if getattr(self.config, "delay_wgrad_compute", False) and hasattr(_unwrap(chunk), "backward_dw"):
            return _unwrap(chunk).backward_dw
        if not self._warned_weights:
            log.info("DualPipeV: these layers compute weight gradients inside the backward pass; "
                     "W slots stay empty (Transformer Engine's delay_wgrad_compute fills them)")
            self._warned_weights = True
        return lambda: None

    # -- data movement ----------------------------------------------------------------------

    def _source(self, op: Op):
        """(channel, peer stage) the op's input comes from, or None when it needs none."""
        peer = self.place.input_stage(op)
        return None if peer is None else ("act" if op.kind == "F" else "grad", peer)

    def _post_receive(self, op: Op) -> None:
        src = self._source(op)
        if src is None or self.forward_only and op.kind != "F":
            return
        kind, peer_stage = src
        key = (kind, op.stage, op.microbatch)
        if key in self.state.received or self.place.rank_of(peer_stage) == self.rank:
            return
        buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        peer = self.peers[self.place.rank_of(peer_stage)]
        work = dist.irecv(buffer, src=peer, group=self.groups[kind])
        self.state.received[key] = (work, buffer)

    def _take_input(self, kind: str, op: Op) -> torch.Tensor:
        key = (kind, op.stage, op.microbatch)
        if key in self.state.local:
            return self.state.local.pop(key)
        self._post_receive(op)
        work, tensor = self.state.received.pop(key)
        work.wait()
        return tensor

    def _send(self, kind: str, to_stage: int, microbatch: int, tensor: torch.Tensor, free_after: bool) -> None:
        if self.place.rank_of(to_stage) == self.rank:  # bottom of the V: hand over in memory
            if kind == "act":
                self.state.local[(kind, to_stage, microbatch)] = tensor.detach().clone()
                self._free_output(tensor if free_after else None)
            else:
                self.state.local[(kind, to_stage, microbatch)] = tensor
            return
        if tuple(tensor.shape) != self.shape:
            raise RuntimeError(
                f"stage {to_stage - 1 if kind == 'act' else to_stage + 1} produced a {tuple(tensor.shape)} "
                f"tensor but DualPipeV moves {self.shape} between stages ([seq, micro-batch, n*hidden])"
            )
        payload = tensor.detach().to(self.dtype).contiguous()
        work = dist.isend(payload, dst=self.peers[self.place.rank_of(to_stage)], group=self.groups[kind])
        self.state.sends.append((work, payload, tensor if free_after else None))

    def _free_output(self, output) -> None:
        """Pseudo-free a sent activation (Megatron's ``deallocate_pipeline_outputs``): only its
        autograd node is needed for the backward."""
        from megatron.core.pipeline_parallel.schedules import deallocate_output_tensor

        deallocate_output_tensor(output, self.config.deallocate_pipeline_outputs)

    def _retire_sends(self, block: bool, output=None) -> None:
        """Release delivered messages and pseudo-free their activations. ``output``: wait for the
        send of this tensor in particular (its backward is next)."""
        pending = []
        for work, payload, sent in self.state.sends:
            if block or (output is not None and sent is output):
                work.wait()
            elif not work.is_completed():
                pending.append((work, payload, sent))
                continue
            self._free_output(sent)
        self.state.sends = pending

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


def _unwrap(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
