"""megatron-core's fine-grained layer callables for mHC MoE layers (``--overlap-moe-expert-parallel-comm``).

With expert-parallel overlap, megatron-core runs a MoE ``TransformerLayer`` as schedule nodes on a
compute and a communication stream (attention + pre-MLP norm + router | dispatch all-to-all |
experts | combine all-to-all + bias-dropout-add), interleaving two micro-batches' nodes so one's
all-to-all runs while the other computes (``combined_1f1b``). Only tensors travel between nodes:
the residual that the layer's bias-dropout-add needs is detached into the node's layer state,
with its gradient routed back by the node.

An mHC layer's norm slot returns an :class:`~mhc_megatron.mcore.sublayer.MHCResidual` (the
n-stream ``x``, ``H_post``, ``H_res``) instead of one tensor. :func:`build_layer_callables` gives
such layers a first node that detaches each of those tensors the same way; the other nodes
(dispatch, experts, and combine, which calls the layer's ``mlp_bda`` slot with the residual) are
megatron-core's own. Dense layers need nothing: their MLP sublayer, norm to bias-dropout-add,
runs inside one node. Installed by hook ``fine-grained-callables`` (:mod:`mhc_megatron.hooks`).
"""

from __future__ import annotations

import dataclasses

from .sublayer import MHCResidual, MHCSublayerInput


def is_mhc_moe_layer(layer) -> bool:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return isinstance(getattr(layer, "mlp", None), MoELayer) and isinstance(
        getattr(layer, "pre_mlp_layernorm", None), MHCSublayerInput
    )


def mhc_pre_dispatch(layer):
    """The first schedule node of an mHC MoE layer: attention sublayer, mHC coefficients + pre-mix +
    norm of the MLP sublayer, shared experts, router and dispatch preprocessing."""

    def pre_dispatch(node, hidden_states):
        state = node.chunk_state
        hidden_states, _ = layer._forward_attention(
            hidden_states=hidden_states, attention_mask=state.attention_mask, rotary_pos_emb=state.rotary_pos_emb,
            rotary_pos_cos=state.rotary_pos_cos, rotary_pos_sin=state.rotary_pos_sin,
            packed_seq_params=state.packed_seq_params, sequence_len_offset=state.sequence_len_offset,
        )
        normed, residual = layer.pre_mlp_layernorm(hidden_states)
        shared_expert_output = layer.mlp.shared_experts_compute(normed)
        probs, routing_map = layer.mlp.route(normed)
        local_tokens, probs = layer.mlp.preprocess(normed, probs, routing_map)
        # the combine node's mlp_bda reads these; their gradients come back through this node
        node.layer_state.residual = detached_residual(residual, node.detach)
        if layer.mlp.use_shared_expert and not layer.mlp.shared_expert_overlap:
            node.layer_state.shared_expert_output = node.detach(shared_expert_output)
        return local_tokens, probs

    return pre_dispatch


def detached_residual(residual: MHCResidual, detach) -> MHCResidual:
    if residual.chain is not None:
        raise ValueError(
            "--mhc-recompute with --overlap-moe-expert-parallel-comm: a recompute block cannot span "
            "the expert-parallel schedule nodes; drop one of them"
        )
    # Under the Triton kernels the post+res backward hands g_x to the sublayer's link, outside
    # autograd, and the input half (in this node) takes it: the node must not route a gradient
    # for x, it would find none.
    x = residual.x.detach() if residual.link is not None else detach(residual.x)
    return dataclasses.replace(residual, x=x, h_post=detach(residual.h_post), h_res=detach(residual.h_res))


def build_layer_callables_hook(original, context=None):
    """Hook ``fine-grained-callables``: megatron-core's builder, with the mHC first node for mHC MoE layers."""

    def build_layer_callables(layer):
        forward_funcs, backward_dw = original(layer)
        if is_mhc_moe_layer(layer):
            forward_funcs = [mhc_pre_dispatch(layer), *forward_funcs[1:]]
        return forward_funcs, backward_dw

    return build_layer_callables
