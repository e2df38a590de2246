"""megatron-core glue: mHC settings, modules and layer/block specs."""

from ..compat import check_megatron_core

check_megatron_core()  # before anything of megatron-core is used: an untested version is named


from .coefficients import HCCoefficients, MHCCoefficients
from .settings import RESIDUAL_MODES, MHCSettings, check_transformer_config, configure_pipeline
from .specs import (
    get_mhc_gpt_decoder_block_spec,
    get_mhc_gpt_layer_local_block_spec,
    mhc_block_spec,
    mhc_layer_spec,
    with_core_attention,
)
from .sublayer import MHCResidual, MHCStreamContraction, MHCSublayerInput, MHCSublayerOutput

__all__ = [
    "RESIDUAL_MODES",
    "HCCoefficients",
    "MHCCoefficients",
    "MHCResidual",
    "MHCSettings",
    "MHCStreamContraction",
    "MHCSublayerInput",
    "MHCSublayerOutput",
    "check_transformer_config",
    "configure_pipeline",
    "get_mhc_gpt_decoder_block_spec",
    "get_mhc_gpt_layer_local_block_spec",
    "mhc_block_spec",
    "mhc_layer_spec",
    "with_core_attention",
]
