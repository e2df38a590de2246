import pytest
import torch

from mhc_megatron.ops import contract_streams, expand_streams, mhc_post_res, mhc_pre


def test_pre_and_post_res_definitions():
    n, C = 3, 5
    x = torch.randn(2, n, C, dtype=torch.float64)
    f = torch.randn(2, C, dtype=torch.float64)
    h_pre = torch.randn(2, n, dtype=torch.float64)
    h_post = torch.randn(2, n, dtype=torch.float64)
    h_res = torch.randn(2, n, n, dtype=torch.float64)
    pre = mhc_pre(x, h_pre)
    out = mhc_post_res(x, f, h_post, h_res)
    for t in range(2):
        torch.testing.assert_close(pre[t], sum(h_pre[t, i] * x[t, i] for i in range(n)))
        for i in range(n):
            expected = sum(h_res[t, i, j] * x[t, j] for j in range(n)) + h_post[t, i] * f[t]
            torch.testing.assert_close(out[t, i], expected)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_gradcheck_pre_and_post_res(n):
    C = 4
    x = torch.randn(3, n, C, dtype=torch.float64, requires_grad=True)
    f = torch.randn(3, C, dtype=torch.float64, requires_grad=True)
    h_pre = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    h_post = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    h_res = torch.randn(3, n, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mhc_pre, (x, h_pre))
    assert torch.autograd.gradcheck(mhc_post_res, (x, f, h_post, h_res))
    assert torch.autograd.gradcheck(lambda h: expand_streams(h, n), (f,))
    assert torch.autograd.gradcheck(contract_streams, (x,))
    assert torch.autograd.gradcheck(lambda t: contract_streams(t, "sum"), (x,))


def test_n1_with_unit_coefficients_is_exactly_the_residual():
    x = torch.randn(7, 1, 9)
    f = torch.randn(7, 9)
    ones = torch.ones(7, 1)
    assert torch.equal(mhc_pre(x, ones), x[:, 0])
    assert torch.equal(mhc_post_res(x, f, ones, ones.unsqueeze(-1)), (x[:, 0] + f).unsqueeze(1))
    assert torch.equal(contract_streams(expand_streams(x[:, 0], 1)), x[:, 0])


def test_activation_dtype_preserved():
    x = torch.randn(4, 4, 8, dtype=torch.bfloat16)
    f = torch.randn(4, 8, dtype=torch.bfloat16)
    h = torch.rand(4, 4)
    assert mhc_pre(x, h).dtype == torch.bfloat16
    assert mhc_post_res(x, f, h, torch.rand(4, 4, 4)).dtype == torch.bfloat16


def test_expand_then_contract_is_identity():
    h = torch.randn(3, 2, 16)
    s = expand_streams(h, 4)
    assert s.shape == (3, 2, 4, 16)
    torch.testing.assert_close(contract_streams(s), h)
    torch.testing.assert_close(contract_streams(s, "sum"), 4 * h)


def test_shape_errors():
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"h_pre has shape \(2, 3\), expected \(2, 4\)"):
        mhc_pre(x, torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"f has shape \(2, 7\), expected \(2, 8\)"):
        mhc_post_res(x, torch.randn(2, 7), torch.rand(2, 4), torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match=r"h_res has shape \(2, 4\), expected \(2, 4, 4\)"):
        mhc_post_res(x, torch.randn(2, 8), torch.rand(2, 4), torch.rand(2, 4))
    with pytest.raises(ValueError, match="expansion rate must be an integer >= 1, got 0"):
        expand_streams(torch.randn(3), 0)
    with pytest.raises(ValueError, match="expansion rate must be an integer >= 1, got 2.0"):
        expand_streams(torch.randn(3), 2.0)
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        contract_streams(x, "max")
