"""mHC for megatron-core's ``HybridModel``: every layer of the pattern is one mHC sublayer.

A hybrid layer holds one sublayer: attention (``*``; MLA too) or MLP (``-``, MoE ``E``). Its
global index is its ``layer_number - 1``, which ``HybridStack`` passes when it builds the layer
from the one spec of that layer type; a :class:`HybridLayerBuilder` reads it there and builds the
mHC version of the residual layer spec for that position: the first layer expands the embedding into
the n streams, and the last layer contracts them in its bias-dropout-add slot (``HybridStack``'s
final norm is not a spec slot). A GPT model and a hybrid model with the
pattern ``*-*-...`` therefore compute the same function (tested with shared weights).

Layer families mHC cannot wrap (Mamba ``M``, GatedDeltaNet ``G``, DSA ``D``) are refused.
"""

from __future__ import annotations

import dataclasses

from megatron.core.models.hybrid.hybrid_block import HybridStack
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from .settings import MHCSettings
from .specs import remap_norm_keys, sublayer_input_spec, sublayer_output_spec

WRAPPED_SLOTS = {"attention_layer": "attention", "mla_layer": "attention", "mlp_layer": "mlp", "moe_layer": "mlp"}
REFUSED_SYMBOLS = {"M": "Mamba", "G": "GatedDeltaNet", "D": "DSA attention"}


def main_pattern(hybrid_layer_pattern: str) -> str:
    """The decoder's layer symbols (pipeline bars and MTP parts removed)."""
    return hybrid_layer_pattern.split("/")[0].replace("|", "")


def check_hybrid_pattern(hybrid_layer_pattern: str, settings: MHCSettings) -> None:
    """Refuse hybrid layer patterns mHC cannot wrap (decided from ``--hybrid-layer-pattern`` alone)."""
    if not settings.enabled:
        return
    if "/" in hybrid_layer_pattern:
        raise ValueError(
            f"--hybrid-layer-pattern {hybrid_layer_pattern!r}: --residual-mode {settings.mode} with "
            "multi-token prediction in the hybrid pattern is not supported yet; drop the '/...' part"
        )
    if settings.recompute:
        raise ValueError("--mhc-recompute with HybridModel is not supported yet; drop --mhc-recompute")
    pattern = main_pattern(hybrid_layer_pattern)
    refused = sorted({s for s in pattern if s in REFUSED_SYMBOLS})
    if refused:
        names = ", ".join(f"'{s}' ({REFUSED_SYMBOLS[s]})" for s in refused)
        raise ValueError(
            f"--hybrid-layer-pattern {hybrid_layer_pattern!r}: mHC wraps attention ('*'), MLP ('-') and MoE "
            f"('E') layers; the pattern has {names}, whose state is not a residual stream mHC can mix; use --residual-mode residual"
        )


def mhc_hybrid_stack_spec(stack_spec: ModuleSpec, settings: MHCSettings, hybrid_layer_pattern: str) -> ModuleSpec:
    """The mHC version of a ``HybridStack`` spec for ``hybrid_layer_pattern``; unchanged in residual mode."""
    if not settings.enabled:
        return stack_spec
    check_hybrid_pattern(hybrid_layer_pattern, settings)
    pattern = main_pattern(hybrid_layer_pattern)
    sub = stack_spec.submodules
    replaced = {
        slot: HybridLayerBuilder(getattr(sub, slot), settings, kind, len(pattern)).module_spec()
        for slot, kind in WRAPPED_SLOTS.items()
        if getattr(sub, slot) is not IdentityOp
    }
    return dataclasses.replace(stack_spec, submodules=dataclasses.replace(sub, **replaced))


@dataclasses.dataclass(frozen=True)
class HybridLayerBuilder:
    """Builds, for the ``layer_number`` ``HybridStack`` passes, the mHC version of ``layer_spec``
    (a one-sublayer ``TransformerLayer``/``MLPLayer``/``MoETransformerLayer`` spec) at that
    position of a ``num_layers``-layer pattern. ``kind``: ``"attention"`` or ``"mlp"``."""

    layer_spec: ModuleSpec
    settings: MHCSettings
    kind: str
    num_layers: int

    def spec(self, layer_number: int) -> ModuleSpec:
        """The layer spec for the 1-based global ``layer_number``."""
        return hybrid_layer_spec(self.layer_spec, self.settings, self.kind, layer_number - 1, self.num_layers)

    def __call__(self, *args, layer_number: int, **kwargs):
        return build_module(self.spec(layer_number), *args, layer_number=layer_number, **kwargs)

    def module_spec(self) -> ModuleSpec:
        """The ``HybridStackSubmodules`` entry that builds through this builder."""
        return ModuleSpec(module=BuildWithBuilder, params={"builder": self})


class BuildWithBuilder:
    """``ModuleSpec.module`` for a builder object: constructing it returns ``builder(*args, **kwargs)``.

    megatron-core's ``build_module`` (0.19) calls only a class (or an object it imports from a
    ``(module path, name)`` tuple) with the spec's params; a plain function it returns unbuilt and
    an object in ``ModuleSpec.module`` it tries to import. So the entry is a class whose
    construction is the builder's call, as megatron-core's own ``WrappedTorchNorm`` and ``TENorm``
    choose what they build in ``__new__``; no instance of this class is ever made."""

    def __new__(cls, *args, builder, **kwargs):
        return builder(*args, **kwargs)


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
        sharded_state_dict_keys_map=remap_norm_keys(sub.sharded_state_dict_keys_map),
    )
    return dataclasses.replace(layer_spec, submodules=new_sub)


LOCAL_SYMBOLS = "*-E"  # the layer kinds local_hybrid_stack_spec builds


def local_hybrid_stack_spec(core_attention=None, normalization: str = "RMSNorm", num_experts: int | None = None,
                            moe_grouped_gemm: bool = False) -> ModuleSpec:
    """A transformer-engine-free ``HybridStack`` spec with attention (``*``), MLP (``-``) and, with
    ``num_experts``, MoE (``E``) layers, made from megatron-core's local GPT layer spec
    (``core_attention``: e.g. ``SDPACoreAttention``) and a torch final norm (:class:`LocalHybridStack`)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.identity_op import IdentityFuncOp

    from .specs import with_core_attention

    layer = get_gpt_layer_local_spec(normalization=normalization)
    if core_attention is not None:
        layer = with_core_attention(layer, core_attention)
    sub = layer.submodules
    attention = dataclasses.replace(layer, submodules=dataclasses.replace(
        sub, pre_mlp_layernorm=IdentityOp, mlp=IdentityOp, mlp_bda=IdentityFuncOp))
    mlp_only = dict(input_layernorm=IdentityOp, self_attention=IdentityOp, self_attn_bda=IdentityFuncOp)
    mlp = ModuleSpec(module=MLPLayer, submodules=dataclasses.replace(sub, **mlp_only))
    layers = dict(attention_layer=attention, mlp_layer=mlp)
    if num_experts:
        from megatron.core.transformer.transformer_layer import MoETransformerLayer

        moe = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm,
                                       normalization=normalization)
        layers["moe_layer"] = ModuleSpec(module=MoETransformerLayer,
                                         submodules=dataclasses.replace(moe.submodules, **mlp_only))
    return ModuleSpec(module=LocalHybridStack, submodules=HybridStackSubmodules(**layers))


class LocalHybridStack(HybridStack):
    """megatron-core's ``HybridStack`` with its final norm built from megatron-core's torch norm
    (``HybridStack`` itself builds transformer-engine's ``TENorm`` unconditionally): the stack of
    :func:`local_hybrid_stack_spec`. Same parameters, same checkpoint keys."""

    def __init__(self, config, submodules, pre_process=True, layer_type_list=None, pp_layer_offset=0,
                 post_layer_norm=True, **kwargs):
        super().__init__(config, submodules, pre_process, layer_type_list, pp_layer_offset,
                         post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = WrappedTorchNorm(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
