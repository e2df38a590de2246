"""--mhc-log-interval: H_res statistics and gains written through Megatron's writers."""

import argparse

import pytest
import torch

from mcore_helpers import build_gpt, make_batch, tiny_config
from mhc_megatron.mcore import MHCSettings
from mhc_megatron.mcore.diagnostics import capture_h_res, gain_summary
from mhc_megatron.training import mhc_settings_from_args
from mhc_megatron.training.arguments import add_mhc_arguments
from mhc_megatron.training.diagnostics_log import MHCDiagnosticsLog

pytestmark = pytest.mark.usefixtures("megatron_world")


class FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, name, value, step):
        self.scalars.append((name, value, step))


def _model(mode="mhc"):
    return build_gpt(tiny_config(num_layers=3), MHCSettings(mode=mode, expansion_rate=4, res_init_diag=2.0), seed=11)


def test_logged_gains_are_those_of_the_model_on_that_step():
    model = _model()
    tokens, positions, labels = make_batch(seed=4)
    iteration = {"now": 0}
    writer = FakeWriter()
    log = MHCDiagnosticsLog(5, iteration_fn=lambda: iteration["now"], writers_fn=lambda: (writer, None),
                            pp_group_fn=lambda: None, tokens=10**6)
    log.attach([model])
    with torch.no_grad():
        model(tokens, positions, None, labels=labels)  # curr_iteration 0 -> logged as 1: not recorded
        assert not log.recorded
        iteration["now"] = 4  # logged as iteration 5
        with capture_h_res(model) as captured:
            model(tokens, positions, None, labels=labels)
        model(tokens, positions, None, labels=labels)  # a second micro-batch: first one kept
    scalars = log.flush(5)
    want = gain_summary(captured)
    assert scalars["mhc/composite_forward_gain"] == pytest.approx(want["composite_forward_gain"], rel=1e-6)
    assert scalars["mhc/composite_backward_gain"] == pytest.approx(want["composite_backward_gain"], rel=1e-6)
    assert len([k for k in scalars if k.endswith("/forward_gain") and "sublayer_" in k]) == 6
    assert all(scalars[f"mhc/sublayer_{i}/col_sum_err"] < 1e-3 for i in range(6))  # Sinkhorn converged
    assert {step for _, _, step in writer.scalars} == {5} and len(writer.scalars) == len(scalars)
    assert not log.recorded and log.flush(10) is None


def test_hc_gains_are_logged_too():
    model = _model("hc")
    log = MHCDiagnosticsLog(1, iteration_fn=lambda: 0, writers_fn=lambda: (None, None), pp_group_fn=lambda: None)
    log.attach([model])
    tokens, positions, labels = make_batch(seed=5)
    with torch.no_grad():
        model(tokens, positions, None, labels=labels)
    assert log.flush(1)["mhc/composite_forward_gain"] > 0


def test_training_log_wrapper_runs_megatron_first_then_logs_on_multiples():
    calls = []
    log = MHCDiagnosticsLog(2, iteration_fn=lambda: 0, writers_fn=lambda: (None, None), pp_group_fn=lambda: None)
    log.flush = lambda it: calls.append(("flush", it))
    wrapped = log.wrap_training_log(lambda *a, **k: calls.append(("megatron", a[3])) or "flag")
    assert wrapped({}, {}, 1e-3, 3, 1.0, False, 0, 1.0, None, 0, None) == "flag"
    wrapped({}, {}, 1e-3, 4, 1.0, False, 0, 1.0, None, 0, None)
    assert calls == [("megatron", 3), ("megatron", 4), ("flush", 4)]


@pytest.mark.parametrize(
    "argv,match",
    [(["--residual-mode", "mhc", "--mhc-log-interval", "-1"], ">= 0"),
     (["--mhc-log-interval", "10"], "needs --residual-mode hc or mhc")],
)
def test_log_interval_flag_is_checked(argv, match):
    args = add_mhc_arguments(argparse.ArgumentParser()).parse_args(argv)
    with pytest.raises(ValueError, match=match):
        mhc_settings_from_args(args)


def test_sinkhorn_columns_off_are_warned_once_per_crossing():
    from mhc_megatron.ops import sinkhorn_knopp

    messages = []
    log = MHCDiagnosticsLog(1, iteration_fn=lambda: 0, writers_fn=lambda: (None, None), pp_group_fn=lambda: None,
                            warn_fn=messages.append)
    log.sinkhorn = True
    converged = sinkhorn_knopp(torch.randn(8, 4, 4), iters=20)
    # logits of 0 and 24: 20 iterations leave a column sum 0.79 from 1 (50 converge)
    spread = 24.0 * torch.tensor([[1.0, 1, 0, 1], [1, 1, 0, 1], [0, 0, 1, 0], [0, 0, 1, 0]])
    off = sinkhorn_knopp(spread.expand(8, 4, 4), iters=20)
    assert (off.sum(-2) - 1).abs().max() > 0.1  # the premise: 20 iterations do not converge here
    for step, layers in enumerate([{0: converged, 1: off}, {0: converged, 1: off}, {0: converged, 1: converged},
                                   {0: off, 1: off}], start=1):
        log.recorded = dict(layers)
        log.flush(step)
    assert [m.split(":")[2] for m in messages] == [" iteration 1", " iteration 4", " iteration 4"]
    assert "mHC sublayer 1 is" in messages[0] and "raise --mhc-sinkhorn-iters" in messages[0]
    assert "its backward gain is" in messages[0]


def test_hc_matrices_are_not_warned_about():
    messages = []
    log = MHCDiagnosticsLog(1, iteration_fn=lambda: 0, writers_fn=lambda: (None, None), pp_group_fn=lambda: None,
                            warn_fn=messages.append)
    log.recorded = {0: torch.rand(8, 4, 4) * 3}  # HC: unconstrained, columns anything
    log.flush(1)
    assert messages == []
