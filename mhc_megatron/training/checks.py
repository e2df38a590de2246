"""Refusals decided from the command line alone, raised before Megatron validates, prints or builds.

``mhc-pretrain-gpt`` parses the command line once with Megatron's own parser (no validation) and
runs :func:`check_launch_args` on the result; only then does Megatron's ``parse_and_validate_args``
run (which prints every argument) and the model get built. Every message names the flag, the value
and the fix. The same conditions are checked again on the built configs (``check_transformer_config``,
``check_dualpipev_config``) for users who build models from the specs directly.
"""

from __future__ import annotations

import sys
import types

from ..mcore.hybrid import check_hybrid_pattern
from ..mcore.settings import KERNEL_STREAMS, check_transformer_config
from ..pipeline.program import check_microbatches
from .arguments import mhc_settings_from_args
from .launch_environment import check_launch_environment
from .profile_ranges import check_profile_ranges_args


def check_launch_args(args, *, builtin_entry: bool) -> None:
    """All refusals that the parsed, not yet validated, Megatron arguments decide (ValueError).

    ``builtin_entry``: the launch runs mhc-megatron's own GPT entry (no Megatron-LM checkout).
    """
    settings = mhc_settings_from_args(args)
    check_launch_environment(args)  # transformer-engine present when asked for; the step LR schedule
    check_transformer_config(args, settings, setup=False)
    if getattr(args, "hybrid_layer_pattern", None):
        check_hybrid_pattern(args.hybrid_layer_pattern, settings)
        if settings.enabled:
            from .model_config import check_hybrid_stack

            check_hybrid_stack(settings.mode, args.hybrid_layer_pattern, args.transformer_impl,
                               getattr(args, "multi_latent_attention", False),
                               getattr(args, "restore_modelopt_state", False))
    if getattr(args, "pipeline_schedule", "default") == "dualpipev":
        check_dualpipev_args(args, builtin_entry=builtin_entry)
    check_profile_ranges_args(args)
    if builtin_entry:
        from .gpt_entry import check_supported

        check_supported(args)
    check_kernels_runnable(settings)
    warn_reference_fallback(settings)


def check_kernels_runnable(settings, *, cuda: bool | None = None) -> None:
    """``--mhc-kernels triton`` where the kernels cannot run would fail at the first mHC op."""
    if not (settings.enabled and settings.backend == "triton"):
        return
    from ..kernels import interpreting, triton_available

    if not triton_available():
        raise ValueError("--mhc-kernels triton: triton is not installed (pip install triton, or use "
                         "--mhc-kernels auto / reference)")
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda and not interpreting():
        raise ValueError("--mhc-kernels triton: this machine has no CUDA device, and the kernels run on CUDA "
                         "tensors (on CPU only under TRITON_INTERPRET=1, slowly): use --mhc-kernels auto or reference")


def warn_reference_fallback(settings, *, cuda: bool | None = None) -> bool:
    """``--mhc-kernels auto`` on a GPU with an n the kernels lack runs the slow reference: say so
    once, at launch, instead of a runtime warning per op (``--mhc-kernels triton`` refuses it)."""
    if not (settings.enabled and settings.backend == "auto" and settings.expansion_rate not in KERNEL_STREAMS):
        return False
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        n = settings.expansion_rate
        print(f"mhc-pretrain-gpt: WARNING: --expansion-rate {n}: the Triton kernels are compiled for n in "
              f"{KERNEL_STREAMS}, so --mhc-kernels auto runs every mHC step of this launch in the PyTorch "
              f"reference ops on the GPU (several times slower): use n in {KERNEL_STREAMS} for the kernels, "
              "or --mhc-kernels reference to choose the reference explicitly", file=sys.stderr, flush=True)
    return cuda


def data_parallel_size(args) -> int:
    """What Megatron's validation will compute from the world size and the model-parallel sizes."""
    model_parallel = (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
                      * getattr(args, "context_parallel_size", 1))
    if args.world_size % model_parallel:
        raise ValueError(
            f"--tensor-model-parallel-size x --pipeline-model-parallel-size x --context-parallel-size = "
            f"{model_parallel} does not divide the world size {args.world_size}: change the sizes or the rank count"
        )
    return args.world_size // model_parallel


def microbatches_per_step(args) -> int | None:
    """Micro-batches per step and data-parallel rank (None with a batch-size ramp-up)."""
    if getattr(args, "rampup_batch_size", None):
        return None
    dp = data_parallel_size(args)
    global_batch = args.global_batch_size or args.micro_batch_size * dp
    return global_batch // (args.micro_batch_size * dp)


def check_dualpipev_args(args, *, builtin_entry: bool) -> None:
    """``--pipeline-schedule dualpipev``: everything its runtime needs, from the command line."""
    from ..pipeline.dualpipev import check_dualpipev_config

    pp = args.pipeline_model_parallel_size
    if pp < 2:
        raise ValueError(
            f"--pipeline-schedule dualpipev needs --pipeline-model-parallel-size >= 2, got {pp}: the V "
            "places two stages on each of at least two ranks (drop the flag to train without pipelining)"
        )
    if not builtin_entry:
        raise ValueError(
            "--pipeline-schedule dualpipev runs with the built-in entry only (both ends of the V read "
            "batches on pipeline rank 0, which the checkout's pretrain_gpt.py does not do): drop --megatron-lm"
        )
    if getattr(args, "hybrid_layer_pattern", None):
        raise ValueError("--pipeline-schedule dualpipev supports GPTModel only; drop --hybrid-layer-pattern "
                         "(HybridModel runs Megatron's schedules)")
    if not getattr(args, "untie_embeddings_and_output_weights", False):
        raise ValueError(
            "--pipeline-schedule dualpipev keeps the embedding (chunk 0) and the output layer (chunk 1) as "
            "two chunks of rank 0 and does not tie their weights: add --untie-embeddings-and-output-weights"
        )
    vpp = getattr(args, "num_virtual_stages_per_pipeline_rank", None)
    layout = types.SimpleNamespace(
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=2 if vpp is None else vpp,
        num_layers=args.num_layers,
        pipeline_model_parallel_layout=getattr(args, "pipeline_model_parallel_layout", None),
        num_layers_in_first_pipeline_stage=getattr(args, "decoder_first_pipeline_num_layers", None),
        num_layers_in_last_pipeline_stage=getattr(args, "decoder_last_pipeline_num_layers", None),
        param_sync_func=True if getattr(args, "overlap_param_gather", False) else None,
        mtp_num_layers=getattr(args, "mtp_num_layers", None),
    )
    try:
        check_dualpipev_config(layout)
    except ValueError as err:
        raise ValueError(f"--pipeline-schedule dualpipev: {err}") from None
    microbatches = microbatches_per_step(args)
    if microbatches is None:
        raise ValueError("--pipeline-schedule dualpipev needs a fixed number of micro-batches per step: "
                         "drop --rampup-batch-size")
    try:
        check_microbatches("dualpipev", pp, microbatches)
    except ValueError as err:
        given = args.global_batch_size if args.global_batch_size else "not given (= micro-batch x data-parallel size)"
        raise ValueError(
            f"--pipeline-schedule dualpipev with --global-batch-size {given}, --micro-batch-size "
            f"{args.micro_batch_size} and {data_parallel_size(args)} data-parallel rank(s): {err}"
        ) from None
