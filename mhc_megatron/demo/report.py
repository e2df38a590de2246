"""The demo's outputs: the printed table, results.json, config.json and two PNG plots."""

from __future__ import annotations

import json
import math
import os

from .config import DemoConfig
from .data import VOCAB_SIZE
from .train import ModeResult, config_dict


def overhead(results: dict[str, ModeResult], mode: str) -> float | None:
    """Time per token of ``mode`` relative to the residual baseline of the same run."""
    if "residual" not in results:
        return None
    base = results["residual"].tokens_per_s
    return base / results[mode].tokens_per_s - 1.0


def results_json(results: dict[str, ModeResult]) -> dict:
    out = {}
    for mode, r in results.items():
        entry = r.summary()
        entry["time_overhead_vs_residual"] = overhead(results, mode)
        entry["train_loss_curve"] = r.train_loss
        entry["val_loss_curve"] = r.val_loss
        entry["gains"] = r.gains
        out[mode] = entry
    return out


def format_table(results: dict[str, ModeResult], cfg: DemoConfig, device: str) -> str:
    lines = [
        f"Tiny {'GPT' if cfg.model == 'gpt' else 'HybridModel (*-*-...)'} on Genesis (KJV), {cfg.layers} layers x {cfg.hidden} wide, {cfg.steps} steps of "
        f"{cfg.batch_size}x{cfg.seq_len} bytes, n={cfg.expansion_rate}, peak lr {cfg.lr:g}, device={device}"
        + (f" (preset {cfg.preset})" if cfg.preset != "default" else ""),
        "",
        f"{'mode':<9}{'train loss':>11}{'val loss':>10}{'max |g|':>9}{'comp. gain':>12}"
        f"{'tokens/s':>10}{'overhead':>10}{'spike':>7}{'diverged':>10}",
    ]
    for mode, r in results.items():
        s = r.summary()
        oh = overhead(results, mode)
        oh_text = "-" if oh is None or mode == "residual" else f"{100 * oh:+.1f}%"
        lines.append(
            f"{mode:<9}{s['final_train_loss']:>11.3f}{s['final_val_loss']:>10.3f}{s['max_grad_norm']:>9.2f}"
            f"{s['composite_forward_gain']:>12.4g}{s['tokens_per_s']:>10.0f}{oh_text:>10}"
            f"{s['max_loss_spike']:>7.2f}{diverged_text(r):>10}"
        )
    lines += [
        "",
        "comp. gain: forward Amax gain of the product of all H_res of the trained model (1 = no "
        "amplification); overhead: time per token against residual in this run; spike: largest rise of "
        "the training loss above its lowest value so far (nats); diverged: first step after warm-up "
        f"with a training loss not finite or >= ln {VOCAB_SIZE} = {math.log(VOCAB_SIZE):.2f} (uniform guessing).",
    ]
    lines += divergence_notes(results)
    return "\n".join(lines)


def diverged_text(r: ModeResult) -> str:
    return "-" if r.diverged_at is None else f"step {r.diverged_at}"


def divergence_notes(results: dict[str, ModeResult]) -> list[str]:
    """One line per mode that diverged, and which modes trained through."""
    gone = [m for m, r in results.items() if r.diverged_at is not None]
    if not gone:
        return []
    notes = [""]
    for mode in gone:
        r = results[mode]
        loss = dict(r.train_loss)[r.diverged_at]
        notes.append(f"{mode} diverged at step {r.diverged_at} (training loss {loss:.3g}; composite gain "
                     f"{r.gains.get('composite_forward_gain', float('nan')):.3g})")
    stable = [m for m in results if m not in gone]
    if stable:
        notes.append(f"{', '.join(stable)} trained through all {max(s for s, _ in results[stable[0]].train_loss)} steps")
    return notes


def _plot_losses(results: dict[str, ModeResult], path: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode, r in results.items():
        steps, losses = zip(*r.train_loss)  # non-finite losses are left out by matplotlib
        line, = ax.plot(steps, losses, alpha=0.35, linewidth=0.8)
        vsteps, vlosses = zip(*r.val_loss)
        ax.plot(vsteps, vlosses, "o-", color=line.get_color(), label=f"{mode} (val)")
        if r.diverged_at is not None:
            ax.axvline(r.diverged_at, color=line.get_color(), linestyle="--", linewidth=1,
                       label=f"{mode} diverged (step {r.diverged_at})")
    ax.axhline(math.log(VOCAB_SIZE), color="grey", linewidth=0.8, linestyle=":", label=f"ln {VOCAB_SIZE} (uniform)")
    ax.set_ylim(0, 2 * math.log(VOCAB_SIZE))  # a diverged run's loss would flatten the others
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title("Training (faint) and validation loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_gains(results: dict[str, ModeResult], path: str) -> None:
    import matplotlib.pyplot as plt

    fig, (single, composite) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, r in results.items():
        g = r.gains
        if not g["single_forward_gain"]:
            continue
        x = range(1, len(g["single_forward_gain"]) + 1)
        line, = single.plot(x, g["single_forward_gain"], "o-", label=f"{mode} forward")
        single.plot(x, g["single_backward_gain"], "x--", color=line.get_color(), label=f"{mode} backward")
        composite.plot(x, g["composite_forward_gain_by_depth"], "o-", color=line.get_color(), label=f"{mode} forward")
        composite.plot(x, g["composite_backward_gain_by_depth"], "x--", color=line.get_color(), label=f"{mode} backward")
    single.set_title("Single sublayer H_res: Amax gain")
    composite.set_title("Composite H_res (sublayer 1 to depth): Amax gain")
    for ax in (single, composite):
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("sublayer (attention and MLP each count)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict[str, ModeResult], cfg: DemoConfig, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "results": os.path.join(out_dir, "results.json"),
        "config": os.path.join(out_dir, "config.json"),
        "loss": os.path.join(out_dir, "loss_curves.png"),
        "gains": os.path.join(out_dir, "gains.png"),
    }
    with open(paths["results"], "w") as f:
        json.dump(results_json(results), f, indent=1)
    with open(paths["config"], "w") as f:
        json.dump(config_dict(cfg), f, indent=1)
    _plot_losses(results, paths["loss"])
    _plot_gains(results, paths["gains"])
    return list(paths.values())
