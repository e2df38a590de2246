"""When a run has diverged, read from its training loss alone (so the report can say so)."""

from __future__ import annotations

import math


def diverged_at(train_loss: list[tuple[int, float]], vocab_size: int, warmup: int) -> int | None:
    """The first step after the warm-up whose training loss is not finite or no better than
    guessing bytes uniformly (ln vocab_size): the run has lost what it learned. None: it did not."""
    uniform = math.log(vocab_size)
    for step, loss in train_loss:
        if step > warmup and not (math.isfinite(loss) and loss < uniform):
            return step
    return None


def max_spike(train_loss: list[tuple[int, float]]) -> float:
    """The largest rise of the training loss above its lowest value so far (nats; inf once it is
    not finite): a loss spike that the run may or may not recover from."""
    best, spike = math.inf, 0.0
    for _, loss in train_loss:
        if not math.isfinite(loss):
            return math.inf
        spike = max(spike, loss - best)
        best = min(best, loss)
    return spike
