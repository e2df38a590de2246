"""The mHC command-line flags for Megatron-LM launches, and their translation to settings."""

from __future__ import annotations

import argparse

from ..mcore.settings import CONTRACTIONS, DEFAULT_EXPANSION_RATE, RESIDUAL_MODES, InvalidSetting, MHCSettings
from ..ops import DROPOUT_PLACEMENTS, EPS_PLACEMENTS, INIT_SCHEMES, SINKHORN_ORDERS
from ..ops import BACKENDS
from .lr_schedule import parse_step_decay


def add_mhc_arguments(parser: argparse.ArgumentParser, *, launcher_only_action=None,
                      launcher_only_switch_action=None) -> argparse.ArgumentParser:
    """Add the mHC flags to a Megatron-LM argument parser (an ``extra_args_provider``).

    ``launcher_only_action``: the argparse action of the flags that need the launcher's hooks (the
    patched-script route passes one that refuses their non-default values);
    ``launcher_only_switch_action``: the same for the launcher-only ``store_true`` flags.
    """
    d = MHCSettings()
    launcher_only = {"action": launcher_only_action} if launcher_only_action else {}
    launcher_only_switch = {"action": launcher_only_switch_action or "store_true"}
    g = parser.add_argument_group("mHC (mhc-megatron)")
    g.add_argument(
        "--residual-mode",
        choices=RESIDUAL_MODES,
        default="residual",
        help="Residual stream: 'residual' (Megatron unchanged), 'hc' (unconstrained "
        "Hyper-Connections, for comparison) or 'mhc' (manifold-constrained). Default: residual.",
    )
    g.add_argument(
        "--expansion-rate",
        type=int,
        default=None,
        help=f"Number of residual streams n for hc/mhc (default {DEFAULT_EXPANSION_RATE}).",
    )
    g.add_argument(
        "--mhc-sinkhorn-iters",
        type=int,
        default=d.sinkhorn_iters,
        help="Sinkhorn-Knopp iterations t_max for H_res (default %(default)s).",
    )
    g.add_argument(
        "--mhc-alpha-init",
        type=float,
        default=d.alpha_init,
        help="Initial value of the three coefficient gates alpha (default %(default)s).",
    )
    g.add_argument(
        "--mhc-res-init-diag",
        type=float,
        default=d.res_init_diag,
        help="Initial diagonal of the H_res logits: 0 starts H_res uniform (1/n), 4 to 8 "
        "starts it near the identity (default %(default)s).",
    )
    g.add_argument(
        "--mhc-coeff-eps",
        type=float,
        default=d.coeff_eps,
        help="Epsilon of the RMS norm inside the coefficient computation (default %(default)s).",
    )
    g.add_argument(
        "--mhc-sinkhorn-order",
        choices=SINKHORN_ORDERS,
        default=d.sinkhorn_order,
        help="Sinkhorn-Knopp order: cols-first (the mHC paper's and DeepSeek's released code's order) or "
        "rows-first (upstream Megatron-LM's: exp(logits - row max), then rows, then columns, sums clamped "
        "at 1e-6; PyTorch reference ops only) (default %(default)s).",
    )
    g.add_argument(
        "--mhc-norm-eps-placement",
        choices=EPS_PLACEMENTS,
        default=d.norm_eps_placement,
        help="Epsilon of the coefficient RMS norm: inside-sqrt = rsqrt(mean(v^2) + eps), or outside = "
        "1/(rms + eps) (upstream Megatron-LM's; PyTorch reference ops only) (default %(default)s).",
    )
    g.add_argument(
        "--mhc-dropout",
        choices=DROPOUT_PLACEMENTS,
        default=d.dropout,
        help="Hidden dropout of an mHC sublayer: shared = one mask on the sublayer output for all n "
        "streams, or per-stream = dropout of the expanded H_post^T F (upstream Megatron-LM's; PyTorch "
        "reference ops only, not with --mhc-recompute) (default %(default)s).",
    )
    g.add_argument(
        "--mhc-init",
        choices=INIT_SCHEMES,
        default=d.init,
        help="Initial mHC parameters: ours (phi ~ N(0, 1/(nC)), H_pre = 1/n) or upstream (Megatron-LM's: "
        "xavier-uniform phi, zero biases, H_pre = 1/2) (default %(default)s).",
    )
    g.add_argument(
        "--mhc-check-finite",
        action="store_true",
        help="Raise as soon as an mHC coefficient is NaN/Inf, naming the sublayer "
        "(one device sync per sublayer; for debugging).",
    )
    g.add_argument(
        "--mhc-contraction",
        choices=CONTRACTIONS,
        default=d.contraction,
        help="How the streams are combined before the final norm (default %(default)s).",
    )
    g.add_argument(
        "--mhc-kernels",
        choices=BACKENDS,
        default=d.backend,
        help="mHC ops backend: auto = fused Triton kernels on CUDA (the PyTorch reference, with a "
        "warning, for inputs they do not support), reference, or triton (default %(default)s).",
    )
    g.add_argument(
        "--mhc-recompute",
        action="store_true",
        help="Discard the mHC intermediates after the forward pass and recompute them in backward, "
        "in blocks of sublayers that never cross a pipeline stage (attention and MLP are not re-run).",
    )
    g.add_argument(
        "--mhc-recompute-block-size",
        type=_block_size,
        default="auto",
        help="Sublayers per recompute block: 'auto' (the L_r* formula per stage) or an integer "
        "(clamped to the stage) (default %(default)s).",
    )
    g.add_argument(
        "--mhc-post-res-stream",
        action="store_true",
        help="Run the MLP sublayer's post+residual kernel on a dedicated high-priority CUDA stream, "
        "so pipeline sends waiting for it are not queued behind other work (on by default with "
        "--pipeline-schedule dualpipev; no effect on CPU).",
    )
    g.add_argument(
        "--mhc-log-interval",
        **launcher_only,
        type=int,
        default=0,
        help="Every N iterations log per-sublayer and composite Amax gains and H_res statistics "
        "through Megatron's TensorBoard/W&B writers (0: off) (default %(default)s).",
    )
    g.add_argument(
        "--mhc-profile-ranges",
        **launcher_only_switch,
        help="Mark the mHC steps (mhc.expand, mhc.pre, mhc.post_res, mhc.contract) as NVTX ranges, so nsys "
        "shows them; recorded through Megatron's NVTX ranges, so needs --profile --nvtx-ranges.",
    )
    g.add_argument(
        "--mhc-lr-step-decay",
        **launcher_only,
        type=parse_step_decay,
        default=None,
        metavar="FRACTION:FACTOR,...",
        help="Step learning-rate schedule, e.g. 0.8:0.316,0.9:0.1: after the warm-up the rate is --lr, "
        "times 0.316 from 80%% of the decay steps (--lr-decay-iters, default --train-iters) and times 0.1 "
        "from 90%%, never below --min-lr; needs --lr-decay-style constant (default: off).",
    )
    g.add_argument(
        "--pipeline-schedule",
        **launcher_only,
        choices=("default", "dualpipev"),
        default="default",
        help="Pipeline schedule: 'default' (Megatron's 1F1B, or interleaved with virtual stages) or "
        "'dualpipev' (V-shaped: pipeline rank r holds stages r and 2P-1-r; sets "
        "--num-virtual-stages-per-pipeline-rank 2; needs >= 2P micro-batches per step and "
        "--untie-embeddings-and-output-weights; docs/pipeline.md) (default %(default)s).",
    )
    return parser


def _block_size(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {text!r}") from None


def chain_args_providers(*providers):
    """One ``extra_args_provider`` that applies several (``None`` entries are skipped)."""

    def provider(parser):
        for p in providers:
            if p is not None:
                parser = p(parser)
        return parser

    return provider


def mhc_settings_from_args(args: argparse.Namespace) -> MHCSettings:
    """Validated settings from parsed arguments; refuses contradictory combinations."""
    mode = args.residual_mode
    n = args.expansion_rate
    if mode == "residual":
        if n is not None:
            raise ValueError(
                f"--expansion-rate {n} needs --residual-mode hc or mhc (the residual mode has one stream)"
            )
        n = DEFAULT_EXPANSION_RATE
    elif n is None:
        n = DEFAULT_EXPANSION_RATE
    interval = getattr(args, "mhc_log_interval", 0)
    if interval < 0:
        raise ValueError(f"--mhc-log-interval {interval}: must be >= 0 (0: off)")
    if interval and mode == "residual":
        raise ValueError(f"--mhc-log-interval {interval} logs H_res, which needs --residual-mode hc or mhc")
    if mode != "residual" and getattr(args, "enable_mhc_connections", False):
        raise ValueError(
            f"--residual-mode {mode} and upstream Megatron's --enable-mhc-connections both build "
            "hyper-connections; use one of them (docs/megatron.md compares the two)"
        )
    try:
        return _settings(args, mode, n)
    except InvalidSetting as err:
        flag = SETTING_FLAGS.get(err.field, err.field)
        raise ValueError(f"{flag} {err.value}: {err.why}") from None


# the flag that sets each MHCSettings field
SETTING_FLAGS = {
    "mode": "--residual-mode", "expansion_rate": "--expansion-rate", "sinkhorn_iters": "--mhc-sinkhorn-iters",
    "alpha_init": "--mhc-alpha-init", "res_init_diag": "--mhc-res-init-diag", "coeff_eps": "--mhc-coeff-eps",
    "check_finite": "--mhc-check-finite", "contraction": "--mhc-contraction", "backend": "--mhc-kernels",
    "recompute": "--mhc-recompute", "recompute_block_size": "--mhc-recompute-block-size",
    "post_res_stream": "--mhc-post-res-stream",
}


def _settings(args, mode: str, n: int) -> MHCSettings:
    return MHCSettings(
        mode=mode,
        expansion_rate=n,
        sinkhorn_iters=args.mhc_sinkhorn_iters,
        alpha_init=args.mhc_alpha_init,
        res_init_diag=args.mhc_res_init_diag,
        coeff_eps=args.mhc_coeff_eps,
        check_finite=args.mhc_check_finite,
        contraction=args.mhc_contraction,
        backend=args.mhc_kernels,
        recompute=args.mhc_recompute,
        recompute_block_size=args.mhc_recompute_block_size,
        post_res_stream=args.mhc_post_res_stream or getattr(args, "pipeline_schedule", None) == "dualpipev",
        sinkhorn_order=args.mhc_sinkhorn_order,
        norm_eps_placement=args.mhc_norm_eps_placement,
        dropout=args.mhc_dropout,
        init=args.mhc_init,
    )
