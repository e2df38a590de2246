"""Workers for the multi-process checkpoint-conversion tests: an mHC GPT model saved and loaded at a
given TP/PP layout (spawned gloo processes)."""

from __future__ import annotations

import torch

from mcore_helpers import SEQ, VOCAB, init_megatron, local_block_spec, tiny_config
from mhc_megatron.mcore import MHCSettings, configure_pipeline

LAYERS = 4


def _stage_model(tp, pp, seed):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    settings = MHCSettings(mode="mhc", expansion_rate=4)
    cfg = tiny_config(num_layers=LAYERS, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                      pipeline_dtype=torch.float32)
    configure_pipeline(cfg, settings)
    rank = parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    model = GPTModel(cfg, local_block_spec(cfg, settings, pp_rank=rank), vocab_size=VOCAB, max_sequence_length=SEQ,
                     pre_process=rank == 0, post_process=rank == pp - 1, share_embeddings_and_output_weights=False)
    with torch.no_grad():  # away from the initial values (the same on every TP rank: same seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + p.numel())))
    return model


def save_at(rank, world_size, port, tp, pp, directory):
    from megatron.core import dist_checkpointing

    init_megatron(rank, world_size, port, tp=tp, pp=pp)
    dist_checkpointing.save(_stage_model(tp, pp, seed=5).sharded_state_dict(), directory)


def load_and_save_at(rank, world_size, port, tp, pp, source, target):
    """Load ``source`` into a differently initialised model at this layout, save it to ``target``."""
    from megatron.core import dist_checkpointing

    init_megatron(rank, world_size, port, tp=tp, pp=pp)
    model = _stage_model(tp, pp, seed=77)
    sharded = model.sharded_state_dict()
    state = dist_checkpointing.load(sharded, source)
    model.load_state_dict({k: state[k] for k in sharded})
    dist_checkpointing.save(model.sharded_state_dict(), target)
