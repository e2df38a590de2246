"""The vocabulary Megatron will use for a launch configuration.

Megatron pads ``vocab_size`` up to a multiple of ``make_vocab_size_divisible_by`` x tensor-parallel
size (megatron.training's ``calculate_padded_vocab_size``). validate-config's meta build runs at
TP 1, so its embedding and output layer are padded for TP 1; this says what the real launch pads to.
With a HuggingFace tokenizer Megatron takes the tokenizer's own size instead of ``vocab_size``,
which is unknown offline.
"""

from __future__ import annotations

from .config import LaunchConfig


def vocabulary(cfg: LaunchConfig, tp: int) -> dict:
    from megatron.training.vocab_utils import calculate_padded_vocab_size

    from .flag_values import launcher_parser

    vocab = cfg.get("vocab_size")
    divisible = cfg.get("make_vocab_size_divisible_by") or launcher_parser().get_default("make_vocab_size_divisible_by")
    padded = calculate_padded_vocab_size(vocab, divisible, tp, logging_enabled=False)
    tokenizer = cfg.get("tokenizer_type")
    hf = "Megatron uses the tokenizer's own vocabulary size, not vocab_size, which cannot be read offline; " \
         "the figures assume vocab_size"
    if tokenizer == "HuggingFaceTokenizer":
        note = f"tokenizer_type HuggingFaceTokenizer: {hf}"
    elif tokenizer is None:  # the launch script may pass it (examples/moe_27b/sbatch.sh does)
        note = f"tokenizer_type is not in the config: with --tokenizer-type HuggingFaceTokenizer {hf}"
    else:
        note = ""
    return {"vocab_size": vocab, "make_vocab_size_divisible_by": divisible, "tensor_model_parallel_size": tp,
            "padded_vocab_size": padded,
            "meta_build_padded_vocab_size": calculate_padded_vocab_size(vocab, divisible, 1, logging_enabled=False),
            "note": note}
