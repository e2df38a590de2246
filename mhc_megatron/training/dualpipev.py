"""megatron.training glue for ``--pipeline-schedule dualpipev``.

Three pieces:

- the model config becomes a :class:`DualPipeVGPTModelConfig`, whose ``builder`` (megatron.training's
  declared seam, a class variable naming the builder) is :class:`DualPipeVGPTModelBuilder`, which
  builds chunk 0 and chunk 1 of a rank as stages r and 2P-1-r of the V;
- hook ``dualpipev-schedule`` (:mod:`mhc_megatron.hooks`): ``megatron.training.training.get_forward_backward_func``
  returns :func:`forward_backward_dualpipev`, which runs the schedule and hands the loss records to the
  last pipeline rank, where Megatron's training loop reads and logs them;
- the built-in entry's batch loader (:mod:`.gpt_entry`) asks :func:`stage_ends` what each chunk
  reads: chunk 0 of pipeline rank 0 the tokens, its chunk 1 the labels, nothing elsewhere.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import ClassVar

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig

from ..pipeline.dualpipev import (
    DualPipeV,
    check_dualpipev_config,
    chunk_pg_collection,
    chunk_placements,
    pipeline_rank_seen_as,
)


def _unmirror(model, mirrored_collection, real_group) -> None:
    """The built chunk keeps the real pipeline group: the mirrored view only steers construction."""
    mirror = mirrored_collection.pp
    mirrored_collection.pp = real_group
    for module in model.modules():
        for name, value in vars(module).items():
            if value is mirror:
                setattr(module, name, real_group)


class DualPipeVGPTModelBuilder(GPTModelBuilder):
    """Builds this rank's two DualPipeV chunks; Megatron's pre/post-process guesses are replaced
    by the V's (rank 0 holds both the embedding and the output layer)."""

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None):
        if vp_stage not in (0, 1):
            raise ValueError(f"DualPipeV builds chunks 0 and 1 of a rank, got vp_stage={vp_stage}")
        pp = pg_collection.pp
        place = chunk_placements(pp.rank(), pp.size())[vp_stage]
        collection = chunk_pg_collection(pg_collection, place)
        with pipeline_rank_seen_as(place.pp_rank):
            model = super().build_model(
                collection, pre_process=place.pre_process, post_process=place.post_process, vp_stage=vp_stage,
            )
        if collection is not pg_collection:
            _unmirror(model, collection, pp)
        return model


@dataclasses.dataclass(kw_only=True)
class DualPipeVGPTModelConfig(GPTModelConfig):
    """A ``GPTModelConfig`` whose builder places the chunks as the V (no fields of its own)."""

    builder: ClassVar[str] = f"{DualPipeVGPTModelBuilder.__module__}.{DualPipeVGPTModelBuilder.__qualname__}"


def use_dualpipev(model_cfg) -> DualPipeVGPTModelConfig:
    """``model_cfg`` (a ``GPTModelConfig``), checked for DualPipeV, as a config that builds V chunks."""
    check_dualpipev_config(model_cfg.transformer)
    if model_cfg.share_embeddings_and_output_weights and model_cfg.transformer.pipeline_model_parallel_size > 1:
        raise ValueError(
            "DualPipeV keeps the embedding (chunk 0) and the output layer (chunk 1) as two chunks of "
            "rank 0 and does not tie their weights: add --untie-embeddings-and-output-weights"
        )
    dual = copy.copy(model_cfg)
    # same fields, only the builder differs; object.__setattr__ because GPTModelConfig forwards
    # attribute writes to its TransformerConfig
    object.__setattr__(dual, "__class__", DualPipeVGPTModelConfig)
    return dual


def get_forward_backward_func(*args, **kwargs):
    """What hook ``dualpipev-schedule`` puts in place of megatron.training's own function."""
    return forward_backward_dualpipev


def stage_ends(vp_stage) -> tuple[bool, bool]:
    """(first stage, last stage) for this rank's chunk ``vp_stage``: both ends of the V are on
    pipeline rank 0, chunk 0 the embedding, chunk 1 the loss."""
    group = parallel_state.get_pipeline_model_parallel_group()  # its rank, not the override (which
    # the runtime sets to the mirrored rank around chunk 1's combined steps)
    place = chunk_placements(group.rank(), group.size())[vp_stage]
    return place.pre_process, place.post_process


def forward_backward_dualpipev(
    *, forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size,
    decoder_seq_length=None, forward_only=False, collect_non_loss_data=False, first_val_step=None,
    adjust_tensor_shapes_fn=None, p2p_communicator=None, pg_collection=None, force_all_reduce=False,
):
    """Drop-in for the function ``get_forward_backward_func`` returns.

    Returns the loss records on the last pipeline rank (empty elsewhere), as Megatron's own
    schedules do, although DualPipeV computes them on rank 0.
    """
    from megatron.core.utils import get_model_config

    config = get_model_config(model[0])
    pp_group = pg_collection.pp if pg_collection is not None else parallel_state.get_pipeline_model_parallel_group()
    runner = DualPipeV(model, config, pp_group, seq_length=seq_length, micro_batch_size=micro_batch_size)
    records = runner.step(forward_step_func, data_iterator, num_microbatches, forward_only=forward_only,
                          collect_non_loss_data=collect_non_loss_data,
                          finalize_kwargs={"pg_collection": pg_collection, "force_all_reduce": force_all_reduce})
    forward_backward_dualpipev.last_executed = runner.executed
    return hand_records_to_last_rank(records, pp_group)


def hand_records_to_last_rank(records: list, pp_group) -> list:
    size = pp_group.size()
    if size == 1:
        return records
    box = [records if pp_group.rank() == 0 else None]
    dist.broadcast_object_list(box, src=dist.get_process_group_ranks(pp_group)[0], group=pp_group)
    return box[0] if pp_group.rank() == size - 1 else []
