"""``mhc-megatron profile``: the time mHC adds to a training step, and where it goes.

The residual model and the mHC model (same architecture, seed and batches) train side by side,
one step each in turn, so both see the same machine state; after the warm-up steps every step
is timed (device synchronised). A short ``torch.profiler`` window per mode then splits the mHC
step into:

- mHC forward: the ``mhc.*`` ranges (stream expansion, coefficients + pre-mix, post+residual,
  contraction) with everything inside them;
- mHC backward: the autograd nodes created inside those ranges (matched by the profiler's
  forward/backward sequence numbers), including recomputation;
- communication: collectives and point-to-point ops (none in one process);
- rest: the step time minus the above (attention, MLP, embedding, loss, optimizer).

On a GPU the split uses device (kernel) time, on the CPU operator time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

COMM_MARKERS = ("nccl", "gloo", "c10d", "all_reduce", "allreduce", "all_gather", "allgather",
                "reduce_scatter", "broadcast", "send", "recv", "alltoall", "all_to_all")


@dataclass(frozen=True)
class ProfileConfig:
    modes: tuple[str, ...] = ("residual", "mhc")
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    seq_len: int = 128
    batch_size: int = 8
    expansion_rate: int = 4
    steps: int = 10
    warmup: int = 3
    profile_steps: int = 2
    recompute: bool = False
    device: str = "auto"
    seed: int = 0
    # further TransformerConfig fields (megatron-core names): the MoE / multi-latent attention
    # settings that ``--config`` takes from a launch (mhc_megatron.bench.profile_launch)
    transformer: dict = field(default_factory=dict)
    hybrid_layer_pattern: str | None = None  # a HybridModel of these layers (*, -, E) instead of the GPT

    def validate(self) -> None:
        from ..mcore.settings import RESIDUAL_MODES

        for name in ("layers", "hidden", "heads", "seq_len", "batch_size", "steps", "profile_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")
        if self.hidden % self.heads and not self.transformer.get("multi_latent_attention"):
            raise ValueError(f"--hidden {self.hidden} must be divisible by --heads {self.heads}")
        if "residual" not in self.modes or len(self.modes) < 2:
            raise ValueError(f"--modes needs 'residual' (the baseline) and hc and/or mhc, got {','.join(self.modes)}")
        bad = [m for m in self.modes if m not in RESIDUAL_MODES]
        if bad:
            raise ValueError(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(RESIDUAL_MODES)}")

    def resolve_device(self) -> torch.device:
        from ..demo.config import resolve_device

        return resolve_device(self.device)


@dataclass
class ModeProfile:
    mode: str
    step_seconds: list[float] = field(default_factory=list)
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds per profiled step
    ranges_per_step: dict[str, float] = field(default_factory=dict)  # mhc.* ranges entered in forward
    tokens_per_step: int = 0
    model: dict = field(default_factory=dict)  # what was built: parameters, MoE and MLA layers

    @property
    def median(self) -> float:
        return statistics.median(self.step_seconds)

    def summary(self, baseline: float | None) -> dict:
        return {
            "mode": self.mode,
            "step_ms_median": round(1e3 * self.median, 3),
            "step_ms_mean": round(1e3 * statistics.fmean(self.step_seconds), 3),
            "tokens_per_s": round(self.tokens_per_step / self.median, 1),
            "overhead_percent": None if baseline is None else round(100 * (self.median / baseline - 1), 2),
            "breakdown_ms": {k: round(1e3 * v, 3) for k, v in self.breakdown.items()},
            "ranges_per_step": self.ranges_per_step,
            "model": self.model,
        }


class _Trainer:
    """One model, its optimizer and its batches."""

    def __init__(self, mode: str, cfg: ProfileConfig, device: torch.device):
        from ..demo.data import VOCAB_SIZE, ByteBatches
        from ..demo.model import build_demo_model
        from ..mcore import MHCSettings
        from ..mcore.settings import expansion_rate_for

        settings = MHCSettings(mode=mode, expansion_rate=expansion_rate_for(mode, cfg.expansion_rate), recompute=cfg.recompute and mode != "residual")
        self.model = build_demo_model(settings, layers=cfg.layers, hidden=cfg.hidden, heads=cfg.heads,
                                      seq_len=cfg.seq_len, vocab_size=VOCAB_SIZE, seed=cfg.seed, device=device,
                                      transformer=cfg.transformer, model="hybrid" if cfg.hybrid_layer_pattern else "gpt",
                                      hybrid_layer_pattern=cfg.hybrid_layer_pattern)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.data = ByteBatches(cfg.seq_len, cfg.batch_size, cfg.seed)
        self.device = device
        self.result = ModeProfile(mode, tokens_per_step=cfg.seq_len * cfg.batch_size, model=describe_model(self.model))

    def step(self) -> None:
        tokens, labels = (t.to(self.device) for t in self.data.next_train())
        positions = torch.arange(tokens.shape[1], device=self.device).expand_as(tokens)
        loss = self.model(tokens, positions, None, labels=labels).float().mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def timed_step(self) -> float:
        _sync(self.device)
        start = time.perf_counter()
        self.step()
        _sync(self.device)
        return time.perf_counter() - start


def describe_model(model) -> dict:
    """What a built model holds, counted from its modules: parameters, MoE layers and their
    experts (routed, and whether a shared expert is there), multi-latent attention layers."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.multi_latent_attention import MultiLatentAttention

    moe = [m for m in model.modules() if isinstance(m, MoELayer)]
    mla = [m for m in model.modules() if isinstance(m, MultiLatentAttention)]
    return {
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": len(model.decoder.layers),
        "moe_layers": len(moe),
        "experts_per_moe_layer": sorted({len(m.experts.local_experts) if hasattr(m.experts, "local_experts")
                                         else m.experts.num_local_experts for m in moe}),
        "shared_experts": sum(getattr(m, "shared_experts", None) is not None for m in moe),
        "routed_expert_parameters": sum(p.numel() for m in moe for p in m.experts.parameters()),
        "mla_layers": len(mla),
        "mla_parameters": sum(p.numel() for m in mla for p in m.parameters()),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _event_time(event, on_gpu: bool) -> float:
    """Inclusive time of a profiler event in seconds."""
    return (event.device_time_total if on_gpu else event.cpu_time_total) / 1e6


def _inside_backward(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("autograd::engine::evaluate_function"):
            return True
        parent = parent.cpu_parent
    return False


def split_profile(events, profiled_seconds: float, step_seconds: float, on_gpu: bool) -> dict[str, float]:
    """Seconds per step in mHC forward / mHC backward / communication / rest.

    The profiled window runs slower than an unprofiled step (profiler overhead), so each part is
    taken as its share of the window's time and scaled to the measured step time. Nested events
    are counted once: ranges re-entered while a backward node recomputes belong to the backward.
    """
    from ..mcore.profiling import REGION_PREFIX

    ranges = [e for e in events if e.name.startswith(REGION_PREFIX) and not _inside_backward(e)]
    fwd = sum(_event_time(e, on_gpu) for e in ranges)
    inside = set()  # sequence numbers of the ops run inside the ranges: their backward nodes share them
    stack = [child for r in ranges for child in r.cpu_children]
    while stack:
        e = stack.pop()
        if e.sequence_nr >= 0:
            inside.add(e.sequence_nr)
        stack.extend(e.cpu_children)
    bwd = sum(_event_time(e, on_gpu) for e in events
              if e.name.startswith("autograd::engine::evaluate_function") and e.sequence_nr in inside
              and not _inside_backward(e))
    comm = sum(_event_time(e, on_gpu) for e in events
               if any(m in e.name.lower() for m in COMM_MARKERS) and e.cpu_parent is None)
    if on_gpu:  # device time of the window: all kernels
        window = max(sum(_event_time(e, True) for e in events if e.cpu_parent is None), 1e-12)
    else:
        window = max(profiled_seconds, 1e-12)
    parts = {"mhc_forward": fwd, "mhc_backward": bwd, "communication": comm}
    per_step = {k: step_seconds * min(1.0, v / window) for k, v in parts.items()}
    per_step["rest"] = max(0.0, step_seconds - sum(per_step.values()))
    return per_step


def count_ranges(events, steps: int) -> dict[str, float]:
    """How often each ``mhc.*`` range was entered in the forward passes, per step (the split's
    forward share is the time inside exactly these events)."""
    from ..mcore.profiling import REGION_PREFIX

    counts: dict[str, float] = {}
    for e in events:
        if e.name.startswith(REGION_PREFIX) and not _inside_backward(e):
            counts[e.name] = counts.get(e.name, 0) + 1
    return {k: v / steps for k, v in sorted(counts.items())}


def run_profile(cfg: ProfileConfig, out_dir: str | None = None, progress=None) -> dict:
    from ..demo.model import init_single_process

    cfg.validate()
    device = cfg.resolve_device()
    init_single_process(device)
    if device.type == "cpu" and any(cfg.transformer.get(k) for k in ("num_moe_experts", "multi_latent_attention")):
        # the MoE router and MLA's rotary embedding put tensors on torch.cuda.current_device()
        from .. import hooks

        with hooks.active("cpu-model-device"):
            return _run_profile(cfg, device, out_dir, progress)
    return _run_profile(cfg, device, out_dir, progress)


def _run_profile(cfg: ProfileConfig, device: torch.device, out_dir: str | None, progress) -> dict:
    from ..mcore.profiling import profiling_regions

    trainers = [_Trainer(mode, cfg, device) for mode in cfg.modes]
    for i in range(cfg.warmup + cfg.steps):  # alternate: one step of each mode in turn
        for t in trainers:
            elapsed = t.timed_step()
            if i >= cfg.warmup:
                t.result.step_seconds.append(elapsed)
        if progress is not None:
            progress.update(1)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    traces = {}
    for t in trainers:
        with profiling_regions(), torch.profiler.profile(activities=activities) as prof:
            _sync(device)
            start = time.perf_counter()
            for _ in range(cfg.profile_steps):
                t.step()
            _sync(device)
            window = time.perf_counter() - start
        t.result.breakdown = split_profile(prof.events(), window, t.result.median, device.type == "cuda")
        t.result.ranges_per_step = count_ranges(prof.events(), cfg.profile_steps)
        if out_dir:
            import os

            os.makedirs(out_dir, exist_ok=True)
            traces[t.result.mode] = os.path.join(out_dir, f"trace_{t.result.mode}.json")
            prof.export_chrome_trace(traces[t.result.mode])
    baseline = trainers[0].result.median if trainers[0].result.mode == "residual" else None
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "results": [t.result.summary(None if t is trainers[0] else baseline) for t in trainers],
        "traces": traces,
    }
    if out_dir:
        report["plot"] = _plot(report, out_dir)
    return report


def _plot(report: dict, out_dir: str) -> str:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = ("mhc_forward", "mhc_backward", "communication", "rest")
    colours = ("#c44e52", "#dd8452", "#8172b3", "#4c72b0")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    modes = [r["mode"] for r in report["results"]]
    for i, r in enumerate(report["results"]):
        left = 0.0
        for part, colour in zip(parts, colours):
            width = r["breakdown_ms"][part]
            ax.barh(i, width, left=left, color=colour, label=part.replace("_", " ") if i == 0 else None)
            left += width
        note = "" if r["overhead_percent"] is None else f"  {r['overhead_percent']:+.1f}%"
        ax.text(left, i, f" {r['step_ms_median']:.1f} ms{note}", va="center", fontsize=8)
    ax.set_xlim(0, 1.4 * max(r["step_ms_median"] for r in report["results"]))
    ax.set_yticks(range(len(modes)), modes)
    ax.set_xlabel("time per training step (ms)")
    ax.set_title(f"mHC overhead on {report['device']}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = os.path.join(out_dir, "profile.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
