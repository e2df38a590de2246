"""Workers for the pipeline tests: the single-process reference and Megatron's PP schedules."""

from __future__ import annotations

import contextlib
import re
from unittest import mock

import torch

from mcore_helpers import BATCH, SEQ, VOCAB, init_megatron, local_block_spec, make_batch, tiny_config
from mhc_megatron.mcore import MHCSettings, configure_pipeline

LAYERS = 4
MICROBATCHES = 4
# gloo's batch_isend_irecv mismatches messages in the interleaved schedule (the residual model
# too gets wrong inputs from the third micro-batch on); plain isend/irecv are exact.
CONFIG_OVERRIDES: dict = {"batch_p2p_comm": False}


def _settings(mode, recompute=False):
    return MHCSettings(mode=mode, expansion_rate=4, recompute=recompute, recompute_block_size=3)


def _batches(count=MICROBATCHES):
    return [make_batch(seed=100 + i) for i in range(count)]


def assert_gradients_match(ref: dict, ranks: list[dict]) -> None:
    """Every parameter gradient of the pipelined run (gathered from its ranks under global layer
    names) equals the single-process one."""
    grads = {}
    for r in ranks:
        grads.update(r["grads"])
    assert grads.keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@contextlib.contextmanager
def cpu_schedules():
    """Test-only, for the ``with`` block: Megatron's schedules create their token counter with
    device="cuda"; ``schedules.torch`` answers with a CPU tensor there (restored on exit)."""
    from megatron.core.pipeline_parallel import schedules

    real = schedules.torch

    class _Torch:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def zeros(*args, **kwargs):
            if kwargs.get("device") == "cuda":
                kwargs["device"] = "cpu"
            return real.zeros(*args, **kwargs)

    with mock.patch.object(schedules, "torch", _Torch()):
        yield


def reference(rank, world_size, port, mode, state_path, recompute=False, layers=LAYERS, microbatches=MICROBATCHES):
    """Full model in one process: saves its weights and returns loss and gradients."""
    from megatron.core.models.gpt import GPTModel

    init_megatron(rank, world_size, port)
    cfg = tiny_config(num_layers=layers)
    torch.manual_seed(5)
    model = GPTModel(cfg, local_block_spec(cfg, _settings(mode, recompute)), vocab_size=VOCAB,
                     max_sequence_length=SEQ, share_embeddings_and_output_weights=False)
    torch.save(model.state_dict(), state_path)
    losses = []
    for tokens, positions, labels in _batches(microbatches):
        loss = model(tokens, positions, None, labels=labels).float().mean() / microbatches
        loss.backward()
        losses.append(loss.item() * microbatches)
    return {"losses": losses, "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def _global_name(name: str, offset: int) -> str:
    return re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)


def megatron_pipeline(rank, world_size, port, mode, state_path, vpp, recompute=False):
    """Megatron's 1F1B (vpp=None) or interleaved schedule over ``world_size`` stages."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    init_megatron(rank, world_size, port, pp=world_size, virtual_pipeline_model_parallel_size=vpp)
    cfg = tiny_config(num_layers=LAYERS, pipeline_model_parallel_size=world_size,
                      virtual_pipeline_model_parallel_size=vpp, pipeline_dtype=torch.float32, **CONFIG_OVERRIDES)
    settings = _settings(mode, recompute)
    configure_pipeline(cfg, settings)
    full_state = torch.load(state_path)
    chunks, offsets = [], []
    stages = vpp or 1
    for v in range(stages):
        vp = v if vpp else None
        model = GPTModel(
            cfg, local_block_spec(cfg, settings, vp_stage=vp, pp_rank=rank), vocab_size=VOCAB,
            max_sequence_length=SEQ, share_embeddings_and_output_weights=False,
            pre_process=(rank == 0 and v == 0), post_process=(rank == world_size - 1 and v == stages - 1),
            vp_stage=vp,
        )
        offset = get_transformer_layer_offset(cfg, vp_stage=vp, pp_rank=rank)
        state = {k: full_state[_global_name(k, offset)] for k in model.state_dict()}
        model.load_state_dict(state)
        chunks.append(model)
        offsets.append(offset)

    def forward_step(data_iterator, model):
        tokens, positions, labels = next(data_iterator)
        out = model(tokens, positions, None, labels=labels)
        return out, lambda o: (o.float().mean(), {"lm loss": o.float().mean().detach()})

    iterators = [iter(_batches()) for _ in chunks]
    with cpu_schedules():
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if vpp else iterators[0],
            model=chunks,
            num_microbatches=MICROBATCHES,
            seq_length=SEQ,
            micro_batch_size=BATCH,
        )
    result = _chunk_results(chunks, offsets, losses)
    result["sublayers"] = sorted(s for chunk in result["chunk_sublayers"] for s in chunk)
    return result


def _chunk_results(chunks, offsets, losses) -> dict:
    """Losses, gradients under global layer names, recompute blocks and sublayers per chunk."""
    grads = {}
    for model, offset in zip(chunks, offsets):
        for name, p in model.named_parameters():
            grads[_global_name(name, offset)] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    blocks = sorted(
        {(m.recompute.first_sublayer, m.recompute.size) for c in chunks for m in c.modules()
         if getattr(m, "recompute", None) is not None}
    )
    return {"losses": [float(d["lm loss"]) for d in losses], "grads": grads, "blocks": blocks,
            "chunk_sublayers": [sorted(2 * (o + i) + j for i in range(len(c.decoder.layers)) for j in (0, 1))
                                for c, o in zip(chunks, offsets)]}


def _forward_step(data_iterator, model):
    tokens, positions, labels = next(data_iterator)
    out = model(tokens, positions, None, labels=labels)
    return out, lambda o: (o.float().mean(), {"lm loss": o.float().mean().detach()})


def dualpipev(rank, world_size, port, mode, state_path, layers, microbatches, recompute=False, steps=1,
              forward_only=False):
    """Our DualPipeV schedule over ``world_size`` ranks (2 x world_size stages)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.process_groups_config import ProcessGroupCollection

    from mhc_megatron.pipeline.dualpipev import DualPipeV, chunk_pg_collection, chunk_placements

    init_megatron(rank, world_size, port, pp=world_size, virtual_pipeline_model_parallel_size=2)
    cfg = tiny_config(num_layers=layers, pipeline_model_parallel_size=world_size,
                      virtual_pipeline_model_parallel_size=2, pipeline_dtype=torch.float32,
                      deallocate_pipeline_outputs=True)  # as mhc-pretrain-gpt runs it
    settings = _settings(mode, recompute)
    configure_pipeline(cfg, settings)
    full_state = torch.load(state_path)
    pgc = ProcessGroupCollection.use_mpu_process_groups()
    chunks, offsets = [], []
    for place in chunk_placements(rank, world_size):
        model = GPTModel(
            cfg, local_block_spec(cfg, settings, vp_stage=place.vp_stage, pp_rank=place.pp_rank),
            vocab_size=VOCAB, max_sequence_length=SEQ, share_embeddings_and_output_weights=False,
            pre_process=place.pre_process, post_process=place.post_process, vp_stage=place.vp_stage,
            pg_collection=chunk_pg_collection(pgc, place),
        )
        offset = model.decoder.layers[0].layer_number - 1
        assert offset == place.stage * layers // (2 * world_size), (offset, place)
        model.load_state_dict({k: full_state[_global_name(k, offset)] for k in model.state_dict()})
        chunks.append(model)
        offsets.append(offset)
    runner = DualPipeV(chunks, cfg, pgc.pp, seq_length=SEQ, micro_batch_size=BATCH)
    if forward_only:  # evaluation: any number of micro-batches, no gradients
        with torch.no_grad():
            records = runner.step(_forward_step, [iter(_batches(microbatches)) for _ in chunks], microbatches,
                                  forward_only=True)
        return {"losses": [float(d["lm loss"]) for d in records],
                "grads": sum(p.grad is not None for c in chunks for p in c.parameters())}
    for _ in range(steps):
        for c in chunks:
            c.zero_grad(set_to_none=True)
        losses = runner.step(_forward_step, [iter(_batches(microbatches)) for _ in chunks], microbatches)
    result = _chunk_results(chunks, offsets, losses)
    result["executed"] = [str(op) for op in runner.executed]
    return result


def _hybrid_model(cfg, mode, pattern, **kwargs):
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from mhc_megatron.mcore.attention import SDPACoreAttention
    from mhc_megatron.mcore.hybrid import local_hybrid_stack_spec, mhc_hybrid_stack_spec

    stack = mhc_hybrid_stack_spec(local_hybrid_stack_spec(SDPACoreAttention), _settings(mode), pattern)
    return HybridModel(cfg, stack, vocab_size=VOCAB, max_sequence_length=SEQ, hybrid_layer_pattern=pattern,
                       position_embedding_type="none", share_embeddings_and_output_weights=False, **kwargs)


def hybrid_reference(rank, world_size, port, mode, state_path):
    init_megatron(rank, world_size, port)
    torch.manual_seed(5)
    model = _hybrid_model(tiny_config(num_layers=4), mode, "*-*-")
    torch.save(model.state_dict(), state_path)
    losses = []
    for tokens, positions, labels in _batches():
        loss = model(tokens, positions, None, labels=labels).float().mean() / MICROBATCHES
        loss.backward()
        losses.append(loss.item() * MICROBATCHES)
    return {"losses": losses, "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def hybrid_pipeline(rank, world_size, port, mode, state_path):
    """HybridModel with the pattern's two pipeline segments under Megatron's 1F1B."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    init_megatron(rank, world_size, port, pp=world_size)
    cfg = tiny_config(num_layers=4, pipeline_model_parallel_size=world_size, pipeline_dtype=torch.float32,
                      **CONFIG_OVERRIDES)
    configure_pipeline(cfg, _settings(mode))
    model = _hybrid_model(cfg, mode, "*-|*-", pre_process=rank == 0, post_process=rank == world_size - 1)
    offset = model.decoder.layers[0].layer_number - 1
    full = torch.load(state_path)
    model.load_state_dict({k: full[_global_name(k, offset)] for k in model.state_dict()})
    with cpu_schedules():
        losses = get_forward_backward_func()(
            forward_step_func=_forward_step, data_iterator=iter(_batches()), model=[model],
            num_microbatches=MICROBATCHES, seq_length=SEQ, micro_batch_size=BATCH,
        )
    grads = {_global_name(n, offset): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"losses": [float(d["lm loss"]) for d in losses], "grads": grads}
