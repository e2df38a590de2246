"""Workers for the launcher tests: each runs in a fresh process (Megatron's global args can be
set only once per process)."""

import sys

import torch

from mcore_helpers import init_megatron, make_batch
from mhc_megatron.mcore.portable import PORTABLE_FLAGS

TINY_GPT_ARGS = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
    "--max-position-embeddings 16 --micro-batch-size 2 --train-iters 10 --lr 1e-3 "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 96 --transformer-impl local "
    "--normalization RMSNorm"
).split() + list(PORTABLE_FLAGS)


def build_from_cli(rank, world_size, port, extra_args):
    """Parse a Megatron command line through the launcher's hooks and build the model."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.models.gpt import GPTModelBuilder

    from mhc_megatron.training.launcher import install_hooks

    init_megatron(rank, world_size, port)
    state = install_hooks()
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
        "settings": state.settings,
        "input_module": type(model.decoder.layers[0].input_layernorm).__name__,
        "final_norm": type(model.decoder.final_layernorm).__name__,
        "loss": loss.item(),
    }


def dualpipev_from_cli(rank, world_size, port, extra_args):
    """mhc-pretrain-gpt --pipeline-schedule dualpipev over ``world_size`` ranks: parse through the
    launcher, build the V chunks with the config's builder, run one step of the schedule that
    Megatron's training loop would call, and report where layers, batches and losses ended up."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    import megatron.training.training as training
    from mhc_megatron.training import gpt_entry
    from mhc_megatron.training.launcher import apply_schedule_defaults, install_hooks

    import os

    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank))  # what Megatron's parser reads
    init_megatron(rank, world_size, port, pp=world_size, virtual_pipeline_model_parallel_size=2)
    state = install_hooks()
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.arguments import parse_and_validate_args

    argv = [*TINY_GPT_ARGS, "--num-layers", "4", "--pipeline-model-parallel-size", str(world_size),
            "--pipeline-schedule", "dualpipev", "--untie-embeddings-and-output-weights",
            "--global-batch-size", str(4 * world_size), *extra_args]
    sys.argv = ["mhc-pretrain-gpt", *apply_schedule_defaults(argv)]
    args = parse_and_validate_args()
    model_cfg = gpt_config_from_args(args)
    pgc = ProcessGroupCollection.use_mpu_process_groups()
    builder = model_cfg.get_builder_cls()(model_cfg)
    torch.manual_seed(0)
    chunks = [builder.build_model(pgc, vp_stage=v) for v in (0, 1)]
    for v, c in enumerate(chunks):
        c.vp_stage = v

    def forward_step(data_iterator, model):
        tokens, positions, labels = next(data_iterator)
        out = model(tokens, positions, torch.triu(torch.ones(1, 1, 16, 16, dtype=torch.bool), 1), labels=labels)
        return out, lambda o: (o.float().mean(), {"lm loss": o.float().mean().detach()})

    schedule = training.get_forward_backward_func()
    batches = [make_batch(seed=i, seq=16) for i in range(2 * world_size)]
    records = schedule(forward_step_func=forward_step, data_iterator=[iter(batches), iter(batches)],
                       model=chunks, num_microbatches=len(batches), seq_length=16, micro_batch_size=2)
    return {
        "layer_numbers": [[layer.layer_number for layer in c.decoder.layers] for c in chunks],
        "pre_post": [(c.pre_process, c.post_process) for c in chunks],
        "holds_batch": [gpt_entry._holds_batch(v) for v in (0, 1)],
        "losses": [float(r["lm loss"]) for r in records],
        "executed": [str(op) for op in schedule.last_executed],
        "post_res_stream": state.settings.post_res_stream,
        "grads": sum(p.grad is not None for c in chunks for p in c.parameters()),
        "params": sum(1 for c in chunks for p in c.parameters()),
    }


def hybrid_from_cli(rank, world_size, port, extra_args):
    """mhc-pretrain-gpt with --hybrid-layer-pattern: Megatron's hybrid config path through the
    launcher's hooks, built with the local layers this machine has."""
    from megatron.core.models.hybrid import hybrid_layer_specs
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.models.hybrid import HybridModelBuilder

    from mhc_megatron.mcore.attention import SDPACoreAttention
    from mhc_megatron.mcore.hybrid import local_hybrid_stack_spec
    from mhc_megatron.training.launcher import install_hooks

    init_megatron(rank, world_size, port)
    install_hooks()
    import megatron.training.argument_utils as argument_utils
    from megatron.training.arguments import parse_and_validate_args

    sys.argv = ["mhc-pretrain-gpt", *TINY_GPT_ARGS, "--num-layers", "4", "--hybrid-layer-pattern", "*-*-",
                "--position-embedding-type", "none", *extra_args]
    args = parse_and_validate_args()
    hybrid_layer_specs.hybrid_stack_spec = local_hybrid_stack_spec(SDPACoreAttention)  # test-only: default is TE's
    model_cfg = argument_utils.hybrid_config_from_args(args)  # the launcher's hook
    model = HybridModelBuilder(model_cfg).build_model(ProcessGroupCollection.use_mpu_process_groups())
    tokens, positions, labels = make_batch()
    loss = model(tokens, positions, torch.triu(torch.ones(1, 1, 16, 16, dtype=torch.bool), 1), labels=labels).float().mean()
    loss.backward()
    return {"types": [type(layer.input_layernorm if i % 2 == 0 else layer.pre_mlp_layernorm).__name__
                      for i, layer in enumerate(model.decoder.layers)], "loss": loss.item()}
