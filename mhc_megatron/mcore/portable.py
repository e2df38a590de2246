"""The Megatron settings that keep a model off CUDA-only fused paths, so that the same model builds
and runs on a CPU (the demo, the tests, the traffic bench, validate-config's meta-device build).

Each entry: the ``TransformerConfig`` field, its portable value, and the command-line flags that give
it to Megatron's argument parser. Several are also megatron-core's dataclass defaults; they are set
explicitly because Megatron's command line defaults them the other way.
"""

from __future__ import annotations

PORTABLE = (
    ("use_cpu_initialization", True, ("--use-cpu-initialization",)),  # no CUDA RNG at init
    ("gradient_accumulation_fusion", False, ("--no-gradient-accumulation-fusion",)),  # an apex/TE CUDA op
    ("persist_layer_norm", False, ("--no-persist-layer-norm",)),  # apex's persistent LN kernel
    ("masked_softmax_fusion", False, ("--no-masked-softmax-fusion",)),  # a CUDA extension
    ("bias_dropout_fusion", False, ("--no-bias-dropout-fusion",)),  # a TorchScript/CUDA fusion
    ("apply_rope_fusion", False, ("--no-rope-fusion",)),  # TE's fused RoPE
    ("bias_activation_fusion", False, ("--no-bias-gelu-fusion", "--no-bias-swiglu-fusion")),  # fused activations
)

PORTABLE_FLAGS: tuple[str, ...] = tuple(flag for _, _, flags in PORTABLE for flag in flags)


def portable_config(**fields):
    """A megatron-core ``TransformerConfig`` with the portable settings; ``fields`` override them."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(**{**{name: value for name, value, _ in PORTABLE}, **fields})
