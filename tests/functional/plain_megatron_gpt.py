"""The reference entry of the functional tests: Megatron's own GPT pre-training, with no hook of
mhc-megatron installed (what a Megatron-LM checkout's ``pretrain_gpt.py`` does for mock data,
written here from Megatron's public pieces, independently of ``mhc_megatron.training.gpt_entry``).

One process, TP = PP = 1, mock data: the setting of the functional matrix's first case.
"""

from __future__ import annotations

import sys
from functools import partial

import torch


def _datasets(train_val_test_num_samples, vp_stage=None):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training import get_args

    args = get_args()
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=None, split=args.split,
        tokenizer=build_tokenizer(args), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=args.create_attention_mask_in_dataloader,
    )
    return BlendedMegatronDatasetBuilder(MockGPTDataset, train_val_test_num_samples, lambda: True, config).build()


_datasets.is_distributed = True


def _loss(loss_mask, output_tensor):
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    tokens = mask.sum().to(torch.int)
    return loss, tokens, {"lm loss": torch.cat([loss.detach().view(1), tokens.view(1)])}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"], loss_mask=batch["loss_mask"])
    return output, partial(_loss, batch["loss_mask"])


def main(argv: list[str]) -> int:
    import megatron.training.initialize as initialize
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    sys.argv = ["plain-megatron-gpt", *argv]
    args = parse_and_validate_args(args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    if args.tensor_model_parallel_size != 1 or args.pipeline_model_parallel_size != 1:
        raise SystemExit("plain_megatron_gpt runs TP = PP = 1 only")
    initialize._compile_dependencies = lambda: None  # the wheel ships the compiled dataset helpers
    model_cfg = gpt_config_from_args(args)
    pretrain(pretrain_cfg_container_from_args(args, model_cfg), _datasets, ModelType.encoder_or_decoder, _forward_step)
    return 0
