"""The fused sublayer path: both halves of an mHC sublayer sharing one x-gradient buffer, the
bias and dropout folded into post+res, and the replay used by recompute.

Compared against the PyTorch references composed op by op (autograd adds the three partial
gradients of x there); tolerances from the table in test_kernels.py.
"""

import math

import pytest
import torch

from mhc_megatron import ops
from mhc_megatron.kernels.coefficients import coefficients_backward, coefficients_forward
from mhc_megatron.kernels.post_res import mhc_post_res_triton, post_res_backward
from mhc_megatron.kernels.pre import pre_backward
from mhc_megatron.kernels.sublayer import SublayerLink, mhc_sublayer_input_triton
from test_kernels import DEVICE, tol

ITERS = 8


def _inputs(n, C, T, dtype, bias: bool):
    m = ops.num_coefficients(n)
    return [
        torch.randn(T, n, C, device=DEVICE, dtype=dtype),
        torch.randn(n * C, m, device=DEVICE) / (n * C) ** 0.5,
        torch.randn(m, device=DEVICE),
        torch.rand(3, device=DEVICE) + 0.1,
        (0.1 * torch.randn(C, device=DEVICE)).to(dtype) if bias else None,
    ]


def _F(y):
    return torch.tanh(y) * 1.5  # a nonlinear stand-in for attention / MLP


def _reference(x, phi, bias, alpha, lin_bias):
    h_pre, h_post, h_res = ops.mhc_coefficients(x, phi, bias, alpha, ITERS, backend="reference")
    y = ops.mhc_pre(x, h_pre, backend="reference")
    return ops.mhc_post_res(x, _F(y), h_post, h_res, backend="reference", bias=lin_bias)


def _fused(x, phi, bias, alpha, lin_bias):
    link = SublayerLink()
    y, _, h_post, h_res = mhc_sublayer_input_triton(x, phi, bias, alpha, ITERS, 1e-6, link)
    return mhc_post_res_triton(x, _F(y), h_post, h_res, lin_bias, 0.0, link)[0]


def _run(fn, inputs, g_out):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], g_out)
    return out, grads


@pytest.mark.parametrize("n", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C,T,bias", [(16, 5, False), (33, 37, True)])
def test_fused_sublayer_matches_the_reference(n, dtype, C, T, bias):
    inputs = _inputs(n, C, T, dtype, bias)
    g_out = torch.randn(T, n, C, device=DEVICE, dtype=dtype)
    out_f, grads_f = _run(_fused, inputs, g_out)
    out_r, grads_r = _run(_reference, inputs, g_out)
    torch.testing.assert_close(out_f, out_r, **tol("tf32 output" if dtype == torch.float32 else "output", dtype))
    for a, b in zip(grads_f, grads_r):
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, b / scale, **tol("tf32 grad", dtype))


def test_the_x_gradient_is_one_buffer_without_autograd_adds(monkeypatch):
    """The post+res backward starts the buffer, the input half returns that same buffer as the
    gradient of x, and no add runs in between (the counter sees every torch launch)."""
    from mhc_megatron.bench.memcount import TrafficCounter

    if DEVICE != "cpu":
        pytest.skip("counts launches in the interpreter")
    started = []
    original = SublayerLink.start_grad
    monkeypatch.setattr(SublayerLink, "start_grad", lambda self, g: (started.append(g.data_ptr()), original(self, g)))
    x, phi, bias, alpha, _ = _inputs(4, 32, 8, torch.bfloat16, False)
    x.requires_grad_()
    with TrafficCounter() as counter:
        out = _fused(x, phi, bias, alpha, None)
        g = torch.randn_like(out)
        with counter.phase("backward"):
            out.backward(g)
    names = [launch.name for launch in counter.launches]
    assert started == [x.grad.data_ptr()]
    assert not [name for name in names if name.startswith("aten.add")], names
    assert "_pre_bwd_kernel" in names and "_proj_bwd_kernel" in names


def _bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |t| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(t.float().abs().clamp_min(1e-30))) - 7)


def _stream_round(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 as the kernels store it: to nearest on a GPU; Triton's interpreter truncates."""
    from mhc_megatron.kernels._common import interpreting

    if not interpreting():
        return t.to(torch.bfloat16)
    bits = t.float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)


def _mostly_exact(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal but where an fp32 summation order puts a value across a rounding boundary."""
    assert (got == want).float().mean().item() > 0.999
    assert ((got.float() - want.float()).abs() <= _bf16_ulp(want)).all()


def test_accumulation_order_rounds_once_per_kernel():
    """g_x = rnd(rnd(rnd(post) + pre) + coefficients), each sum in fp32, rounded to the stream
    dtype once per kernel: checked step by step against PyTorch doing the same arithmetic."""
    n, C, T = 4, 64, 16
    x, phi, bias, alpha, _ = _inputs(n, C, T, torch.bfloat16, False)
    f = torch.randn(T, C, device=DEVICE, dtype=torch.bfloat16)
    g_out = torch.randn(T, n, C, device=DEVICE, dtype=torch.bfloat16)
    g_y = torch.randn(T, C, device=DEVICE, dtype=torch.bfloat16)
    h_pre, h_post, h_res, proj, sumsq = coefficients_forward(x.view(T, n * C), phi, bias, alpha, n, ITERS, 1e-6)

    g_x, _, g_h_post, g_h_res, _ = post_res_backward(g_out, x, f, h_post, h_res)
    _mostly_exact(g_x, _stream_round(torch.einsum("tij,tic->tjc", h_res, g_out.float())))

    before = g_x.clone()
    g_x, g_h_pre = pre_backward(g_y, x, h_pre, g_x)
    _mostly_exact(g_x, _stream_round(before.float() + h_pre[:, :, None] * g_y[:, None, :].float()))

    before = g_x.clone()
    coefficients_backward(x.view(T, n * C), phi, bias, alpha, proj, sumsq, g_h_pre, g_h_post, g_h_res, n, ITERS,
                          1e-6, g_v=g_x.view(T, n * C))
    xs = x.float().requires_grad_()
    h = ops.mhc_coefficients(xs, phi, bias, alpha, ITERS, backend="reference")
    (coef,) = torch.autograd.grad(h, xs, (g_h_pre, g_h_post, g_h_res))
    _mostly_exact(g_x, _stream_round(before.float() + coef))


def _dropout_out(x_shape, p, training=True, seed=None, bias=None, f=None):
    T, n, C = x_shape
    x = torch.zeros(T, n, C, device=DEVICE)
    f = torch.ones(T, C, device=DEVICE) if f is None else f
    h_post = torch.zeros(T, n, device=DEVICE)
    h_post[:, 0] = 1.0
    h_res = torch.zeros(T, n, n, device=DEVICE)
    if seed is not None:
        torch.manual_seed(seed)
    return ops.mhc_post_res(x, f, h_post, h_res, backend="triton", bias=bias, dropout=p, training=training)[:, 0]


def test_dropout_mask_statistics():
    p, T, C = 0.1, 64, 1024
    out = _dropout_out((T, 2, C), p)
    dropped = out == 0
    kept = out[~dropped]
    assert torch.equal(kept, torch.full_like(kept, 1 / (1 - p)))  # scaled like torch's dropout
    sigma = math.sqrt(p * (1 - p) / dropped.numel())
    assert abs(dropped.float().mean().item() - p) < 5 * sigma
    # independent across tokens and channels: two tokens agree where both drop or both keep
    agree = (dropped[:-1] == dropped[1:]).float().mean().item()
    assert abs(agree - (p * p + (1 - p) ** 2)) < 5 * math.sqrt(0.2 / dropped[1:].numel())
    col_rate = dropped.float().mean(0)  # no channel always dropped or always kept
    assert col_rate.max() < 0.4 and (col_rate > 0).float().mean() > 0.9


def test_dropout_follows_the_torch_generator_and_the_backward_reuses_the_mask():
    shape = (16, 2, 256)
    a, b, c = _dropout_out(shape, 0.3, seed=5), _dropout_out(shape, 0.3, seed=5), _dropout_out(shape, 0.3, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(_dropout_out(shape, 0.3), _dropout_out(shape, 0.3))  # the generator advances
    f = torch.ones(shape[0], shape[2], device=DEVICE, requires_grad=True)
    out = _dropout_out(shape, 0.3, seed=7, f=f)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(f.grad, out.detach(), rtol=0, atol=0)  # same mask, same 1/(1-p)


def test_bias_dropout_at_p0_and_in_eval_equal_the_unfused_reference():
    T, n, C = 7, 4, 48
    x = torch.randn(T, n, C, device=DEVICE)
    f = torch.randn(T, C, device=DEVICE)
    h_post, h_res = 2 * torch.rand(T, n, device=DEVICE), torch.rand(T, n, n, device=DEVICE)
    bias = torch.randn(C, device=DEVICE)
    want = ops.mhc_post_res(x, f + bias, h_post, h_res, backend="reference")
    for p, training in ((0.0, True), (0.5, False)):
        got = ops.mhc_post_res(x, f, h_post, h_res, backend="triton", bias=bias, dropout=p, training=training)
        torch.testing.assert_close(got, want, **tol("output", torch.float32))


def test_replay_reproduces_the_output_and_its_dropout_mask():
    T, n, C = 9, 4, 40
    x = torch.randn(T, n, C, device=DEVICE, dtype=torch.bfloat16)
    f = torch.randn(T, C, device=DEVICE, dtype=torch.bfloat16)
    out, replay = mhc_post_res_triton(x, f, torch.rand(T, n, device=DEVICE), torch.rand(T, n, n, device=DEVICE),
                                      torch.randn(C, device=DEVICE, dtype=torch.bfloat16), 0.2)
    assert torch.equal(replay(x.clone()), out)


def test_bad_dropout_probability_is_refused():
    x = torch.zeros(2, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\), got 1.0"):
        ops.mhc_post_res(x, torch.zeros(2, 8, device=DEVICE), torch.zeros(2, 4, device=DEVICE),
                         torch.zeros(2, 4, 4, device=DEVICE), dropout=1.0, training=True)


@pytest.mark.parametrize("n", [2, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_post_res_over_several_c_chunks(n, bias):
    """C = 1100: three 512-wide chunks, so the backward sums its coefficient gradients over
    chunks (in registers without a bias, in the output with one)."""
    T, C = 5, 1100
    x = torch.randn(T, n, C, device=DEVICE)
    inputs = [x, torch.randn(T, C, device=DEVICE), 2 * torch.rand(T, n, device=DEVICE),
              torch.rand(T, n, n, device=DEVICE), torch.randn(C, device=DEVICE) if bias else None]
    g_out = torch.randn_like(x)

    def run(backend):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
        out = ops.mhc_post_res(*leaves[:4], backend=backend, bias=leaves[4])
        return out, torch.autograd.grad(out, [t for t in leaves if t is not None], g_out)

    (out_t, grads_t), (out_r, grads_r) = run("triton"), run("reference")
    torch.testing.assert_close(out_t, out_r, **tol("output", torch.float32))
    for a, b in zip(grads_t, grads_r):
        # the coefficient gradients sum 1100 products in another order than the reference: compare
        # on the scale of the largest entry, not of each (possibly cancelled) one
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, b / scale, **tol("grad", torch.float32))
