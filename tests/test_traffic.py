"""The traffic counter and ``mhc-megatron bench traffic``: counted bytes against hand-derived
counts, and the launch structure of the fused sublayer (a benchmark: the tests check what it
counts, not performance goals)."""

import json

import pytest
import torch
import triton
import triton.language as tl

from mhc_megatron.bench.memcount import TrafficCounter
from mhc_megatron.kernels._common import interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="counts memory traffic in Triton's CPU interpreter")


@triton.jit
def _gather_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < 20
    v = tl.load(x_ptr + offs % 8, mask=mask, other=0.0)  # 20 active lanes, 8 distinct addresses
    tl.store(y_ptr + offs, v, mask=mask)


def test_counter_excludes_masked_lanes_and_separates_unique_from_requested():
    x, y = torch.randn(8), torch.zeros(32)
    with TrafficCounter() as counter:
        with counter.phase("p"):
            _gather_kernel[(3,)](x, y, BLOCK=32)  # three programs touch the same addresses
            z = (x + 1.0).view(2, 4).t()  # one aten launch (the views are not launches)
    kernel, add = counter.launches
    assert (kernel.name, kernel.kind, add.name, add.kind) == ("_gather_kernel", "triton", "aten.add", "torch")
    assert kernel.read_requested == 3 * 20 * 4 and kernel.read_unique == 8 * 4
    assert kernel.write_requested == 3 * 20 * 4 and kernel.write_unique == 20 * 4
    assert kernel.args["x_ptr"].read_unique == 32 and kernel.args["y_ptr"].write_unique == 80
    assert (add.read_unique, add.write_unique) == (32, 32)
    assert torch.equal(y[:20], x[torch.arange(20) % 8]) and z.shape == (4, 2)


def test_nothing_is_counted_outside_a_phase_or_while_paused():
    x = torch.randn(8)
    with TrafficCounter() as counter:
        x + 1
        with counter.phase("p"), counter.paused():
            x * 2
    assert counter.launches == []


@pytest.fixture(scope="module")
def report():
    from mhc_megatron.bench.traffic import TrafficConfig, measure

    # one SM: one token split at this width, the same launches at 32 and 64 tokens
    return measure(TrafficConfig(tokens=32, hidden=32, n=4, bias=True, dropout=0.1, recompute=True, block_size=3,
                                 sms=1))


def _kernel(report, phase, name, section=None):
    rows = (report["recompute"] if section else report)["kernels"]
    (row,) = [r for r in rows if r["phase"] == phase and r["name"] == name]
    return row


@pytest.mark.slow
def test_counted_bytes_per_token_equal_the_hand_derived_ones(report):
    """Per token, bf16 streams (2 bytes), fp32 coefficients (4): what each kernel must touch."""
    from mhc_megatron.kernels.post_res import BIAS_BLOCK_T

    n, C, a, f = 4, 32, 2, 4
    expect = {
        ("forward", "_pre_fwd_kernel"): (n * C * a + n * f, C * a),  # x, H_pre -> y
        ("forward", "_post_res_fwd_kernel"): ((n + 1) * C * a + (n + n * n) * f, n * C * a),
        # g_out, x, f, H_post, H_res -> g_x, g_f, g_H_post, g_H_res and a row of bias-gradient
        # partial sums per BIAS_BLOCK_T tokens
        ("backward", "_post_res_bwd_kernel"): (
            (2 * n + 1) * C * a + (n + n * n) * f, (n + 1) * C * a + (n + n * n) * f + C * f / BIAS_BLOCK_T),
        # g_y, x, H_pre and the g_x buffer (accumulated in place) -> g_x, g_H_pre
        ("backward", "_pre_bwd_kernel"): (C * a + 2 * n * C * a + n * f, n * C * a + n * f),
    }
    for (phase, name), (read, write) in expect.items():
        row = _kernel(report, phase, name)
        assert (row["read_unique_per_token"], row["write_unique_per_token"]) == (read, write), name


def test_the_fused_sublayer_launches(report):
    fwd = [r["name"] for r in report["kernels"] if r["phase"] == "forward"]
    bwd = [r["name"] for r in report["kernels"] if r["phase"] == "backward"]
    assert fwd == ["_proj_fwd_kernel", "_finish_fwd_kernel", "_pre_fwd_kernel", "aten.randint", "_post_res_fwd_kernel"]
    assert not [b for b in bwd if b.startswith("aten.add")]  # the x gradient is accumulated in the kernels
    assert report["launches_forward"] + report["launches_backward"] <= 12
    # the projection backward adds into g_x: it reads the buffer as well as v
    proj = _kernel(report, "backward", "_proj_bwd_kernel")
    assert proj["args"]["g_v_ptr"]["read_per_token"] == 4 * 32 * 2


def test_recompute_replays_post_res_once_per_sublayer_but_the_last(report):
    rc = report["recompute"]
    bwd = {r["name"]: r["launches"] for r in rc["kernels"] if r["phase"] == "backward"}
    assert bwd["_post_res_fwd_kernel"] == pytest.approx(2 / 3)  # block of 3: two replays
    assert not {"_proj_fwd_kernel", "_finish_fwd_kernel", "_pre_fwd_kernel"} & set(bwd)
    replay = _kernel(report, "backward", "_post_res_fwd_kernel", section="recompute")
    assert report["recompute_extra_bytes_per_token"] == pytest.approx(
        replay["read_unique_per_token"] + replay["write_unique_per_token"], abs=1.0)


@pytest.mark.slow
def test_cli_json(capsys):
    from mhc_megatron.cli import main

    assert main(["bench", "traffic", "--tokens", "32", "--hidden", "32", "--sms", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("forward_bytes_per_token", "backward_bytes_per_token", "recompute_extra_bytes_per_token",
                "launches_forward", "launches_backward", "kernels"):
        assert key in r
    assert r["recompute_extra_bytes_per_token"] == 0.0
    assert r["forward_bytes_per_token"] >= r["floors_bytes_per_token"]["forward"]
    assert "estimate" in r and "not a measurement" in r["estimate"]["what"]
    assert main(["bench", "traffic", "--tokens", "48"]) == 2
    assert "--tokens must be a positive multiple of 32" in capsys.readouterr().err
    assert main(["bench", "traffic", "--tokens", "32", "--hidden", "16", "--expansion-rate", "2"]) == 2
    assert "use more --tokens or fewer --sms" in capsys.readouterr().err
