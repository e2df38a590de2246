"""Upstream Megatron-LM's own mHC layers against ours, through convert-checkpoint (both directions).

Runs only where megatron-core has upstream's mHC (Megatron-LM main, 0.20): the compatibility run
(``MEGATRON_LM=/path ./scripts/test.sh -m compat``) runs this file against the checkout; with
megatron-core 0.19 it is skipped. Upstream's GPT model is built with its
``HyperConnectionTransformerLayer`` on megatron-core's local layer spec (the attention is our
portable ``SDPACoreAttention`` in both models; upstream's ``torch.compile``d maths compiles for
the CPU). Float64; tolerance 1e-12.
"""

import os

import pytest
import torch

pytest.importorskip("megatron.core.transformer.hyper_connection", reason="this megatron-core has no upstream mHC (0.19)")

from mcore_helpers import SEQ, VOCAB, local_block_spec, tiny_config  # noqa: E402
from mhc_megatron.cli import main as cli  # noqa: E402
from mhc_megatron.mcore import MHCSettings  # noqa: E402

pytestmark = pytest.mark.usefixtures("megatron_world")
UPSTREAM_NUMERICS = dict(sinkhorn_order="rows-first", norm_eps_placement="outside", dropout="per-stream",
                         backend="reference")


def _grow(model, seed):
    """Parameters away from their initial values, mHC projections large (unconverged Sinkhorn)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 3.0 if ("mapping_proj" in name or ".coefficients.phi" in name) else 0.3
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale * p.abs().mean().clamp(min=0.1))


def _upstream_gpt(seed):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import HyperConnectionTransformerLayer
    from megatron.core.transformer.hyper_connection import HyperConnectionModule

    from mhc_megatron.mcore.attention import SDPACoreAttention
    from mhc_megatron.mcore.specs import with_core_attention

    spec = with_core_attention(get_gpt_layer_local_spec(normalization="RMSNorm"), SDPACoreAttention)
    spec.module = HyperConnectionTransformerLayer
    spec.submodules.self_attention_hyper_connection = HyperConnectionModule
    spec.submodules.mlp_hyper_connection = HyperConnectionModule
    cfg = tiny_config(enable_mhc_connections=True, mhc_num_residual_streams=4, mhc_sinkhorn_iterations=20)
    torch.manual_seed(seed)
    return GPTModel(cfg, spec, vocab_size=VOCAB, max_sequence_length=SEQ, share_embeddings_and_output_weights=False)


def _our_gpt(settings, seed):
    from megatron.core.models.gpt import GPTModel

    cfg = tiny_config()
    torch.manual_seed(seed)
    return GPTModel(cfg, local_block_spec(cfg, settings), vocab_size=VOCAB, max_sequence_length=SEQ,
                    share_embeddings_and_output_weights=False)


def _save(model, directory):
    from megatron.core import dist_checkpointing

    from mhc_megatron.checkpoints.torch_dist import cpu_checkpoint_io

    os.makedirs(directory)
    with cpu_checkpoint_io():
        dist_checkpointing.save(model.sharded_state_dict(), directory)


def _load(model, directory):
    from megatron.core import dist_checkpointing

    from mhc_megatron.checkpoints.torch_dist import cpu_checkpoint_io

    sharded = model.sharded_state_dict()
    with cpu_checkpoint_io():
        state = dist_checkpointing.load(sharded, directory)
    model.load_state_dict({k: state[k] for k in sharded}, strict=True)
    return model


def _logits(model, tokens):
    model.eval()
    positions = torch.arange(SEQ).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), 1))


TOKENS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(4))


def test_upstream_model_converted_into_ours(tmp_path):
    upstream = _upstream_gpt(seed=1).double()
    _grow(upstream, seed=2)
    _save(upstream, str(tmp_path / "up"))
    assert cli(["convert-checkpoint", "--from", "upstream-mhc", "--to", "mhc-megatron", str(tmp_path / "up"),
                str(tmp_path / "ours")]) == 0
    ref = _logits(upstream, TOKENS)
    ours = _load(_our_gpt(MHCSettings(mode="mhc", expansion_rate=4, **UPSTREAM_NUMERICS), seed=9).double(),
                 str(tmp_path / "ours"))
    torch.testing.assert_close(_logits(ours, TOKENS), ref, rtol=0, atol=1e-12)
    default = _load(_our_gpt(MHCSettings(mode="mhc", expansion_rate=4, backend="reference"), seed=9).double(),
                    str(tmp_path / "ours"))
    assert (_logits(default, TOKENS) - ref).abs().max() > 1e-6  # the options are what makes them equal


def test_our_model_converted_into_upstream(tmp_path):
    ours = _our_gpt(MHCSettings(mode="mhc", expansion_rate=4, **UPSTREAM_NUMERICS), seed=3).double()
    _grow(ours, seed=4)
    _save(ours, str(tmp_path / "ours"))
    assert cli(["convert-checkpoint", "--from", "mhc-megatron", "--to", "upstream-mhc", str(tmp_path / "ours"),
                str(tmp_path / "up")]) == 0
    upstream = _load(_upstream_gpt(seed=8).double(), str(tmp_path / "up"))
    torch.testing.assert_close(_logits(upstream, TOKENS), _logits(ours, TOKENS), rtol=0, atol=1e-12)
