import pytest
import torch

from mhc_megatron.ops import hc_coefficients, init_hc_parameters, mhc_coefficients, num_coefficients
from mhc_megatron.ops.sinkhorn import sinkhorn_knopp


def literal_mhc(x, phi, bias, alpha, iters, eps):
    """The coefficients of docs/maths.md in their literal order: RMSNorm over vec(x) first, then project."""
    n = x.shape[-2]
    v = x.flatten(-2)
    v_normed = v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    p = v_normed @ phi
    pre = torch.sigmoid(alpha[0] * p[..., :n] + bias[:n])
    post = 2 * torch.sigmoid(alpha[1] * p[..., n : 2 * n] + bias[n : 2 * n])
    res_logits = alpha[2] * p[..., 2 * n :].unflatten(-1, (n, n)) + bias[2 * n :].view(n, n)
    return pre, post, sinkhorn_knopp(res_logits, iters)


def random_mhc_inputs(lead, n, C, dtype=torch.float64):
    m = num_coefficients(n)
    x = torch.randn(*lead, n, C, dtype=dtype)
    phi = torch.randn(n * C, m, dtype=dtype) / (n * C) ** 0.5
    bias = torch.randn(m, dtype=dtype)
    alpha = torch.rand(3, dtype=dtype) + 0.1
    return x, phi, bias, alpha


@pytest.mark.parametrize("n,C", [(1, 8), (2, 5), (4, 16), (8, 3)])
def test_efficient_order_equals_literal_order_float64(n, C):
    inputs = random_mhc_inputs((3, 2), n, C)
    ours = mhc_coefficients(*inputs, iters=10, eps=1e-6)
    ref = literal_mhc(*inputs, iters=10, eps=1e-6)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_gradcheck_mhc_coefficients(n):
    x, phi, bias, alpha = (t.requires_grad_() for t in random_mhc_inputs((3,), n, 4))

    def f(*args):
        return mhc_coefficients(*args, iters=4)

    assert torch.autograd.gradcheck(f, (x, phi, bias, alpha))


def test_outputs_in_range_and_shapes():
    x, phi, bias, alpha = random_mhc_inputs((5, 7), 4, 32, dtype=torch.float32)
    pre, post, res = mhc_coefficients(x, phi, bias, alpha)
    assert pre.shape == (5, 7, 4) and post.shape == (5, 7, 4) and res.shape == (5, 7, 4, 4)
    assert ((pre > 0) & (pre < 1)).all() and ((post > 0) & (post < 2)).all()
    torch.testing.assert_close(res.sum(-1), torch.ones(5, 7, 4))


def test_bf16_input_runs_in_fp32_and_matches_fp32():
    x, phi, bias, alpha = random_mhc_inputs((64,), 4, 32, dtype=torch.float32)
    x16 = x.bfloat16()
    out16 = mhc_coefficients(x16, phi, bias, alpha)
    out32 = mhc_coefficients(x16.float(), phi, bias, alpha)
    for a, b in zip(out16, out32):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mhc_shape_errors_name_shapes():
    x, phi, bias, alpha = random_mhc_inputs((2,), 4, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"phi has shape \(32, 20\), expected \(28, 24\)"):
        mhc_coefficients(x[..., :7], phi[:, :20], bias, alpha)
    with pytest.raises(ValueError, match=r"bias has shape \(23,\), expected \(24,\)"):
        mhc_coefficients(x, phi, bias[:23], alpha)
    with pytest.raises(ValueError, match=r"alpha has shape \(2,\), expected \(3,\)"):
        mhc_coefficients(x, phi, bias, alpha[:2])
    with pytest.raises(ValueError, match=r"\[\.\.\., n, C\]"):
        mhc_coefficients(x[0, 0], phi, bias, alpha)
    with pytest.raises(ValueError, match="iterations"):
        mhc_coefficients(x, phi, bias, alpha, iters=0)


def random_hc_inputs(lead, n, C, dtype=torch.float64):
    x = torch.randn(*lead, n, C, dtype=dtype)
    theta = torch.randn(C, n + 2, dtype=dtype) / C**0.5
    bias = torch.randn(num_coefficients(n), dtype=dtype)
    alpha = torch.rand(3, dtype=dtype) + 0.1
    return x, theta, bias, alpha


@pytest.mark.parametrize("n", [1, 3, 4])
def test_gradcheck_hc_coefficients(n):
    args = tuple(t.requires_grad_() for t in random_hc_inputs((2,), n, 5))
    assert torch.autograd.gradcheck(hc_coefficients, args)


def test_hc_matches_per_stream_definition():
    n, C = 3, 6
    x, theta, bias, alpha = random_hc_inputs((4,), n, C)
    pre, post, res = hc_coefficients(x, theta, bias, alpha, eps=1e-6)
    for t in range(4):
        for i in range(n):
            xi = x[t, i] / torch.sqrt(x[t, i].pow(2).mean() + 1e-6)
            d = torch.tanh(xi @ theta)
            torch.testing.assert_close(pre[t, i], alpha[0] * d[0] + bias[i])
            torch.testing.assert_close(post[t, i], alpha[1] * d[1] + bias[n + i])
            for j in range(n):  # column i is written by source stream i
                torch.testing.assert_close(res[t, j, i], alpha[2] * d[2 + j] + bias[2 * n + j * n + i])


def test_hc_prenorm_initialisation():
    n, C = 4, 8
    for layer in range(6):
        p = init_hc_parameters(n, C, layer)
        pre, post, res = hc_coefficients(torch.randn(5, n, C), *p)
        torch.testing.assert_close(pre, torch.nn.functional.one_hot(torch.tensor(layer % n), n).float().expand(5, n))
        torch.testing.assert_close(post, torch.ones(5, n))
        torch.testing.assert_close(res, torch.eye(n).expand(5, n, n))


def test_hc_shape_error():
    x, theta, bias, alpha = random_hc_inputs((2,), 4, 8)
    with pytest.raises(ValueError, match=r"theta has shape \(8, 5\), expected \(8, 6\)"):
        hc_coefficients(x, theta[:, :5], bias, alpha)
