"""The upstream-numerics options against upstream Megatron-LM's formulas.

The references (:mod:`upstream_reference`, test code) transcribe upstream's ``HyperConnectionModule``
maths on upstream's own parameter layout: a ``mapping_proj`` weight ``[n*n + 2n, nC]``, one bias,
three scalar gates. They share no code with the product. Float64 throughout; the tolerance is
stated per test.
"""

import argparse
import math

import pytest
import torch

from mhc_megatron import ops
from mhc_megatron.mcore import MHCResidual, MHCSettings, MHCSublayerOutput
from mhc_megatron.training import mhc_settings_from_args
from mhc_megatron.training.arguments import add_mhc_arguments
from upstream_reference import EPS, upstream_mappings, upstream_sinkhorn

UPSTREAM_EPS = EPS  # upstream's SinkhornKnopp.eps and HyperConnectionModule.norm_eps


def upstream_inputs(n=4, C=8, s=5, b=3, spread=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)  # fixed: the "differs" thresholds below hold for these
    m = n * n + 2 * n
    x = torch.randn(s, b, n * C, dtype=torch.float64, generator=g)
    weight = torch.randn(m, n * C, dtype=torch.float64, generator=g) * spread / math.sqrt(n * C)
    bias = torch.randn(m, dtype=torch.float64, generator=g)
    gates = [torch.rand(1, dtype=torch.float64, generator=g) + 0.5 for _ in range(3)]
    return x, weight, bias, gates


def ours_from_upstream(x, weight, bias, gates, n, **options):
    return ops.mhc_coefficients(
        x.unflatten(-1, (n, -1)), weight.t(), bias, torch.cat(gates), backend="reference", **options
    )


UPSTREAM = dict(sinkhorn_order="rows-first", eps_placement="outside")


@pytest.mark.parametrize("iters", [1, 5, 20])
def test_upstream_options_reproduce_upstream_coefficients(iters):
    """Tolerance 1e-13: float64 rounding of the same operations in a different association."""
    n = 4
    x, weight, bias, gates = upstream_inputs(n=n)
    ref = upstream_mappings(x, weight, bias, *gates, n, iters)
    got = ours_from_upstream(x, weight, bias, gates, n, iters=iters, eps=UPSTREAM_EPS, **UPSTREAM)
    for name, a, r in zip(("H_pre", "H_post", "H_res"), got, ref):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-13, msg=name)
    # and our default numerics are measurably different from upstream's at these logits
    ours = ours_from_upstream(x, weight, bias, gates, n, iters=iters, eps=UPSTREAM_EPS)
    assert (ours[2] - ref[2]).abs().max() > 1e-6


def test_each_option_is_one_of_the_two_differences():
    """rows-first alone fixes H_res; eps outside alone fixes H_pre/H_post (at a small rms)."""
    n = 4
    x, weight, bias, gates = upstream_inputs(n=n)
    x = x * 1e-4  # rms ~ 1e-4: where eps inside/outside the sqrt differs visibly
    ref = upstream_mappings(x, weight, bias, *gates, n, 20)
    rows = ours_from_upstream(x, weight, bias, gates, n, iters=20, eps=UPSTREAM_EPS, sinkhorn_order="rows-first")
    outside = ours_from_upstream(x, weight, bias, gates, n, iters=20, eps=UPSTREAM_EPS, eps_placement="outside")
    assert (rows[0] - ref[0]).abs().max() > 1e-8 and (outside[0] - ref[0]).abs().max() < 1e-13
    assert (outside[2] - ref[2]).abs().max() > 1e-8


def test_rows_first_keeps_upstreams_clamp():
    """A column 80 below the others: its sum stays under 1e-6 for the first iterations, where
    upstream clamps it (the column grows 1e6-fold per iteration instead of being normalised);
    rows-first does the same (1e-15 absolute), cols-first normalises it at once."""
    logits = torch.randn(16, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logits[..., :, 0] -= 80.0
    ref = upstream_sinkhorn(logits, 3)
    torch.testing.assert_close(ops.sinkhorn_knopp(logits, 3, order="rows-first"), ref, rtol=0, atol=1e-15)
    assert ref[..., :, 0].sum(-1).max() < 1e-6  # clamped, not normalised
    assert ops.sinkhorn_knopp(logits, 3)[..., :, 0].sum(-1).min() > 0.5  # normalised (near 1)


def test_rows_first_backward_matches_autograd_of_upstream_loop():
    """Our recomputing backward vs autograd through the transcribed loop (1e-12)."""
    logits = (3 * torch.randn(6, 4, 4, dtype=torch.float64)).requires_grad_()
    ref_in = logits.detach().clone().requires_grad_()
    g = torch.randn(6, 4, 4, dtype=torch.float64)
    ops.sinkhorn_knopp(logits, 20, order="rows-first").backward(g)
    upstream_sinkhorn(ref_in, 20).backward(g)
    torch.testing.assert_close(logits.grad, ref_in.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_gradcheck_rows_first_sinkhorn(n):
    logits = torch.randn(3, n, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: ops.sinkhorn_knopp(z, iters=6, order="rows-first"), (logits,))


@pytest.mark.parametrize("options", [UPSTREAM, dict(eps_placement="outside"), dict(sinkhorn_order="rows-first")],
                         ids=["both", "eps-outside", "rows-first"])
def test_gradcheck_coefficients_with_upstream_options(options):
    n, C = 2, 3
    m = ops.num_coefficients(n)
    x = torch.randn(4, n, C, dtype=torch.float64, requires_grad=True)
    phi = (torch.randn(n * C, m, dtype=torch.float64) / 3).requires_grad_()
    bias = torch.randn(m, dtype=torch.float64, requires_grad=True)
    alpha = (torch.rand(3, dtype=torch.float64) + 0.1).requires_grad_()

    def fn(*args):
        return ops.mhc_coefficients(*args, iters=4, backend="reference", **options)

    assert torch.autograd.gradcheck(fn, (x, phi, bias, alpha))


def test_gradcheck_per_stream_dropout():
    """The same mask on every evaluation (reseeded), so the function is smooth in its inputs."""
    n, C = 3, 4
    x = torch.randn(2, n, C, dtype=torch.float64, requires_grad=True)
    f = torch.randn(2, C, dtype=torch.float64, requires_grad=True)
    h_post = torch.rand(2, n, dtype=torch.float64, requires_grad=True)
    h_res = torch.rand(2, n, n, dtype=torch.float64, requires_grad=True)

    def fn(*args):
        torch.manual_seed(7)
        return ops.mhc_post_res(*args, backend="reference", stream_dropout=0.3)

    assert torch.autograd.gradcheck(fn, (x, f, h_post, h_res))


def test_per_stream_dropout_is_dropout_of_the_expanded_output():
    """Upstream's bias-dropout-add: H_res x + dropout(H_post^T f), one mask element per stream."""
    n, C, p = 4, 64, 0.5
    x, f = torch.randn(8, n, C, dtype=torch.float64), torch.randn(8, C, dtype=torch.float64)
    h_post, h_res = torch.rand(8, n, dtype=torch.float64), torch.rand(8, n, n, dtype=torch.float64)
    torch.manual_seed(11)
    got = ops.mhc_post_res(x, f, h_post, h_res, backend="reference", stream_dropout=p)
    torch.manual_seed(11)
    expanded = h_post.unsqueeze(-1) * f.unsqueeze(-2)
    ref = h_res @ x + torch.nn.functional.dropout(expanded, p=p)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-14)


def _sublayer_output(dropout, p=0.5, n=4, C=256):
    """Stream i of the output with H_res = I, x = 0, H_post = 1 is exactly its dropped-out copy of F."""
    module = MHCSublayerOutput(settings=MHCSettings(mode="mhc", expansion_rate=n, dropout=dropout, backend="reference"))
    f = torch.ones(2, C)
    residual = MHCResidual(torch.zeros(2, n, C), torch.ones(2, n), torch.eye(n).expand(2, n, n))
    return module(training=True)((f, None), residual, p).unflatten(-1, (n, C))


def test_layer_dropout_masks_shared_or_per_stream():
    shared = _sublayer_output("shared")
    assert all(torch.equal(shared[:, 0], shared[:, i]) for i in range(1, 4))
    per_stream = _sublayer_output("per-stream")
    kept = per_stream != 0
    assert 0.4 < kept.double().mean() < 0.6
    assert (kept[:, 0] != kept[:, 1]).double().mean() > 0.3  # independent masks: about half differ
    torch.testing.assert_close(per_stream[kept], torch.full_like(per_stream[kept], 2.0))  # 1/(1-p) scaling


def test_upstream_init():
    n, C = 4, 32
    m = ops.num_coefficients(n)
    torch.manual_seed(0)
    phi, bias, alpha = ops.init_mhc_parameters(n, C, alpha=0.01, scheme="upstream")
    bound = math.sqrt(6 / (n * C + m))  # torch.nn.init.xavier_uniform_ of a [m, nC] weight
    assert phi.shape == (n * C, m) and phi.abs().max() <= bound and phi.abs().max() > 0.95 * bound
    assert abs(phi.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert torch.equal(bias, torch.zeros(m)) and torch.equal(alpha, torch.full((3,), 0.01))
    x = torch.randn(5, n, C)
    h_pre, h_post, h_res = ops.mhc_coefficients(x, torch.zeros_like(phi), bias, alpha)
    torch.testing.assert_close(h_pre, torch.full_like(h_pre, 0.5))  # upstream's H_pre = 1/2
    torch.testing.assert_close(h_post, torch.ones_like(h_post))
    torch.testing.assert_close(h_res, torch.full_like(h_res, 1 / n))
    ours = ops.init_mhc_parameters(n, C)
    torch.testing.assert_close(torch.sigmoid(ours.bias[:n]), torch.full((n,), 1 / n))  # ours: 1/n
    with pytest.raises(ValueError, match="res_diag=4.0 belong to scheme 'ours'"):
        ops.init_mhc_parameters(n, C, res_diag=4.0, scheme="upstream")


@pytest.mark.parametrize(
    "call,flag",
    [
        (lambda t: ops.sinkhorn_knopp(t[..., :4, :4], 3, backend="triton", order="rows-first"), "--mhc-sinkhorn-order"),
        (lambda t: ops.mhc_coefficients(t, torch.zeros(16, 24), torch.zeros(24), torch.zeros(3), backend="triton",
                                        eps_placement="outside"), "--mhc-norm-eps-placement"),
        (lambda t: ops.mhc_post_res(t, t[..., 0, :], t[..., 0], t[..., :4], backend="triton", stream_dropout=0.1),
         "--mhc-dropout per-stream"),
    ],
    ids=["sinkhorn", "eps", "dropout"],
)
def test_ops_refuse_triton_for_reference_only_options(call, flag):
    with pytest.raises(ValueError, match=f"\\({flag}.*PyTorch reference only.*--mhc-kernels reference"):
        call(torch.randn(2, 4, 4))


def _args(argv):
    return mhc_settings_from_args(add_mhc_arguments(argparse.ArgumentParser()).parse_args(argv))


def test_flags_reach_the_settings_and_the_triton_refusal_is_early(monkeypatch):
    s = _args(["--residual-mode", "mhc", "--mhc-sinkhorn-order", "rows-first", "--mhc-norm-eps-placement", "outside",
               "--mhc-dropout", "per-stream", "--mhc-init", "upstream", "--mhc-kernels", "reference"])
    assert (s.sinkhorn_order, s.norm_eps_placement, s.dropout, s.init) == ("rows-first", "outside", "per-stream", "upstream")
    assert _args(["--residual-mode", "mhc", "--mhc-init", "upstream", "--mhc-kernels", "triton"]).init == "upstream"
    with pytest.raises(ValueError, match="--mhc-sinkhorn-order rows-first.*--mhc-kernels triton.*add --mhc-kernels reference"):
        _args(["--residual-mode", "mhc", "--mhc-sinkhorn-order", "rows-first", "--mhc-kernels", "triton"])
    assert _args(["--residual-mode", "mhc", "--mhc-dropout", "per-stream"]).backend == "auto"  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="--mhc-dropout per-stream.*--mhc-kernels auto runs on this CUDA machine"):
        _args(["--residual-mode", "mhc", "--mhc-dropout", "per-stream"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="residual", sinkhorn_order="rows-first"), "--mhc-sinkhorn-order rows-first needs --residual-mode mhc"),
        (dict(mode="hc", norm_eps_placement="outside"), "applies to --residual-mode mhc"),
        (dict(mode="mhc", init="upstream", res_init_diag=4.0), "--mhc-res-init-diag 4.0 belongs to --mhc-init ours"),
        (dict(mode="mhc", dropout="per-stream", recompute=True, backend="reference"), "per-stream with --mhc-recompute"),
        (dict(mode="mhc", sinkhorn_order="rows"), "--mhc-sinkhorn-order must be one of cols-first, rows-first"),
    ],
)
def test_contradictory_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MHCSettings(**kwargs)
