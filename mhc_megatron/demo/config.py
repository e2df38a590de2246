"""The demo's settings (kept free of heavy imports so ``--help`` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DemoConfig:
    modes: tuple[str, ...] = ("residual", "hc", "mhc")
    steps: int = 300
    layers: int = 4
    hidden: int = 64
    heads: int = 4
    seq_len: int = 64
    batch_size: int = 16
    expansion_rate: int = 4
    sinkhorn_iters: int = 20
    res_init_diag: float = 0.0
    lr: float = 3e-3
    warmup: int = 30
    clip_grad: float = 1.0
    eval_every: int = 50
    timing_warmup: int = 10
    seed: int = 0
    device: str = "auto"
    model: str = "gpt"
    preset: str = "default"

    def validate(self) -> None:
        from ..mcore.settings import MHCSettings, expansion_rate_for

        for name in ("steps", "layers", "hidden", "heads", "seq_len", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"--hidden {self.hidden} must be divisible by --heads {self.heads}")
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.model not in ("gpt", "hybrid"):
            raise ValueError(f"--model must be gpt or hybrid, got {self.model!r}")
        if not self.modes:
            raise ValueError("--modes needs at least one of residual, hc, mhc")
        for mode in self.modes:
            MHCSettings(mode=mode, expansion_rate=expansion_rate_for(mode, self.expansion_rate), sinkhorn_iters=self.sinkhorn_iters)

    def resolve_device(self) -> torch.device:
        return resolve_device(self.device)


# --preset stress: 16 layers and a peak learning rate of 0.1 (narrower, so it stays a few minutes on
# two cores), where HC's unconstrained H_res compound over the depth and its loss spikes while mHC
# trains smoothly (found with short runs; measured in docs/demo.md)
PRESETS = {
    "default": {},
    "stress": {"layers": 16, "hidden": 32, "seq_len": 32, "lr": 0.1, "warmup": 20, "steps": 150, "eval_every": 25},
}


def preset_config(preset: str = "default", **given) -> DemoConfig:
    """The preset's settings with the options the user gave (not None) on top."""
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    chosen = {**PRESETS[preset], **{k: v for k, v in given.items() if v is not None}}
    return DemoConfig(preset=preset, **chosen)


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)
