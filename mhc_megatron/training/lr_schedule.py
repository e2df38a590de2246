"""``--mhc-lr-step-decay``: a step learning-rate schedule, which megatron-core does not have.

``--mhc-lr-step-decay 0.8:0.316,0.9:0.1`` keeps the learning rate at ``--lr`` after the warm-up
and multiplies it by 0.316 from 80% of the decay steps (``--lr-decay-iters``, default
``--train-iters``) and by 0.1 from 90%; each factor is relative to ``--lr``, and the rate never
goes below ``--min-lr``. The warm-up is Megatron's. It rides on ``--lr-decay-style constant``
(the scheduler's state in checkpoints stays Megatron's), through hook ``lr-step-decay`` on
``OptimizerParamScheduler.get_lr``.
"""

from __future__ import annotations

import argparse

FLAG = "--mhc-lr-step-decay"


def parse_step_decay(text: str) -> tuple[tuple[float, float], ...]:
    """``"0.8:0.316,0.9:0.1"`` -> ((0.8, 0.316), (0.9, 0.1)); argparse type of the flag."""
    steps = []
    for part in text.split(","):
        try:
            at, factor = (float(x) for x in part.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected FRACTION:FACTOR pairs separated by commas (e.g. 0.8:0.316,0.9:0.1), got {part!r}") from None
        if not 0 < at <= 1 or not 0 < factor <= 1:
            raise argparse.ArgumentTypeError(
                f"{part!r}: the fraction of the decay steps and the factor must both lie in (0, 1]")
        if steps and (at <= steps[-1][0] or factor > steps[-1][1]):
            raise argparse.ArgumentTypeError(
                f"{part!r}: list the boundaries in increasing order, each factor at most the one before")
        steps.append((at, factor))
    return tuple(steps)


def format_step_decay(steps) -> str:
    """((0.8, 0.316), (0.9, 0.1)) -> ``"0.8:0.316,0.9:0.1"`` (the flag's value as given)."""
    return ",".join(f"{at:g}:{factor:g}" for at, factor in steps)


def check_step_decay_args(args) -> None:
    """The command line's refusals for the step schedule (ValueError)."""
    steps = getattr(args, "mhc_lr_step_decay", None)
    if steps and args.lr_decay_style != "constant":
        raise ValueError(
            f"{FLAG} {format_step_decay(steps)} replaces the decay of --lr-decay-style, got --lr-decay-style {args.lr_decay_style} "
            "(Megatron's default is linear): add --lr-decay-style constant")


def step_factor(steps, num_steps: int, decay_steps: int) -> float:
    """The factor of ``--lr`` at ``num_steps`` (the factor of the last boundary passed)."""
    factor = 1.0
    for at, f in steps:
        if num_steps >= at * decay_steps:
            factor = f
    return factor


def step_decay_get_lr(original, steps):
    """Hook ``lr-step-decay``: Megatron's warm-up, then ``max(min_lr, max_lr x factor)``."""

    def get_lr(self, param_group: dict) -> float:
        if self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps:
            return original(self, param_group)
        max_lr = param_group.get("max_lr", self.max_lr)
        min_lr = param_group.get("min_lr", self.min_lr)
        return max(min_lr, max_lr * step_factor(steps, self.num_steps, self.lr_decay_steps))

    return get_lr
