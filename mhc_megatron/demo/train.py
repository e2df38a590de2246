"""Train the demo model once per residual mode and collect what the report shows."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..mcore import MHCSettings
from ..mcore.settings import expansion_rate_for
from ..mcore.diagnostics import capture_h_res, gain_summary
from .config import DemoConfig
from .data import VOCAB_SIZE, ByteBatches
from .divergence import diverged_at, max_spike
from .model import build_demo_model, init_single_process


@dataclass
class ModeResult:
    mode: str
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    timed_tokens: int = 0
    gains: dict = field(default_factory=dict)
    parameters: int = 0
    diverged_at: int | None = None  # first step the loss was not finite or >= ln(vocab) after warm-up
    max_spike: float = 0.0  # largest rise of the training loss above its lowest value so far

    @property
    def tokens_per_s(self) -> float:
        return self.timed_tokens / self.seconds if self.seconds else float("nan")

    def summary(self) -> dict:
        return {
            "final_train_loss": self.train_loss[-1][1],
            "final_val_loss": self.val_loss[-1][1],
            "max_grad_norm": max(self.grad_norms),
            "composite_forward_gain": self.gains["composite_forward_gain"],
            "composite_backward_gain": self.gains["composite_backward_gain"],
            "tokens_per_s": self.tokens_per_s,
            "parameters": self.parameters,
            "diverged_at": self.diverged_at,
            "max_loss_spike": self.max_spike,
        }


def _lr(step: int, cfg: DemoConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _loss(model, tokens, labels) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, positions, None, labels=labels).float().mean()


@torch.no_grad()
def _evaluate(model, data: ByteBatches, device) -> float:
    model.eval()
    losses = [_loss(model, t.to(device), l.to(device)).item() for t, l in data.val_batches]
    model.train()
    return sum(losses) / len(losses)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_mode(mode: str, cfg: DemoConfig, device: torch.device, progress=None) -> ModeResult:
    settings = MHCSettings(
        mode=mode,
        expansion_rate=expansion_rate_for(mode, cfg.expansion_rate),
        sinkhorn_iters=cfg.sinkhorn_iters,
        res_init_diag=cfg.res_init_diag,
    )
    model = build_demo_model(
        settings, layers=cfg.layers, hidden=cfg.hidden, heads=cfg.heads, seq_len=cfg.seq_len,
        vocab_size=VOCAB_SIZE, seed=cfg.seed, device=device, model=cfg.model,
    )
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    data = ByteBatches(cfg.seq_len, cfg.batch_size, cfg.seed)
    result = ModeResult(mode, parameters=sum(p.numel() for p in model.parameters()))
    tokens_per_step = cfg.seq_len * cfg.batch_size
    for step in range(cfg.steps):
        timed = step >= cfg.timing_warmup  # the first steps warm up allocators and caches
        if timed:
            _sync(device)
            start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        tokens, labels = (t.to(device) for t in data.next_train())
        loss = _loss(model, tokens, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        result.grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)))
        opt.step()
        if timed:
            _sync(device)
            result.seconds += time.perf_counter() - start
            result.timed_tokens += tokens_per_step
        result.train_loss.append((step + 1, loss.item()))
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            result.val_loss.append((step + 1, _evaluate(model, data, device)))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(mode=mode, loss=f"{loss.item():.3f}")
        if not math.isfinite(loss.item()):  # nothing left to learn from NaN weights
            if progress is not None:
                progress.update(cfg.steps - step - 1)
            break
    result.diverged_at = diverged_at(result.train_loss, VOCAB_SIZE, cfg.warmup)
    result.max_spike = max_spike(result.train_loss)
    if not result.val_loss or result.val_loss[-1][0] != result.train_loss[-1][0]:
        result.val_loss.append((result.train_loss[-1][0], _evaluate(model, data, device)))
    tokens, labels = (t.to(device) for t in data.val_batches[0])
    with torch.no_grad(), capture_h_res(model) as captured:
        _loss(model, tokens, labels)
    result.gains = gain_summary(captured)
    return result


def run_demo(cfg: DemoConfig, show_progress: bool = True) -> dict[str, ModeResult]:
    from tqdm import tqdm

    cfg.validate()
    device = cfg.resolve_device()
    init_single_process(device)
    results = {}
    with tqdm(total=cfg.steps * len(cfg.modes), disable=not show_progress, unit="step", dynamic_ncols=True) as bar:
        for mode in cfg.modes:
            results[mode] = train_mode(mode, cfg, device, bar)
    return results


def config_dict(cfg: DemoConfig) -> dict:
    return asdict(cfg)
