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
from ..kernels import SUPPORTED_STREAMS as KERNEL_STREAMS  # torch only, no triton import
from ..ops import BACKENDS

RESIDUAL_MODES = ("residual", "hc", "mhc")
DEFAULT_EXPANSION_RATE = 4
CONTRACTIONS = ("mean", "sum")
#: (field, flag, choices with the default first, implemented by the Triton kernels, mhc mode only)
_NUMERICS_OPTIONS = (
    ("sinkhorn_order", "--mhc-sinkhorn-order", SINKHORN_ORDERS, False, True),
    ("norm_eps_placement", "--mhc-norm-eps-placement", EPS_PLACEMENTS, False, True),
    ("dropout", "--mhc-dropout", DROPOUT_PLACEMENTS, False, False),
    ("init", "--mhc-init", INIT_SCHEMES, True, True),  # initial values only: any backend
)


def _real(value) -> bool:
    """A number, not a bool (``True`` would pass ``isinstance(value, int)``) nor a string."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def expansion_rate_for(mode: str, n: int) -> int:
    """``n`` for hc/mhc, the default for the one-stream residual mode: for tools that run several
    modes from one ``--expansion-rate`` (demo, profile), where n only applies to hc and mhc."""
    return n if mode != "residual" else DEFAULT_EXPANSION_RATE


class InvalidSetting(ValueError):
    """A refused :class:`MHCSettings` field; the launcher names the flag that set it."""

    def __init__(self, field: str, value, why: str):
        super().__init__(f"{field}={value!r}: {why}")
        self.field, self.value, self.why = field, value, why


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
        def refuse(field: str, why: str):
            raise InvalidSetting(field, getattr(self, field), why)

        if self.mode not in RESIDUAL_MODES:
            refuse("mode", f"the residual mode must be one of {', '.join(RESIDUAL_MODES)}")
        for field, check in (("expansion_rate", check_expansion_rate), ("sinkhorn_iters", check_iters)):
            try:
                check(getattr(self, field))
            except ValueError as err:
                refuse(field, str(err))
        if self.mode == "residual" and self.expansion_rate not in (1, DEFAULT_EXPANSION_RATE):
            refuse("expansion_rate", "the residual mode has one stream; use mode 'hc' or 'mhc' for n streams, "
                   f"or leave the expansion rate at its default {DEFAULT_EXPANSION_RATE}")
        if not _real(self.alpha_init) or not math.isfinite(self.alpha_init) or self.alpha_init < 0:
            refuse("alpha_init", "the gate init must be a finite value >= 0 (the paper uses 0.01)")
        if not _real(self.res_init_diag) or not math.isfinite(self.res_init_diag):
            refuse("res_init_diag", "the H_res init diagonal must be finite (0: uniform, 4 to 8: near the identity)")
        if not _real(self.coeff_eps) or not (0 < self.coeff_eps < math.inf):
            refuse("coeff_eps", "the coefficient norm epsilon must be a finite value > 0 (default 1e-6)")
        for field in ("check_finite", "recompute", "post_res_stream"):
            if not isinstance(getattr(self, field), bool):
                refuse(field, "must be True or False")
        if self.contraction not in CONTRACTIONS:
            refuse("contraction", f"the stream contraction must be one of {', '.join(CONTRACTIONS)}")
        if self.backend not in BACKENDS:
            refuse("backend", f"the mHC kernel backend must be one of {', '.join(BACKENDS)}")
        b = self.recompute_block_size
        if b != "auto" and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            refuse("recompute_block_size", "the recompute block size must be 'auto' or an integer >= 1")
        if self.enabled and self.backend == "triton" and self.expansion_rate not in KERNEL_STREAMS:
            refuse("expansion_rate", f"the Triton kernels (--mhc-kernels triton) are compiled for n in "
                   f"{KERNEL_STREAMS}: use one of those, or --mhc-kernels reference")
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


def check_transformer_config(config, settings: MHCSettings, *, setup: bool = True) -> None:
    """Refuse Megatron options that cannot carry an n-stream residual, naming what to use instead.

    ``config`` is a megatron-core ``TransformerConfig`` or Megatron's parsed arguments (the same
    attribute names). ``setup``: also require what a launcher sets up before the model is built
    (the pipeline shapes of :func:`configure_pipeline`, the fine-grained callables hook); the
    command line has not had it yet.
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
    if setup and getattr(config, "overlap_moe_expert_parallel_comm", False) and not fine_grained_callables_ready():
        refuse(
            "--overlap-moe-expert-parallel-comm without the mHC fine-grained layer callables (megatron-core's "
            "detach the residual as one tensor)",
            "launch through mhc-pretrain-gpt, or install hook 'fine-grained-callables' "
            "(mhc_megatron.hooks.install) before building the model",
        )
    if getattr(config, "overlap_moe_expert_parallel_comm", False) and settings.recompute:
        refuse(
            "--mhc-recompute together with --overlap-moe-expert-parallel-comm (a recompute block cannot "
            "span the expert-parallel schedule nodes)",
            "drop one of them",
        )
    if getattr(config, "inference_fuse_tp_communication", False) or (
        getattr(config, "transformer_impl", None) == "inference_optimized"
    ):
        refuse(
            "the inference-optimized layers (they fuse the residual add into the projections)",
            "use --transformer-impl local or transformer_engine",
        )
    if setup and (getattr(config, "pipeline_model_parallel_size", 1) or 1) > 1 and not pipeline_shapes_handled(config):
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


def fine_grained_callables_ready() -> bool:
    """Whether megatron-core's fine-grained layer callables know mHC MoE layers (hook ``fine-grained-callables``)."""
    from .. import hooks

    return "fine-grained-callables" in hooks.installed()


def pipeline_shapes_handled(config) -> bool:
    """Whether Megatron's schedules will size stage buffers for the n-stream residual: the shape
    hand-shake of ``variable_seq_lengths``, or hook ``pipeline-stream-shapes`` (the launcher's)."""
    from .. import hooks

    return bool(getattr(config, "variable_seq_lengths", False)) or "pipeline-stream-shapes" in hooks.installed()


def configure_pipeline(config, settings: MHCSettings) -> None:
    """Let Megatron's pipeline schedules carry the n-stream residual between stages.

    Megatron sizes the receive buffers of stage-to-stage messages as ``[s, b, hidden_size]`` (1F1B's
    ``get_tensor_shapes``, the interleaved schedule's inline shape). ``mhc-pretrain-gpt`` hands its
    schedules a communicator with n-times-wider buffers (hook ``pipeline-stream-shapes``,
    :mod:`mhc_megatron.pipeline.stream_shapes`), and this function leaves the config alone. For
    other callers of Megatron's schedules it sets ``config.variable_seq_lengths``: Megatron's p2p
    layer then sends each message's shape first and sizes the buffer from it, at the price of a
    device synchronisation and a host read per exchange. No-op without hc/mhc or pipeline parallelism.
    """
    if settings.enabled and (getattr(config, "pipeline_model_parallel_size", 1) or 1) > 1 and not pipeline_shapes_handled(config):
        config.variable_seq_lengths = True
