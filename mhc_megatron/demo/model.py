"""The demo's model: a megatron-core ``GPTModel`` built from our mHC specs, single process."""

from __future__ import annotations

import os
import socket

import torch

from ..mcore import MHCSettings
from ..mcore.attention import SDPACoreAttention
from ..mcore.specs import mhc_block_spec, with_core_attention


def init_single_process(device: torch.device) -> None:
    """A one-rank process group and megatron-core's model-parallel state (TP = PP = 1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=0,
            world_size=1,
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


def build_demo_model(
    settings: MHCSettings,
    *,
    layers: int,
    hidden: int,
    heads: int,
    seq_len: int,
    vocab_size: int,
    seed: int,
    device: torch.device,
    model: str = "gpt",
    transformer: dict | None = None,
    hybrid_layer_pattern: str | None = None,
):
    """A small pre-norm GPT (RMSNorm, GELU MLP, learned positions, no dropout).

    Attention is :class:`SDPACoreAttention`, which runs on CPU and GPU alike; everything else is
    megatron-core's local spec, turned into an mHC/HC block spec by ``mhc_block_spec``.

    ``transformer``: further ``TransformerConfig`` fields (megatron-core names), e.g. the MoE
    (``num_moe_experts``, ``moe_layer_freq``, ...) and multi-latent attention
    (``multi_latent_attention``, ``kv_lora_rank``, ...) settings of ``mhc-megatron profile
    --config``; the layers then come from megatron-core's ``get_gpt_decoder_block_spec`` (local
    modules: dense and MoE layers as ``moe_layer_freq`` says, ``MLASelfAttention``). On the CPU an
    MoE or MLA model must be built and run inside hook ``cpu-model-device``. ``model="hybrid"``:
    the layers of ``hybrid_layer_pattern`` (``*``, ``-``, ``E``; default ``*-`` per layer).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    config = _config(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=4 * hidden,
        normalization="RMSNorm",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **(transformer or {}),
    )
    torch.manual_seed(seed)
    if model == "hybrid":
        if config.multi_latent_attention:
            raise ValueError("build_demo_model: the local hybrid stack has no multi-latent attention layer")
        return _build_hybrid(config, settings, vocab_size, seq_len, hybrid_layer_pattern).to(device)
    if any((transformer or {}).get(k) for k in ("num_moe_experts", "multi_latent_attention")):
        residual = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
        spec = mhc_block_spec(with_core_attention(residual, SDPACoreAttention), config, settings)
    else:
        layer = with_core_attention(get_gpt_layer_local_spec(normalization="RMSNorm"), SDPACoreAttention)
        spec = mhc_block_spec(layer, config, settings)
    gpt = GPTModel(config, spec, vocab_size=vocab_size, max_sequence_length=seq_len)
    return gpt.to(device)


def _config(**fields):
    """The portable ``TransformerConfig``, or ``MLATransformerConfig`` for multi-latent attention."""
    from ..mcore.portable import PORTABLE, portable_config

    if not fields.get("multi_latent_attention"):
        return portable_config(**fields)
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    return MLATransformerConfig(**{**{name: value for name, value, _ in PORTABLE}, **fields})


def _build_hybrid(config, settings: MHCSettings, vocab_size: int, seq_len: int, pattern: str | None = None):
    """The same layers as a ``HybridModel`` with the pattern ``*-*-...`` (or ``pattern``; one mHC
    sublayer per layer, no position embedding: HybridModel offers RoPE or none)."""
    import dataclasses

    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from ..mcore.hybrid import local_hybrid_stack_spec, mhc_hybrid_stack_spec

    pattern = pattern or "*-" * config.num_layers
    config = dataclasses.replace(config, num_layers=len(pattern))
    local = local_hybrid_stack_spec(SDPACoreAttention, num_experts=config.num_moe_experts)
    stack = mhc_hybrid_stack_spec(local, settings, pattern)
    return HybridModel(config, stack, vocab_size=vocab_size, max_sequence_length=seq_len,
                       hybrid_layer_pattern=pattern, position_embedding_type="none")
