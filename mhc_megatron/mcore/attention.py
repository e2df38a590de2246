"""A device-portable core attention for megatron-core's local (transformer-engine free) spec.

megatron-core's ``DotProductAttention`` allocates its score buffer and its default causal mask on
the current CUDA device and forks the CUDA RNG tracker for dropout, so it cannot run on a
machine without a GPU. This module computes the same attention with
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU,
a plain kernel on CPU). It is what the demo uses, and a spec can select it wherever
transformer-engine is not installed.

Differences from ``DotProductAttention``: attention dropout draws from torch's default
generator (so use it with ``attention_dropout = 0`` under tensor parallelism, where Megatron
forks a per-partition generator); no packed sequences, attention bias, sliding windows or
softmax offsets (each raises).
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


class SDPACoreAttention(MegatronModule):
    """Drop-in ``core_attention`` submodule: ``[sq, b, np, hn]`` q/k/v -> ``[sq, b, np*hn]``."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        **unused,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism; use TE attention")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("SDPACoreAttention does not support sliding-window attention")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SDPACoreAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        tp = pg_collection.tp.size() if pg_collection is not None else 1
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups or config.num_attention_heads, tp)
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = unused.get("k_channels") or config.kv_channels  # MLA passes its q/k head size
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        if config.apply_query_key_layer_scaling:
            raise ValueError("SDPACoreAttention does not support apply_query_key_layer_scaling")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention supports neither packed sequences nor attention bias")
        mask_type = attn_mask_type or self.attn_mask_type
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if self.heads != self.groups:  # grouped-query attention: repeat the key/value groups
            k = k.repeat_interleave(self.heads // self.groups, dim=1)
            v = v.repeat_interleave(self.heads // self.groups, dim=1)
        causal = mask_type == AttnMaskType.causal
        mask = None
        if not causal and attention_mask is not None:
            mask = ~attention_mask  # Megatron masks are True where attention is NOT allowed
        out = torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
            scale=self.scale,
        )
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
