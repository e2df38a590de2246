"""``--mhc-lr-step-decay``: megatron-core's real ``OptimizerParamScheduler`` with hook ``lr-step-decay``
active gives Megatron's warm-up, then --lr times the factor of the last boundary passed, never below
--min-lr; the expected numbers are computed here, not by the code under test."""

import argparse
import re
import types

import pytest
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mhc_megatron import hooks
from mhc_megatron.training.lr_schedule import check_step_decay_args, parse_step_decay

MAX_LR, INIT_LR, WARMUP, DECAY = 1e-3, 1e-4, 10, 100
STEPS = parse_step_decay("0.8:0.316,0.9:0.1")


def scheduler(min_lr=1e-5, warmup=WARMUP):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=MAX_LR)
    return OptimizerParamScheduler(optimizer, init_lr=INIT_LR, max_lr=MAX_LR, min_lr=min_lr, lr_warmup_steps=warmup,
                                   lr_decay_steps=DECAY, lr_decay_style="constant", start_wd=0.0, end_wd=0.0,
                                   wd_incr_steps=DECAY, wd_incr_style="constant")


def lr_at(sched, step: int) -> float:
    sched.step(step - sched.num_steps)
    return sched.optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("step,expected", [
    (0, INIT_LR), (5, INIT_LR + (MAX_LR - INIT_LR) * 5 / WARMUP), (WARMUP, MAX_LR),  # Megatron's linear warm-up
    (11, MAX_LR), (79, MAX_LR),  # constant until 80% of the decay steps
    (80, MAX_LR * 0.316), (89, MAX_LR * 0.316),
    (90, MAX_LR * 0.1), (100, MAX_LR * 0.1), (150, MAX_LR * 0.1),  # the last factor stays past the decay steps
])
def test_step_decay_learning_rate(step, expected):
    with hooks.active("lr-step-decay", context=STEPS):
        assert lr_at(scheduler(), step) == pytest.approx(expected, rel=1e-12)


def test_min_lr_is_the_floor():
    with hooks.active("lr-step-decay", context=STEPS):
        sched = scheduler(min_lr=2e-4)  # above 0.1 x --lr, below 0.316 x --lr
        assert lr_at(sched, 85) == pytest.approx(MAX_LR * 0.316, rel=1e-12)
        assert lr_at(sched, 95) == pytest.approx(2e-4, rel=1e-12)


def test_without_the_hook_megatron_stays_constant():
    assert lr_at(scheduler(), 95) == MAX_LR


def test_parse_refuses_what_is_not_a_step_list():
    assert STEPS == ((0.8, 0.316), (0.9, 0.1))
    for text, says in (("0.8", "FRACTION:FACTOR"), ("1.5:0.1", "(0, 1]"), ("0.9:0.1,0.8:0.316", "increasing order")):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(says)):
            parse_step_decay(text)


def test_check_refuses_a_decaying_style_and_accepts_constant():
    args = types.SimpleNamespace(mhc_lr_step_decay=STEPS, lr_decay_style="cosine")
    with pytest.raises(ValueError, match=r"^--mhc-lr-step-decay 0\.8:0\.316,0\.9:0\.1 .*--lr-decay-style cosine.*"
                                         r"add --lr-decay-style constant"):
        check_step_decay_args(args)
    check_step_decay_args(types.SimpleNamespace(mhc_lr_step_decay=STEPS, lr_decay_style="constant"))
    check_step_decay_args(types.SimpleNamespace(mhc_lr_step_decay=None, lr_decay_style="cosine"))
