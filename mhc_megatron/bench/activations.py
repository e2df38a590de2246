"""Activation bytes kept for backward, measured: residual vs mHC vs mHC + recompute.

Counts the distinct storages autograd saves during one forward pass (parameters excluded) with
:class:`SavedTensorBytes` (``torch.autograd.graph.saved_tensors_hooks``), per token, for the demo model and a 27B-like layer
shape (C = 2560, n = 4). Runs on CPU; on a GPU it also reports the peak allocated memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SHAPES = {
    # name: (layers, hidden, heads, seq, batch)
    "demo": (4, 64, 4, 64, 16),
    "27b-layer": (1, 2560, 32, 16, 1),
}


@dataclass
class ActivationRecord:
    shape: str
    variant: str
    backend: str
    bytes_per_token: float
    planned_extra_per_token: float | None
    peak_allocated_mib: float | None


class SavedTensorBytes:
    """Within ``with``, the bytes autograd saves for backward: each distinct storage counted once
    (a view shares its base's storage), the storages of ``exclude`` (the parameters) not at all:
    ``with SavedTensorBytes(exclude=model.parameters()) as saved: loss = model(batch)``, then
    ``saved.nbytes``."""

    def __init__(self, exclude=()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[int, int] = {}  # data pointer -> bytes
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._excluded:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def nbytes(self) -> int:
        return sum(self._storages.values())

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def saved_bytes(model, tokens, labels) -> int:
    """Bytes autograd keeps for backward in one forward of the demo model (parameters excluded)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    with SavedTensorBytes(exclude=model.parameters()) as saved:
        model(tokens, positions, None, labels=labels)
    return saved.nbytes


def measure(shape: str, backend: str, device: str = "cpu", n: int = 4) -> list[ActivationRecord]:
    from ..demo.model import build_demo_model, init_single_process
    from ..mcore import MHCSettings
    from ..recompute_plan import resolve_block_size, stored_bytes_per_token

    layers, hidden, heads, seq, batch = SHAPES[shape]
    dev = torch.device(device)
    init_single_process(dev)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (batch, seq + 1), generator=gen).to(dev)
    tokens, labels = data[:, :-1], data[:, 1:]
    count = batch * seq
    variants = {
        "residual": MHCSettings(),
        "mhc": MHCSettings(mode="mhc", expansion_rate=n, backend=backend),
        "mhc+recompute": MHCSettings(mode="mhc", expansion_rate=n, backend=backend, recompute=True),
    }
    records = []
    base = None
    for name, settings in variants.items():
        model = build_demo_model(settings, layers=layers, hidden=hidden, heads=heads, seq_len=seq,
                                 vocab_size=256, seed=0, device=dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        nbytes = saved_bytes(model, tokens, labels)
        peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
        base = nbytes if base is None else base
        planned = None
        if settings.enabled:
            block = resolve_block_size(settings.recompute_block_size, 2 * layers, n) if settings.recompute else None
            act = 4  # fp32 activations on these models
            planned = stored_bytes_per_token(2 * layers, hidden, n, act, block, first_stage=True)
        records.append(ActivationRecord(shape, name, backend if settings.enabled else "-", nbytes / count,
                                        planned, peak))
        del model
    return records


def format_table(records: list[ActivationRecord]) -> str:
    lines = [f"{'shape':<11}{'variant':<15}{'backend':<10}{'saved B/token':>14}{'mHC extra':>11}"
             f"{'planned':>10}{'peak MiB':>10}"]
    base = {r.shape: r.bytes_per_token for r in records if r.variant == "residual"}
    for r in records:
        extra = r.bytes_per_token - base[r.shape] if r.variant != "residual" else 0.0
        planned = f"{r.planned_extra_per_token:.0f}" if r.planned_extra_per_token is not None else "-"
        peak = f"{r.peak_allocated_mib:.0f}" if r.peak_allocated_mib is not None else "-"
        lines.append(f"{r.shape:<11}{r.variant:<15}{r.backend:<10}{r.bytes_per_token:>14.0f}{extra:>11.0f}"
                     f"{planned:>10}{peak:>10}")
    return "\n".join(lines)
