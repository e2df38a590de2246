"""Workers for the launcher tests: each runs in a fresh process (Megatron's global args can be
set only once per process)."""

import sys

import torch

from mcore_helpers import init_megatron, make_batch

TINY_GPT_ARGS = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
    "--max-position-embeddings 16 --micro-batch-size 2 --train-iters 10 --lr 1e-3 "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 96 --transformer-impl local "
    "--normalization RMSNorm --use-cpu-initialization --no-persist-layer-norm "
    "--no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-dropout-fusion"
).split()


def build_from_cli(rank, world_size, port, extra_args):
    """Parse a Megatron command line through the launcher's hooks and build the model."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.models.gpt import GPTModelBuilder

    from mhc_megatron.training.launcher import install_hooks

    init_megatron(rank, world_size, port)
    install_hooks()
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.arguments import parse_and_validate_args

    sys.argv = ["mhc-pretrain-gpt", *TINY_GPT_ARGS, *extra_args]
    args = parse_and_validate_args()
    model_cfg = gpt_config_from_args(args)
    model = GPTModelBuilder(model_cfg).build_model(ProcessGroupCollection.use_mpu_process_groups())
    tokens, positions, labels = make_batch()
    mask = torch.triu(torch.ones(1, 1, 16, 16, dtype=torch.bool), 1)
    loss = model(tokens, positions, mask, labels=labels).float().mean()
    loss.backward()
    return {
        "settings": model_cfg.transformer.mhc_settings,
        "input_module": type(model.decoder.layers[0].input_layernorm).__name__,
        "final_norm": type(model.decoder.final_layernorm).__name__,
        "loss": loss.item(),
    }
