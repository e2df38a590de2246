"""mHC layer and block specs for megatron-core ``GPTModel`` / ``TransformerBlock``.

Any residual ``TransformerLayer`` spec becomes an mHC (or HC) spec by swapping four submodule
slots (see :mod:`.sublayer`); attention, MLP, MoE, MLA and the norms are Megatron's own. So one
transformation serves the local spec, the transformer-engine spec, MoE block specs and
multi-latent attention alike::

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    residual = get_gpt_decoder_block_spec(config, use_transformer_engine=True, vp_stage=vp_stage)
    spec = mhc_block_spec(residual, config, MHCSettings(mode="mhc", expansion_rate=4), vp_stage)
    model = GPTModel(config, transformer_layer_spec=spec, ...)
"""

from __future__ import annotations

import dataclasses
import functools

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    LayerNormImpl,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    BaseTransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from ..recompute_plan import resolve_block_size
from .coefficients import HCCoefficients, MHCCoefficients
from .recompute import BlockRecompute
from .settings import MHCSettings, check_transformer_config
from .sublayer import MHCStreamContraction, MHCSublayerInput, MHCSublayerOutput

_NORM_SLOTS = ("input_layernorm.", "pre_mlp_layernorm.")


def _coefficients_spec(settings: MHCSettings, sublayer_index: int) -> ModuleSpec:
    module = MHCCoefficients if settings.mode == "mhc" else HCCoefficients
    return ModuleSpec(module=module, params={"sublayer_index": sublayer_index})


def remap_norm_keys(keys_map: dict[str, str]) -> dict[str, str]:
    """The inner norm now lives at ``<slot>.norm.``: keep checkpoint keys pointing at it, so a
    local-spec mHC checkpoint still loads into the transformer-engine spec and back."""

    def fix(prefix: str) -> str:
        return prefix + "norm." if prefix in _NORM_SLOTS else prefix

    return {fix(k): fix(v) for k, v in keys_map.items()}


def sublayer_input_spec(norm, settings: MHCSettings, sublayer_index: int, expand: bool, block=None):
    """The norm slot of mHC sublayer ``sublayer_index`` (``expand``: the model's first sublayer;
    ``block``: its (recompute block, position) or ``None``)."""
    block, position = block or (None, 0)
    return functools.partial(
        MHCSublayerInput,
        norm=norm,
        coefficients=_coefficients_spec(settings, sublayer_index),
        settings=settings,
        expand_input=expand,
        recompute=block,
        position=position,
    )


def sublayer_output_spec(
    settings: MHCSettings, *, mlp: bool = False, contract: bool = False, defer_join: bool = False
) -> ModuleSpec:
    """The bias-dropout-add slot of an mHC sublayer: the MLP's may run on the high-priority stream;
    ``contract``: the model's last sublayer where the final norm is not a spec slot;
    ``defer_join``: the output is read only by the block's next layer, which joins the stream."""
    return ModuleSpec(
        module=MHCSublayerOutput,
        params={"settings": settings, "high_priority_stream": mlp and settings.post_res_stream, "contract": contract,
                "defer_join": defer_join},
    )


def mhc_layer_spec(
    layer_spec: ModuleSpec,
    settings: MHCSettings,
    layer_index: int,
    recompute: tuple[tuple[BlockRecompute, int], tuple[BlockRecompute, int]] | None = None,
    next_layer_in_block: bool = False,
) -> ModuleSpec:
    """The mHC version of one residual ``TransformerLayer`` spec.

    ``layer_index`` is the 0-based global index of the layer in the decoder: its attention is
    mHC sublayer ``2 * layer_index`` and its MLP sublayer ``2 * layer_index + 1``; layer 0 expands
    the embedding into the n streams. ``recompute``: the (block, position) of the attention and
    of the MLP sublayer when mHC recompute is on. ``next_layer_in_block``: another layer of the
    same block reads this one's output, so a side-stream post+res is joined there, not at once.
    """
    sub = layer_spec.submodules
    if not isinstance(sub, TransformerLayerSubmodules):
        raise ValueError(
            f"mHC wraps TransformerLayer specs (TransformerLayerSubmodules), got a spec for "
            f"{getattr(layer_spec.module, '__name__', layer_spec.module)} with "
            f"{type(sub).__name__}; for HybridModel stacks use mhc_megatron.mcore.hybrid.mhc_hybrid_stack_spec"
        )

    attn_block, mlp_block = recompute or (None, None)
    new_sub = dataclasses.replace(
        sub,
        input_layernorm=sublayer_input_spec(sub.input_layernorm, settings, 2 * layer_index, layer_index == 0, attn_block),
        self_attn_bda=sublayer_output_spec(settings),
        pre_mlp_layernorm=sublayer_input_spec(sub.pre_mlp_layernorm, settings, 2 * layer_index + 1, False, mlp_block),
        mlp_bda=sublayer_output_spec(settings, mlp=True, defer_join=next_layer_in_block),
        sharded_state_dict_keys_map=remap_norm_keys(sub.sharded_state_dict_keys_map),
    )
    return dataclasses.replace(layer_spec, submodules=new_sub)


def _global_layer_ids(config, count: int, vp_stage, pp_rank) -> list[int]:
    layout = getattr(config, "pipeline_model_parallel_layout", None)
    if layout is not None:
        ids = list(layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank))
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        ids = list(range(offset, offset + count))
    if len(ids) != count:
        raise ValueError(f"this stage builds {count} layers but its layout names {len(ids)}: {ids}")
    return ids


def mhc_block_spec(
    spec: ModuleSpec | TransformerBlockSubmodules,
    config,
    settings: MHCSettings,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> ModuleSpec | TransformerBlockSubmodules:
    """Turn the residual decoder spec of this pipeline stage into its mHC/HC block spec.

    ``spec`` is what a ``GPTModel`` would get: a single layer spec (repeated for every layer
    of the stage) or the stage's ``TransformerBlockSubmodules`` (as from
    ``get_gpt_decoder_block_spec``). In ``residual`` mode it is returned unchanged.
    """
    if not settings.enabled:
        return spec
    check_transformer_config(config, settings)
    if isinstance(spec, TransformerBlockSubmodules):
        layer_specs, final_norm = list(spec.layer_specs), spec.layer_norm
    elif isinstance(spec, ModuleSpec) and isinstance(spec.module, type) and issubclass(spec.module, BaseTransformerLayer):
        layer_specs = [spec] * get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        final_norm = LayerNormImpl  # what TransformerBlock uses for a single layer spec
    else:
        raise ValueError(
            "mhc_block_spec expects a TransformerLayer ModuleSpec or TransformerBlockSubmodules, "
            f"got {spec!r}"
        )
    if final_norm is None:
        raise ValueError(
            "the decoder block has no final norm slot, where mHC contracts the streams; "
            "give the block spec a layer_norm"
        )
    ids = _global_layer_ids(config, len(layer_specs), vp_stage, pp_rank)
    blocks = recompute_blocks(settings, ids) if settings.recompute else [None] * len(ids)
    # a side-stream post+res is joined by the next layer's input, except where Megatron's own code
    # reads a layer's output first: full activation recompute and CPU offloading take a layer
    # group's input (the previous layer's output) before its first layer runs
    defer = config.recompute_granularity != "full" and not config.cpu_offloading
    return TransformerBlockSubmodules(
        layer_specs=[mhc_layer_spec(s, settings, i, b, next_layer_in_block=defer and k < len(ids) - 1)
                     for k, (s, i, b) in enumerate(zip(layer_specs, ids, blocks))],
        layer_norm=functools.partial(MHCStreamContraction, norm=final_norm, settings=settings),
    )


def recompute_blocks(settings: MHCSettings, layer_ids: list[int]):
    """Per local layer, the (block, position) of its two sublayers: blocks of L_r consecutive
    sublayers of this stage (or virtual chunk), never crossing its boundary."""
    sublayers = 2 * len(layer_ids)
    size = resolve_block_size(settings.recompute_block_size, sublayers, settings.expansion_rate)
    first = 2 * layer_ids[0]
    blocks = [
        BlockRecompute(block_index=start // size, size=min(size, sublayers - start), first_sublayer=first + start)
        for start in range(0, sublayers, size)
    ]
    placement = [(blocks[s // size], s % size) for s in range(sublayers)]
    return [(placement[2 * i], placement[2 * i + 1]) for i in range(len(layer_ids))]


def get_mhc_gpt_layer_local_block_spec(
    config, settings: MHCSettings, vp_stage: int | None = None, pp_rank: int | None = None, **local_spec_kwargs
):
    """Block spec from megatron-core's local (transformer-engine free) GPT layer spec."""
    local_spec_kwargs.setdefault("normalization", config.normalization)
    local_spec_kwargs.setdefault("qk_layernorm", config.qk_layernorm)
    local_spec_kwargs.setdefault("multi_latent_attention", config.multi_latent_attention)
    layer = get_gpt_layer_local_spec(**local_spec_kwargs)
    return mhc_block_spec(layer, config, settings, vp_stage, pp_rank)


def get_mhc_gpt_decoder_block_spec(
    config,
    settings: MHCSettings,
    use_transformer_engine: bool,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
):
    """Block spec from ``get_gpt_decoder_block_spec``: dense and MoE layers (grouped GEMM and
    shared experts as configured), multi-latent attention when the config asks for it, local or
    transformer-engine modules."""
    residual = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_transformer_engine,
        normalization=config.normalization,
        qk_l2_norm=getattr(config, "qk_l2_norm", False),
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    return mhc_block_spec(residual, config, settings, vp_stage, pp_rank)


def with_core_attention(spec, core_attention):
    """A copy of a layer or block spec whose self-attention uses ``core_attention`` (for example
    :class:`~mhc_megatron.mcore.attention.SDPACoreAttention` on machines without a GPU)."""
    if isinstance(spec, TransformerBlockSubmodules):
        return dataclasses.replace(
            spec, layer_specs=[with_core_attention(s, core_attention) for s in spec.layer_specs]
        )
    attn = spec.submodules.self_attention
    new_attn = dataclasses.replace(
        attn, submodules=dataclasses.replace(attn.submodules, core_attention=core_attention)
    )
    return dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, self_attention=new_attn)
    )
