"""Tensor/sequence parallelism and distributed checkpoints against the single-process model
(gloo, several processes on CPU)."""

import pytest
import torch

from mcore_helpers import run_distributed
from parallel_workers import load_and_train, tp_loss_and_grads, train_and_save

pytestmark = pytest.mark.slow


def _compare(ref, got, rtol=1e-4, atol=1e-6):
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert ref["grads"].keys() == got["grads"].keys()
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("mode", ["mhc", "hc"])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_tensor_parallel_matches_single_process(mode, sequence_parallel):
    (ref,) = run_distributed(tp_loss_and_grads, 1, 1, mode, False)
    ranks = run_distributed(tp_loss_and_grads, 2, 2, mode, sequence_parallel)
    for got in ranks:
        _compare(ref, got)
        assert got["replicated"] and all(got["replicated"].values())
    # every coefficient parameter learns (HC's gates only once theta has left zero)
    coeff_grads = {n: g for n, g in ref["grads"].items() if ".coefficients." in n}
    learning = [n for n, g in coeff_grads.items() if mode == "mhc" or not n.endswith("alpha")]
    assert learning and all(coeff_grads[n].abs().sum() > 0 for n in learning)


@pytest.mark.parametrize("save_tp,load_tp", [(2, 1), (1, 2)])
def test_distributed_checkpoint_reshards_and_resumes(tmp_path, save_tp, load_tp):
    saved = run_distributed(train_and_save, save_tp, save_tp, "mhc", str(tmp_path), 3, 3)[0]
    loaded = run_distributed(load_and_train, load_tp, load_tp, "mhc", str(tmp_path), 3, 3)[0]
    assert not torch.allclose(loaded["fresh"], saved["at_save"])  # the load really changed it
    torch.testing.assert_close(loaded["at_load"], saved["at_save"], rtol=1e-5, atol=1e-5)
    assert loaded["after"] == pytest.approx(saved["after"], rel=1e-4)  # same loss curve
