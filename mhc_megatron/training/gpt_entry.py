"""A built-in GPT (and HybridModel) pre-training entry for installs without a Megatron-LM checkout.

The megatron-core wheel ships ``megatron.training`` but not Megatron-LM's ``pretrain_gpt.py``.
This module provides the two callbacks ``pretrain`` needs for plain GPT pre-training on mock or
indexed (``--data-path``) data: the dataset provider and the forward step. Features that live
only in the checkout's script (SFT, FIM, packed sequences, knowledge distillation, ModelOpt)
are refused with a pointer to ``--megatron-lm PATH``, which runs that script instead.
"""

from __future__ import annotations

from functools import partial

import torch

UNSUPPORTED_WITHOUT_CHECKOUT = {
    "sft": "--sft",
    "fim_data": "--fim-data",
    "dataloader_inter_document_masking": "--dataloader-inter-document-masking",
    "hybrid_context_parallel": "--hybrid-context-parallel",
    "logits_load_dir": "--logits-load-dir",
}


def check_supported(args) -> None:
    for attr, flag in UNSUPPORTED_WITHOUT_CHECKOUT.items():
        if getattr(args, attr, None):
            raise ValueError(
                f"{flag} needs Megatron-LM's own pretrain_gpt.py: pass --megatron-lm "
                "/path/to/Megatron-LM (or set MEGATRON_LM) to run it with mHC"
            )


def _dataset_config(args):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        num_dataset_builder_threads=args.num_dataset_builder_threads,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=build_tokenizer(args),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
        context_parallel_size=args.context_parallel_size,
        data_parallel_size=args.data_parallel_size,
        sequence_parallel_size=args.tensor_model_parallel_size * args.sequence_parallel,
    )


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Mock data (``--mock-data``) or indexed GPT datasets (``--data-path``)."""
    from megatron.core import mpu
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args
    args = get_args()
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset

    def built_on_this_rank():
        return mpu.get_tensor_model_parallel_rank() == 0 and _holds_batch(vp_stage)

    return BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, built_on_this_rank, _dataset_config(args)
    ).build()


train_valid_test_datasets_provider.is_distributed = True

_BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def _dualpipev() -> bool:
    from megatron.training import get_args

    return getattr(get_args(), "pipeline_schedule", "default") == "dualpipev"


def _holds_batch(vp_stage) -> bool:
    """Whether this chunk reads micro-batches: the first and last stage (both on pipeline rank 0
    under DualPipeV)."""
    return any(_stage_ends(vp_stage))


def _stage_ends(vp_stage) -> tuple[bool, bool]:
    """(first stage, last stage) of this rank's chunk ``vp_stage``: what it reads of a batch (the
    tokens, the labels)."""
    from megatron.core import mpu

    if _dualpipev():
        from .dualpipev import stage_ends

        return stage_ends(vp_stage)
    ignore_virtual = vp_stage is None
    return (mpu.is_pipeline_first_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
            mpu.is_pipeline_last_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage))


def get_batch(data_iterator, vp_stage=None):
    """This rank's micro-batch: read on tensor-parallel rank 0, broadcast, split for CP."""
    from megatron.core import mpu
    from megatron.core.utils import get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
    from megatron.training import get_args

    args = get_args()
    first, last = _stage_ends(vp_stage)
    if not (first or last):
        return {key: None for key in _BATCH_KEYS}
    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        raw = next(data_iterator)
        batch = {k: (raw[k].cuda(non_blocking=True) if raw.get(k) is not None else None) for k in _BATCH_KEYS}
    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=False,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=tp_rank,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=False,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=first,
        is_pipeline_last_stage=last,
    )
    return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=mpu.get_context_parallel_group())


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Summed masked token loss, token count, and the 'lm loss' report Megatron logs."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    if get_args().check_for_nan_in_loss_and_grad:
        machine = get_rerun_state_machine()
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            machine.validate_result(
                result=loss, rejection_func=reject, message=f"found {what} in local forward loss",
                tolerance=0.0, fatal=True,
            )
    return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """One micro-batch's forward; ``return_schedule_plan``: the model's fine-grained schedule plan
    instead (megatron-core's combined 1F1B with ``--overlap-moe-expert-parallel-comm`` asks for it)."""
    from megatron.core.utils import get_attr_wrapped_model
    from megatron.training import get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    batch = get_batch(data_iterator, get_attr_wrapped_model(model, "vp_stage"))
    timers("batch-generator").stop()
    inputs = (batch["tokens"], batch["position_ids"], batch["attention_mask"])
    if return_schedule_plan:
        plan = model.build_schedule_plan(*inputs, labels=batch["labels"], loss_mask=batch["loss_mask"])
        return plan, partial(loss_func, batch["loss_mask"])
    output = model(*inputs, labels=batch["labels"], loss_mask=batch["loss_mask"])
    return output, partial(loss_func, batch["loss_mask"])
