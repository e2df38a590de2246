"""User-facing mHC settings, and the checks that keep them compatible with a Megatron config."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..ops import (
    DROPOUT_PLACEMENTS,
    EPS_PLACEMENTS,
    INIT_SCHEMES,
    SINKHORN_ORDERS,
    check_expansion_rate,
    check_iters,
)
from ..ops._backend import BACKENDS

RESIDUAL_MODES = ("residual", "hc", "mhc")
CONTRACTIONS = ("mean", "sum")
#: (field, flag, choices with the default first, implemented by the Triton kernels, mhc mode only)
_NUMERICS_OPTIONS = (
    ("sinkhorn_order", "--mhc-sinkhorn-order", SINKHORN_ORDERS, False, True),
    ("norm_eps_placement", "--mhc-norm-eps-placement", EPS_PLACEMENTS, False, True),
    ("dropout", "--mhc-dropout", DROPOUT_PLACEMENTS, False, False),
    ("init", "--mhc-init", INIT_SCHEMES, True, True),  # initial values only: any backend
)


@dataclass(frozen=True)
class MHCSettings:
    """How the residual stream of a Megatron model is built.

    mode: ``residual`` (Megatron unchanged), ``hc`` (unconstrained Hyper-Connections, for
        comparison) or ``mhc``.
    expansion_rate: number of residual streams n.
    sinkhorn_iters: Sinkhorn-Knopp iterations t_max for H_res (mhc only).
    alpha_init: initial value of the three coefficient gates.
    res_init_diag: initial diagonal of the H_res logits (mhc): 0 starts H_res uniform, 4 to 8
        starts it near the identity.
    coeff_eps: epsilon of the RMS norm inside the coefficient computation.
    check_finite: raise as soon as a coefficient is NaN/Inf (one device sync per sublayer;
        for debugging).
    contraction: how the streams are combined at the model exit (``mean`` or ``sum``).
    backend: the ops' backend: ``auto`` (fused Triton kernels on CUDA, the PyTorch reference
        elsewhere), ``reference`` or ``triton``.
    recompute: discard the mHC intermediates after the forward pass and recompute them in
        blocks of ``recompute_block_size`` sublayers (``"auto"``: the L_r* formula, per stage).
    post_res_stream: run the MLP sublayer's post+residual kernel on a dedicated high-priority
        CUDA stream (the paper's DualPipe setting; no effect on CPU).

    Numerics of upstream Megatron-LM's mHC, to continue a converted checkpoint with the same
    maths (docs/megatron.md compares the two); the defaults are ours:

    sinkhorn_order: ``cols-first`` (the paper's and DeepSeek's released code's order) or
        ``rows-first`` (upstream's, with its 1e-6 clamp on the sums); mhc only.
    norm_eps_placement: ``inside-sqrt`` (``rsqrt(mean(v^2) + eps)``) or ``outside``
        (upstream's ``1 / (rms + eps)``); mhc only.
    dropout: ``shared`` (one mask on the sublayer output, shared by the n streams) or
        ``per-stream`` (upstream's: dropout of the expanded ``H_post^T · F``).
    init: ``ours`` or ``upstream`` (xavier phi, zero biases: H_pre = 1/2); mhc only.

    The first three run in the PyTorch reference ops only: with ``backend`` ``triton`` (or
    ``auto`` on a machine with CUDA) they are refused here, naming ``--mhc-kernels reference``.
    """

    mode: str = "residual"
    expansion_rate: int = 4
    sinkhorn_iters: int = 20
    alpha_init: float = 0.01
    res_init_diag: float = 0.0
    coeff_eps: float = 1e-6
    check_finite: bool = False
    contraction: str = "mean"
    backend: str = "auto"
    recompute: bool = False
    recompute_block_size: int | str = "auto"
    post_res_stream: bool = False
    sinkhorn_order: str = "cols-first"
    norm_eps_placement: str = "inside-sqrt"
    dropout: str = "shared"
    init: str = "ours"

    def __post_init__(self):
        if self.mode not in RESIDUAL_MODES:
            raise ValueError(
                f"residual mode must be one of {', '.join(RESIDUAL_MODES)}, got {self.mode!r}"
            )
        check_expansion_rate(self.expansion_rate)
        check_iters(self.sinkhorn_iters)
        if not math.isfinite(self.alpha_init) or self.alpha_init < 0:
            raise ValueError(f"mHC gate init must be a finite value >= 0, got {self.alpha_init!r}")
        if not math.isfinite(self.res_init_diag):
            raise ValueError(f"H_res init diagonal must be finite, got {self.res_init_diag!r}")
        if not self.coeff_eps > 0:
            raise ValueError(f"coefficient norm epsilon must be > 0, got {self.coeff_eps!r}")
        if self.contraction not in CONTRACTIONS:
            raise ValueError(
                f"stream contraction must be one of {', '.join(CONTRACTIONS)}, got {self.contraction!r}"
            )

        if self.backend not in BACKENDS:
            raise ValueError(f"mHC kernel backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        b = self.recompute_block_size
        if b != "auto" and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"mHC recompute block size must be 'auto' or an integer >= 1, got {b!r}")
        self._check_upstream_numerics()

    def _check_upstream_numerics(self) -> None:
        chosen = []  # (flag, value, in the Triton kernels, mhc only) of every non-default choice
        for field, flag, allowed, in_kernels, mhc_only in _NUMERICS_OPTIONS:
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
            if value != allowed[0]:
                chosen.append((flag, value, in_kernels, mhc_only))
        for flag, value, _, mhc_only in chosen:
            if self.mode == "residual":
                raise ValueError(f"{flag} {value} needs --residual-mode mhc (the residual mode has no mHC step)")
            if self.mode == "hc" and mhc_only:
                raise ValueError(
                    f"{flag} {value} applies to --residual-mode mhc (HC has no Sinkhorn and its own "
                    "per-stream norm and initialisation); drop it or use --residual-mode mhc"
                )
        if self.init == "upstream" and self.res_init_diag != 0.0:
            raise ValueError(
                f"--mhc-res-init-diag {self.res_init_diag} belongs to --mhc-init ours (upstream's init "
                "sets every bias to 0); drop one of them"
            )
        if self.dropout == "per-stream" and self.recompute:
            raise ValueError(
                "--mhc-dropout per-stream with --mhc-recompute is not supported (the recompute chain "
                "rebuilds the residual from the sublayer output, not from per-stream masks); drop one"
            )
        reference_only = [f"{flag} {value}" for flag, value, in_kernels, _ in chosen if not in_kernels]
        if reference_only and self._may_run_triton():
            raise ValueError(
                f"{', '.join(reference_only)}: implemented in the PyTorch reference ops only, not in the "
                f"Triton kernels that --mhc-kernels {self.backend} runs"
                + (" on this CUDA machine" if self.backend == "auto" else "")
                + "; add --mhc-kernels reference"
            )

    def _may_run_triton(self) -> bool:
        if self.backend == "triton":
            return True
        if self.backend == "auto":
            import torch

            return torch.cuda.is_available()
        return False

    @property
    def upstream_numerics(self) -> bool:
        """True when every numerics option is upstream Megatron-LM's."""
        return (self.sinkhorn_order, self.norm_eps_placement, self.dropout) == ("rows-first", "outside", "per-stream")

    @property
    def enabled(self) -> bool:
        """True when the model carries an n-stream residual (hc or mhc)."""
        return self.mode != "residual"

    def replace(self, **changes) -> "MHCSettings":
        return dataclasses.replace(self, **changes)


def check_transformer_config(config, settings: MHCSettings) -> None:
    """Refuse Megatron options that cannot carry an n-stream residual, naming what to use instead.

    ``config`` is a megatron-core ``TransformerConfig`` (or anything with the same attributes).
    """
    if not settings.enabled:
        return
    mode = settings.mode

    def refuse(what: str, fix: str) -> None:
        raise ValueError(f"--residual-mode {mode} does not support {what}: {fix}")

    if getattr(config, "enable_mhc_connections", False):  # Megatron-LM main's own mHC (0.20)
        refuse(
            "upstream Megatron-LM's own hyper-connections on the same model "
            "(enable_mhc_connections=True); the two would both widen the residual",
            "use one of them: drop --enable-mhc-connections, or --residual-mode residual "
            "(mhc-megatron convert-checkpoint moves checkpoints between the two)",
        )
    if getattr(config, "cuda_graph_impl", "none") not in (None, "none"):
        refuse(
            f"CUDA graphs (cuda_graph_impl={config.cuda_graph_impl!r}), whose static buffers "
            "have the residual width",
            "run without --cuda-graph-impl",
        )
    if getattr(config, "recompute_granularity", None) == "selective" and "layernorm" in (
        getattr(config, "recompute_modules", None) or []
    ):
        refuse(
            "selective recompute of 'layernorm' (the norm slot holds the mHC coefficient step)",
            "drop 'layernorm' from --recompute-modules",
        )
    if getattr(config, "fine_grained_activation_offloading", False) and {
        "attn_norm",
        "mlp_norm",
    } & set(getattr(config, "offload_modules", None) or []):
        refuse(
            "offloading 'attn_norm'/'mlp_norm' activations",
            "drop attn_norm and mlp_norm from --offload-modules",
        )
    if getattr(config, "overlap_moe_expert_parallel_comm", False):
        refuse(
            "--overlap-moe-expert-parallel-comm (its fine-grained layer callables detach the "
            "residual as a single tensor)",
            "run MoE layers without --overlap-moe-expert-parallel-comm",
        )
    if getattr(config, "inference_fuse_tp_communication", False) or (
        getattr(config, "transformer_impl", None) == "inference_optimized"
    ):
        refuse(
            "the inference-optimized layers (they fuse the residual add into the projections)",
            "use --transformer-impl local or transformer_engine",
        )
    if (getattr(config, "pipeline_model_parallel_size", 1) or 1) > 1 and not getattr(
        config, "variable_seq_lengths", False
    ):
        refuse(
            f"pipeline parallelism (pipeline_model_parallel_size={config.pipeline_model_parallel_size}) "
            "with fixed pipeline shapes: Megatron's schedules size the stage buffers with hidden_size, "
            "but stages exchange the n-stream residual",
            "call mhc_megatron.mcore.configure_pipeline(config, settings) on the config first "
            "(mhc-pretrain-gpt and apply_mhc_to_gpt_config do)",
        )
    if settings.recompute and getattr(config, "recompute_granularity", None) == "full":
        refuse(
            "--mhc-recompute together with --recompute-granularity full (full recompute already "
            "re-runs whole layers, mHC steps included)",
            "use one of them; --mhc-recompute composes with selective recompute",
        )
    if getattr(config, "heterogeneous_block_specs", False):
        refuse("heterogeneous block specs", "use a homogeneous GPT layer spec")


def configure_pipeline(config, settings: MHCSettings) -> None:
    """Let Megatron's pipeline schedules carry the n-stream residual between stages.

    Megatron sizes the receive buffers of stage-to-stage messages as ``[s, b, hidden_size]`` (1F1B's
    ``get_tensor_shapes``, the interleaved schedule's inline shape). With
    ``config.variable_seq_lengths`` its p2p layer sends each message's shape first (three int64s)
    and sizes the buffer from that, so ``[s, b, n*hidden_size]`` arrives whole. The sequence length
    stays fixed; only the hand-shake is used. Also records ``config.mhc_settings``, from which
    the DualPipeV schedule sizes its stage tensors. No-op without hc/mhc or pipeline parallelism.
    """
    config.mhc_settings = settings
    if settings.enabled and (getattr(config, "pipeline_model_parallel_size", 1) or 1) > 1:
        config.variable_seq_lengths = True
