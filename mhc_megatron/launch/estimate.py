"""What a launch configuration needs, estimated on a laptop.

The model is built by Megatron itself (the launcher's hooks, Megatron's parser and builder) on
the meta device with every parallel size set to 1, so the parameter count is exact. Per
pipeline rank the estimates are:

- weights, gradients and optimizer state: bf16/fp16 weights (2 B), fp32 main gradients (4 B),
  Adam's fp32 master weights and two moments (12 B, split over the data-parallel ranks with the
  distributed optimizer); dense parameters split over TP, expert parameters over EP x ETP;
- activations: per layer and micro-batch ``s b h (18 + 4 f / h)`` bytes (Korthikanti et al.,
  Table 2, with sequence parallelism and flash attention; ``f`` is the dense FFN, or top-k x
  expert FFN + shared for MoE layers), divided by TP under sequence parallelism, plus the mHC
  tensors as ``plan-recompute`` counts them, times the micro-batches in flight that the
  schedule simulator reports for that rank;
- pipeline traffic: the rank's stage-boundary messages per step, ``s b n h`` bf16 elements each;
- step time: ``6 x active parameters x tokens`` (plus attention) at an assumed model-FLOP
  utilisation, plus the simulated bubble. A planning figure, not a measurement.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass

from .config import LaunchConfig, Layout, check_layout

# Flags the single-process meta build replaces (parallel layout, runtime, data, output).
_NOT_FOR_META_BUILD = (
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    "expert_tensor_parallel_size", "context_parallel_size", "pipeline_schedule",
    "num_virtual_stages_per_pipeline_rank", "sequence_parallel", "transformer_impl", "moe_grouped_gemm",
    "use_distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather", "mhc_post_res_stream",
    "data_path", "train_data_path", "valid_data_path", "test_data_path", "tokenizer_type", "tokenizer_model",
    "mock_data", "split", "save", "load", "save_interval", "tensorboard_dir", "wandb_project",
    "wandb_exp_name", "wandb_save_dir", "moe_token_dispatcher_type", "use_flash_attn", "attention_backend",
    "overlap_moe_expert_parallel_comm",  # a schedule choice that megatron-core allows only with EP > 1
)
GIB = 2**30


@dataclass
class ParameterCounts:
    total: int
    active: int
    expert: int  # routed experts
    mhc: int
    per_layer: dict  # global layer index -> (dense, expert)
    embedding: int
    output: int  # output layer + final norm


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_meta_model(cfg: LaunchConfig):
    """The whole model, built by Megatron with mHC hooks on the meta device in this process.

    Everything the build changes is undone before it returns: environment variables, ``sys.argv``,
    Megatron's logger level and global variables, the model-parallel state and process group it
    created, and the hooks (:mod:`mhc_megatron.hooks`)."""
    if "vocab_size" not in cfg.flags:
        raise ValueError(f"{cfg.path}: validate-config needs model.vocab_size (the tokenizer's vocabulary size)")
    with _single_process_megatron():
        return _build_meta_model(cfg)


@contextlib.contextmanager
def _single_process_megatron():
    import logging

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.training import global_vars

    saved_env = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    saved_argv = list(sys.argv)
    logger = logging.getLogger("megatron")
    saved_level = logger.level
    created_group = not dist.is_initialized()
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    logger.setLevel(logging.ERROR)  # its set-up notes would bury the report
    try:
        if created_group:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
            parallel_state.initialize_model_parallel()
        yield
    finally:
        global_vars.unset_global_variables()
        if created_group:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
        logger.setLevel(saved_level)
        sys.argv = saved_argv
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _build_meta_model(cfg: LaunchConfig):
    import torch
    from megatron.core.process_groups_config import ProcessGroupCollection

    from .. import hooks
    from ..mcore.portable import PORTABLE_FLAGS
    from ..training.launcher import LAUNCH_HOOKS, LaunchState, apply_schedule_defaults

    argv = cfg.argv(drop=_NOT_FOR_META_BUILD) + [
        "--transformer-impl", "local", "--mock-data", "--tokenizer-type", "NullTokenizer", *PORTABLE_FLAGS,
    ]
    sys.argv = ["mhc-megatron validate-config", *apply_schedule_defaults(argv)]
    with hooks.active(*LAUNCH_HOOKS, context=LaunchState()):
        from megatron.training.argument_utils import gpt_config_from_args
        from megatron.training.arguments import parse_and_validate_args

        err = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                args = parse_and_validate_args()
        except SystemExit:
            raise ValueError(f"{cfg.path}: Megatron's parser rejects the flags: {err.getvalue().strip().splitlines()[-1]}") from None
        except AssertionError as e:
            raise ValueError(f"{cfg.path}: Megatron rejects the configuration: {_assertion_text(e)}") from None
        try:
            model_cfg = gpt_config_from_args(args)
            _portable_core_attention(model_cfg)
            builder = model_cfg.get_builder_cls()(model_cfg)
            with torch.device("meta"), hooks.active("meta-device-build"), contextlib.redirect_stdout(io.StringIO()):
                return builder.build_model(ProcessGroupCollection.use_mpu_process_groups(), pre_process=True, post_process=True)
        except AssertionError as e:
            raise ValueError(f"{cfg.path}: megatron-core cannot build this model: {_assertion_text(e)}") from None


def _assertion_text(err: AssertionError) -> str:
    """The assertion's message, or, for a bare ``assert``, the failing line of Megatron's source."""
    import traceback

    if str(err):
        return str(err)
    frame = traceback.extract_tb(err.__traceback__)[-1]
    return f"{frame.line} (megatron {os.path.relpath(frame.filename, _megatron_root())}:{frame.lineno})"


def _megatron_root() -> str:
    import megatron

    return os.path.dirname(os.path.dirname(os.path.abspath(megatron.__path__[0])))


def _portable_core_attention(model_cfg) -> None:
    """Core attention holds no parameters; the portable one builds for every attention variant
    (megatron-core's local ``DotProductAttention`` refuses MLA's head sizes)."""
    from ..mcore.attention import SDPACoreAttention
    from ..mcore.specs import with_core_attention

    spec = model_cfg.transformer_layer_spec
    if callable(spec):
        model_cfg.transformer_layer_spec = lambda cfg, vp_stage=None: with_core_attention(
            spec(cfg, vp_stage=vp_stage), SDPACoreAttention)


def count_parameters(model, cfg: LaunchConfig) -> ParameterCounts:
    per_layer: dict = defaultdict(lambda: [0, 0])
    embedding = output = expert = mhc = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if ".coefficients." in name:
            mhc += n
        m = re.match(r"decoder\.layers\.(\d+)\.", name)
        if m:
            is_expert = ".mlp.experts." in name
            per_layer[int(m.group(1))][1 if is_expert else 0] += n
            expert += n if is_expert else 0
        elif name.startswith("embedding."):
            embedding += n
        else:  # output layer, final norm
            output += n
    total = sum(p.numel() for p in model.parameters())
    experts = cfg.get("num_experts")
    topk = cfg.get("moe_router_topk", 2) if experts else 0
    active = total - expert + (expert * topk // experts if experts else 0)
    return ParameterCounts(total, active, expert, mhc, {k: tuple(v) for k, v in per_layer.items()}, embedding, output)


def _layer_activation_bytes(cfg: LaunchConfig, layout: Layout, moe: bool, tokens: int) -> float:
    h = cfg.get("hidden_size")
    f = (cfg.get("moe_router_topk", 2) * cfg.get("moe_ffn_hidden_size", cfg.get("ffn_hidden_size", 4 * h))
         + cfg.get("moe_shared_expert_intermediate_size", 0)) if moe else cfg.get("ffn_hidden_size", 4 * h)
    split = layout.tp if cfg.get("sequence_parallel") or layout.tp == 1 else 1
    return tokens * h * (18 + 4 * f / h) / split


def _warnings(mode: str, n: int, counts: ParameterCounts) -> list[str]:
    """What validate-config accepts but a user should know before launching."""
    from ..mcore.settings import KERNEL_STREAMS

    out = []
    if mode != "residual" and n > max(KERNEL_STREAMS):
        out.append(f"expansion_rate {n}: no Triton kernel (they are compiled for n in {tuple(KERNEL_STREAMS)}), so "
                   f"every mHC step runs in the PyTorch reference ops; the coefficients grow with n^2 (H_res is "
                   f"{n}x{n} per token): mHC holds {counts.mhc / counts.total:.2%} of the parameters here. "
                   f"Use expansion_rate 4 (the paper's) or 8 unless n = {n} is the experiment")
    return out


def estimate(cfg: LaunchConfig, *, mfu: float = 0.35, peak_tflops: float = 989.0) -> dict:
    """The report ``validate-config`` prints (see the module docstring for the formulas)."""
    from ..pipeline.program import placement, program
    from ..pipeline.simulator import simulate
    from ..recompute_plan import resolve_block_size, stored_bytes_per_token

    layout = check_layout(cfg)
    counts = count_parameters(build_meta_model(cfg), cfg)
    seq, micro, h = cfg.get("seq_length"), cfg.get("micro_batch_size", 1), cfg.get("hidden_size")
    n = layout.expansion_rate
    half = cfg.get("bf16") or cfg.get("fp16")
    param_bytes, grad_bytes, opt_bytes = (2, 4, 12) if half else (4, 4, 8)
    dist_opt = cfg.get("use_distributed_optimizer", False)
    dense_dp = layout.dp * layout.cp
    expert_dp = max(1, layout.tp * layout.cp * layout.dp // (layout.ep * layout.etp))
    seq_split = layout.tp if cfg.get("sequence_parallel") else 1
    tokens = seq * micro // layout.cp
    message = tokens // seq_split * n * h * 2
    place = placement(layout.schedule, layout.pp, layout.vpp if layout.schedule == "interleaved" else None)
    sim = simulate(layout.schedule, layout.pp, layout.microbatches,
                   virtual_stages=layout.vpp if layout.schedule == "interleaved" else None)
    mode = cfg.get("residual_mode", "residual")
    recompute = bool(cfg.get("mhc_recompute")) and mode != "residual"
    sublayers = 2 * layout.layers_per_chunk

    ranks = []
    for rank in range(layout.pp):
        stages = place.stages_of(rank)
        layers = [s * layout.layers_per_chunk + i for s in stages for i in range(layout.layers_per_chunk)]
        dense = sum(counts.per_layer[layer][0] for layer in layers)
        expert = sum(counts.per_layer[layer][1] for layer in layers)
        if 0 in stages:
            dense += counts.embedding
        if place.num_stages - 1 in stages:
            dense += counts.output
        dense_gpu, expert_gpu = dense / layout.tp, expert / (layout.ep * layout.etp)
        state = dense_gpu * (param_bytes + grad_bytes + opt_bytes / (dense_dp if dist_opt else 1)) + expert_gpu * (
            param_bytes + grad_bytes + opt_bytes / (expert_dp if dist_opt else 1))
        chunk_bytes = []
        for s in stages:
            chunk_layers = range(s * layout.layers_per_chunk, (s + 1) * layout.layers_per_chunk)
            # a layer is MoE when the built model gave it routed-expert parameters
            base = sum(_layer_activation_bytes(cfg, layout, counts.per_layer[layer][1] > 0, tokens)
                       for layer in chunk_layers)
            extra = 0
            if mode != "residual":
                block = resolve_block_size(cfg.get("mhc_recompute_block_size", "auto"), sublayers, n) if recompute else None
                extra = stored_bytes_per_token(sublayers, h, n, 2, block, first_stage=s == 0) * tokens / seq_split
            chunk_bytes.append((base, extra))
        in_flight = sim.peak_activations[rank] * layout.vpp / len(stages)  # micro-batches per chunk
        base_act = sum(b for b, _ in chunk_bytes) * in_flight
        mhc_act = sum(e for _, e in chunk_bytes) * in_flight
        ops = program(layout.schedule, rank, layout.pp, layout.microbatches,
                      layout.vpp if layout.schedule == "interleaved" else None)
        sends = sum(1 for op in ops if place.sends(op))
        ranks.append({
            "rank": rank, "stages": stages,
            "layers": [[s * layout.layers_per_chunk, (s + 1) * layout.layers_per_chunk - 1] for s in stages],
            "parameters_per_gpu": int(dense_gpu + expert_gpu),
            "weights_and_optimizer_gib": round(state / GIB, 2),
            "in_flight_microbatches": round(in_flight, 2),
            "activations_gib": round(base_act / GIB, 2),
            "mhc_activations_gib": round(mhc_act / GIB, 2),
            "memory_gib": round((state + base_act + mhc_act) / GIB, 2),
            "pipeline_sends_per_step": sends,
            "pipeline_gib_per_step": round(sends * message / GIB, 2),
        })
    step_tokens = seq * cfg.get("global_batch_size", micro * layout.dp)
    flops = 6 * counts.active * step_tokens + 12 * cfg.get("num_layers") * h * seq * step_tokens  # + attention
    compute_s = flops / (layout.world_size * peak_tflops * 1e12 * mfu)
    from .vocabulary import vocabulary

    return {
        "config": cfg.path,
        "world_size": layout.world_size,
        "layout": {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "ep": layout.ep, "etp": layout.etp,
                   "dp": layout.dp, "schedule": layout.schedule, "stages_per_rank": layout.vpp,
                   "layers_per_stage": layout.layers_per_chunk, "microbatches": layout.microbatches},
        "residual_mode": mode,
        "expansion_rate": n,
        "total_parameters": counts.total,
        "active_parameters": counts.active,
        "mhc_parameters": counts.mhc,
        "mhc_parameter_share": counts.mhc / counts.total,
        "vocabulary": vocabulary(cfg, layout.tp),
        "warnings": _warnings(mode, n, counts),
        "per_rank": ranks,
        "max_memory_gib": max(r["memory_gib"] for r in ranks),
        "pipeline_message_mib": round(message / 2**20, 2),
        "bubble_fraction": round(sim.bubble_fraction, 4),
        "estimated_step_seconds": round(compute_s / (1 - sim.bubble_fraction), 2),
        "step_time_assumptions": f"{mfu:.0%} MFU of {peak_tflops:g} TFLOP/s per GPU, no mHC overhead, no comm",
    }
