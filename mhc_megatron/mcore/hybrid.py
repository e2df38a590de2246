"""mHC for megatron-core's ``HybridModel``: every layer of the pattern is one mHC sublayer.

A hybrid layer holds one sublayer: attention (``*``; MLA too) or MLP (``-``, MoE ``E``). Its
global index is its ``layer_number - 1``, which ``HybridStack`` passes when it builds the layer
from the one spec of that layer type; :class:`MHCHybridLayer` reads it there and builds the mHC
version of the residual layer spec for that position: the first layer expands the embedding into
the n streams, and the last layer contracts them in its bias-dropout-add slot (``HybridStack``'s
final norm is a fixed ``TENorm``, not a spec slot). A GPT model and a hybrid model with the
pattern ``*-*-...`` therefore compute the same function (tested with shared weights).

Layer families mHC cannot wrap (Mamba ``M``, GatedDeltaNet ``G``, DSA ``D``) are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from .settings import MHCSettings
from .specs import _remap_norm_keys, sublayer_input_spec, sublayer_output_spec

WRAPPED_SLOTS = {"attention_layer": "attention", "mla_layer": "attention", "mlp_layer": "mlp", "moe_layer": "mlp"}
REFUSED_SYMBOLS = {"M": "Mamba", "G": "GatedDeltaNet", "D": "DSA attention"}


def main_pattern(hybrid_layer_pattern: str) -> str:
    """The decoder's layer symbols (pipeline bars and MTP parts removed)."""
    return hybrid_layer_pattern.split("/")[0].replace("|", "")


def mhc_hybrid_stack_spec(stack_spec: ModuleSpec, settings: MHCSettings, hybrid_layer_pattern: str) -> ModuleSpec:
    """The mHC version of a ``HybridStack`` spec for ``hybrid_layer_pattern``; unchanged in residual mode."""
    if not settings.enabled:
        return stack_spec
    if "/" in hybrid_layer_pattern:
        raise ValueError(
            f"--residual-mode {settings.mode} with multi-token prediction in the hybrid pattern "
            f"({hybrid_layer_pattern!r}) is not supported yet; drop the '/...' part"
        )
    if settings.recompute:
        raise ValueError("--mhc-recompute with HybridModel is not supported yet; drop --mhc-recompute")
    pattern = main_pattern(hybrid_layer_pattern)
    refused = sorted({s for s in pattern if s in REFUSED_SYMBOLS})
    if refused:
        names = ", ".join(f"'{s}' ({REFUSED_SYMBOLS[s]})" for s in refused)
        raise ValueError(
            f"mHC wraps attention ('*'), MLP ('-') and MoE ('E') layers; the pattern {hybrid_layer_pattern!r} "
            f"has {names}, whose state is not a residual stream mHC can mix; use --residual-mode residual"
        )
    sub = stack_spec.submodules
    replaced = {
        slot: ModuleSpec(
            module=MHCHybridLayer,
            params={"layer_spec": getattr(sub, slot), "settings": settings, "kind": kind, "num_layers": len(pattern)},
        )
        for slot, kind in WRAPPED_SLOTS.items()
        if getattr(sub, slot) is not IdentityOp
    }
    return dataclasses.replace(stack_spec, submodules=dataclasses.replace(sub, **replaced))


class MHCHybridLayer:
    """Spec entry that builds, for the ``layer_number`` ``HybridStack`` passes, the mHC version of
    ``layer_spec`` (a one-sublayer ``TransformerLayer``/``MLPLayer``/``MoETransformerLayer`` spec)."""

    def __new__(cls, *, layer_spec: ModuleSpec, settings: MHCSettings, kind: str, num_layers: int, layer_number: int, **kwargs):
        spec = hybrid_layer_spec(layer_spec, settings, kind, layer_number - 1, num_layers)
        return build_module(spec, layer_number=layer_number, **kwargs)


def hybrid_layer_spec(layer_spec: ModuleSpec, settings: MHCSettings, kind: str, index: int, num_layers: int) -> ModuleSpec:
    sub = layer_spec.submodules
    if not isinstance(sub, TransformerLayerSubmodules):
        raise ValueError(f"mHC wraps TransformerLayer-based hybrid layers, got {type(sub).__name__}")
    norm_slot, bda_slot, other = (
        ("input_layernorm", "self_attn_bda", "mlp") if kind == "attention" else ("pre_mlp_layernorm", "mlp_bda", "self_attention")
    )
    if getattr(sub, other) is not IdentityOp:
        raise ValueError(
            f"a hybrid {kind} layer spec must hold one sublayer; its {other} is {getattr(sub, other)!r}"
        )
    norm_input = sublayer_input_spec(getattr(sub, norm_slot), settings, index, index == 0)
    output = sublayer_output_spec(settings, mlp=kind == "mlp", contract=index == num_layers - 1)
    new_sub = dataclasses.replace(
        sub, **{norm_slot: norm_input, bda_slot: output},
        sharded_state_dict_keys_map=_remap_norm_keys(sub.sharded_state_dict_keys_map),
    )
    return dataclasses.replace(layer_spec, submodules=new_sub)


def local_hybrid_stack_spec(core_attention=None, normalization: str = "RMSNorm") -> ModuleSpec:
    """A transformer-engine-free ``HybridStack`` spec with attention (``*``) and MLP (``-``) layers,
    made from megatron-core's local GPT layer spec (``core_attention``: e.g. ``SDPACoreAttention``)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.identity_op import IdentityFuncOp

    from .specs import with_core_attention

    layer = get_gpt_layer_local_spec(normalization=normalization)
    if core_attention is not None:
        layer = with_core_attention(layer, core_attention)
    sub = layer.submodules
    attention = dataclasses.replace(layer, submodules=dataclasses.replace(
        sub, pre_mlp_layernorm=IdentityOp, mlp=IdentityOp, mlp_bda=IdentityFuncOp))
    mlp = ModuleSpec(module=MLPLayer, submodules=dataclasses.replace(
        sub, input_layernorm=IdentityOp, self_attention=IdentityOp, self_attn_bda=IdentityFuncOp))
    return ModuleSpec(module=HybridStack, submodules=HybridStackSubmodules(attention_layer=attention, mlp_layer=mlp))


@contextlib.contextmanager
def portable_hybrid_final_norm():
    """Patch (named ``hybrid-final-norm``, listed in docs/megatron.md): ``HybridStack`` builds its
    final norm with transformer-engine's ``TENorm`` unconditionally. Without transformer-engine,
    while a model is built inside this block, that norm is megatron-core's torch norm of the
    same kind (``WrappedTorchNorm``); with transformer-engine nothing changes."""
    from megatron.core.extensions import transformer_engine
    from megatron.core.models.hybrid import hybrid_block

    if transformer_engine.HAVE_TE:
        yield
        return
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    logging.getLogger(__name__).info("transformer-engine is not installed: HybridStack's final norm uses torch's")
    original = hybrid_block.TENorm
    hybrid_block.TENorm = WrappedTorchNorm
    try:
        yield
    finally:
        hybrid_block.TENorm = original
