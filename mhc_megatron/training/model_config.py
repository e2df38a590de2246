"""Put mHC into a megatron.training ``GPTModelConfig``: its layer spec becomes a function that
builds the mHC block spec of each pipeline stage from whatever residual spec the config had."""

from __future__ import annotations

import inspect

from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.spec_utils import ModuleSpec

from ..mcore.settings import MHCSettings, check_transformer_config, configure_pipeline
from ..mcore.specs import mhc_block_spec, with_core_attention


def _residual_spec(base, model_cfg, vp_stage):
    """The spec ``GPTModelBuilder`` would have used for this stage."""
    from megatron.training.models.gpt import default_layer_spec

    if base is None:
        return default_layer_spec(model_cfg, vp_stage)
    if isinstance(base, ModuleSpec) or not callable(base):
        return base
    if "vp_stage" in inspect.signature(base).parameters:
        return base(model_cfg, vp_stage=vp_stage)
    return base(model_cfg)


def apply_mhc_to_gpt_config(model_cfg, settings: MHCSettings):
    """Make ``model_cfg`` (a ``GPTModelConfig``) build mHC/HC layers; residual mode: unchanged.
    """
    transformer = model_cfg.transformer
    if not settings.enabled:
        return model_cfg
    configure_pipeline(transformer, settings)
    check_transformer_config(transformer, settings)
    # Multi-token prediction: Megatron builds the MTP block from its own residual layer specs, and
    # the block starts from the decoder's output, which mHC has already contracted to [s, b, C];
    # so MTP layers are plain residual layers on top of the mHC decoder (docs/megatron.md).
    base = model_cfg.transformer_layer_spec

    def mhc_layer_spec(cfg, vp_stage=None):
        residual = _residual_spec(base, cfg, vp_stage)
        if getattr(cfg, "attention_backend", None) == AttnBackend.local:
            # GPTModelBuilder applies this override only to single layer specs; keep it.
            from megatron.core.transformer.dot_product_attention import DotProductAttention

            residual = with_core_attention(residual, DotProductAttention)
        return mhc_block_spec(residual, cfg.transformer, settings, vp_stage)

    model_cfg.transformer_layer_spec = mhc_layer_spec
    return model_cfg


def apply_mhc_to_hybrid_config(model_cfg, settings: MHCSettings):
    """Make ``model_cfg`` (a ``HybridModelConfig``) build mHC/HC hybrid layers; residual: unchanged.

    The stack spec is the config's own, or megatron-core's default (transformer-engine) hybrid
    stack, or with ``--transformer-impl local`` the TE-free stack of the same layers; every attention, MLP and MoE layer of the pattern becomes one mHC sublayer
    (:mod:`mhc_megatron.mcore.hybrid`).
    """
    from ..mcore.hybrid import mhc_hybrid_stack_spec

    transformer = model_cfg.transformer
    if not settings.enabled:
        return model_cfg
    if not model_cfg.hybrid_layer_pattern:
        raise ValueError("mHC for HybridModel needs --hybrid-layer-pattern (for example '*-*-*-*-')")
    configure_pipeline(transformer, settings)
    check_transformer_config(transformer, settings)
    spec = model_cfg.hybrid_stack_spec
    if spec is None:
        check_hybrid_stack(settings.mode, model_cfg.hybrid_layer_pattern, transformer.transformer_impl,
                           transformer.multi_latent_attention, model_cfg.restore_modelopt_state)
        if transformer.transformer_impl == "local":
            spec = _local_hybrid_stack(model_cfg)
        else:
            from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec as spec
    model_cfg.hybrid_stack_spec = mhc_hybrid_stack_spec(spec, settings, model_cfg.hybrid_layer_pattern)
    return model_cfg


def check_hybrid_stack(mode: str, pattern: str, transformer_impl: str, multi_latent_attention: bool,
                       restore_modelopt_state: bool) -> None:
    """The hybrid stacks mHC can wrap; run on the command line (training.checks) and on the built config."""
    from ..mcore.hybrid import LOCAL_SYMBOLS, main_pattern

    if transformer_impl == "inference_optimized" or restore_modelopt_state:
        raise ValueError(
            f"--residual-mode {mode} does not wrap the inference-optimized or ModelOpt hybrid "
            "stacks; use --transformer-impl transformer_engine"
        )
    if transformer_impl != "local":
        return
    other = sorted(set(main_pattern(pattern)) - set(LOCAL_SYMBOLS))
    if other or multi_latent_attention:
        what = "multi-latent attention" if not other else f"the layer symbols {', '.join(map(repr, other))}"
        raise ValueError(
            f"--transformer-impl local with --hybrid-layer-pattern {pattern!r}: the "
            f"transformer-engine-free hybrid stack builds attention ('*'), MLP ('-') and MoE ('E') layers, not "
            f"{what}; use --transformer-impl transformer_engine"
        )


def _local_hybrid_stack(model_cfg):
    """``--transformer-impl local`` for HybridModel: megatron-core's own hybrid stack is built from
    transformer-engine modules whatever the flag says, so build the TE-free stack of the same layers."""
    from ..mcore.hybrid import local_hybrid_stack_spec

    transformer = model_cfg.transformer
    return local_hybrid_stack_spec(normalization=transformer.normalization, num_experts=transformer.num_moe_experts,
                                   moe_grouped_gemm=transformer.moe_grouped_gemm)
