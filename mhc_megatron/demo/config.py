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

    def validate(self) -> None:
        from ..mcore.settings import MHCSettings, expansion_rate_for

        for name in ("steps", "layers", "hidden", "heads", "seq_len", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"--hidden {self.hidden} must be divisible by --heads {self.heads}")
        if self.model not in ("gpt", "hybrid"):
            raise ValueError(f"--model must be gpt or hybrid, got {self.model!r}")
        if not self.modes:
            raise ValueError("--modes needs at least one of residual, hc, mhc")
        for mode in self.modes:
            MHCSettings(mode=mode, expansion_rate=expansion_rate_for(mode, self.expansion_rate), sinkhorn_iters=self.sinkhorn_iters)

    def resolve_device(self) -> torch.device:
        return resolve_device(self.device)


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)
