import pytest
import torch

from mhc_megatron.ops import (
    contract_streams,
    expand_streams,
    init_hc_parameters,
    init_mhc_parameters,
    mhc_coefficients,
    mhc_post_res,
    mhc_pre,
    num_coefficients,
)


class PreNormSublayer(torch.nn.Module):
    """F(y) = W2 gelu(W1 RMSNorm(y)): the shape of a Megatron pre-norm sublayer."""

    def __init__(self, C, eps, dtype):
        super().__init__()
        self.eps = eps
        self.w1 = torch.nn.Linear(C, 2 * C, dtype=dtype)
        self.w2 = torch.nn.Linear(2 * C, C, dtype=dtype)

    def forward(self, y):
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.w2(torch.nn.functional.gelu(self.w1(y)))


def mhc_layer(x, params, F, iters=20):
    h_pre, h_post, h_res = mhc_coefficients(x, *params, iters=iters)
    return mhc_post_res(x, F(mhc_pre(x, h_pre)), h_post, h_res)


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("res_diag", [0.0, 6.0])
def test_initial_layer_is_close_to_residual(n, res_diag):
    C = 32
    F = PreNormSublayer(C, 1e-6, torch.float64)
    h = torch.randn(16, C, dtype=torch.float64)
    params = init_mhc_parameters(n, C, res_diag=res_diag, dtype=torch.float64)
    out = mhc_layer(expand_streams(h, n), params, F)
    residual = h + F(h)
    for i in range(n):
        rel = (out[:, i] - residual).norm() / residual.norm()
        assert rel < 0.05, (i, rel.item())
    torch.testing.assert_close(contract_streams(out), residual, rtol=0.02, atol=0.02)


def test_n1_initial_layer_is_exactly_residual_for_prenorm_sublayer():
    C = 24
    F = PreNormSublayer(C, 0.0, torch.float64)  # scale-invariant norm: F(h/2) == F(h)
    h = torch.randn(10, C, dtype=torch.float64)
    params = init_mhc_parameters(1, C, dtype=torch.float64)
    assert torch.count_nonzero(params.phi) == 0
    _, h_post, h_res = mhc_coefficients(h.unsqueeze(1), *params)
    assert torch.equal(h_post, torch.ones_like(h_post)) and torch.equal(h_res, torch.ones_like(h_res))
    out = mhc_layer(h.unsqueeze(1), params, F)
    torch.testing.assert_close(out[:, 0], h + F(h), rtol=1e-13, atol=1e-13)


def train_two_layers(phi_std, steps=5):
    """A few SGD steps of two mHC layers on identical input streams; returns the output streams."""
    torch.manual_seed(1)
    n, C = 4, 8
    Fs = [PreNormSublayer(C, 1e-6, torch.float64) for _ in range(2)]
    params = [
        [torch.nn.Parameter(t) for t in init_mhc_parameters(n, C, phi_std=phi_std, dtype=torch.float64)]
        for _ in range(2)
    ]
    opt = torch.optim.SGD([p for ps in params for p in ps] + [w for F in Fs for w in F.parameters()], lr=0.5)
    h = torch.randn(32, C, dtype=torch.float64)
    target = torch.randn(32, C, dtype=torch.float64)
    for _ in range(steps):
        x = expand_streams(h, n)
        for F, ps in zip(Fs, params):
            x = mhc_layer(x, ps, F)
        loss = (contract_streams(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x.detach()


def test_random_phi_breaks_stream_symmetry_and_zero_phi_does_not():
    symmetric = train_two_layers(phi_std=0.0)
    assert (symmetric - symmetric[:, :1]).abs().max() < 1e-12  # streams identical forever
    broken = train_two_layers(phi_std=None)
    assert (broken - broken[:, :1]).abs().max() > 1e-4


def test_parameter_shapes_and_values():
    p = init_mhc_parameters(4, 16, res_diag=5.0)
    assert p.phi.shape == (64, num_coefficients(4)) and p.bias.shape == (24,) and p.alpha.shape == (3,)
    assert torch.equal(p.alpha, torch.full((3,), 0.01))
    torch.testing.assert_close(torch.sigmoid(p.bias[:4]), torch.full((4,), 0.25))  # H_pre = 1/n
    assert torch.equal(p.bias[4:8], torch.zeros(4))  # H_post = 1
    assert torch.equal(p.bias[8:].view(4, 4), 5.0 * torch.eye(4))
    assert abs(p.phi.std().item() - 1 / 8) < 0.02


def test_bad_init_arguments():
    with pytest.raises(ValueError, match="expansion rate must be an integer >= 1, got 0"):
        init_mhc_parameters(0, 8)
    with pytest.raises(ValueError, match="hidden width C must be a positive integer, got -1"):
        init_mhc_parameters(4, -1)
    with pytest.raises(ValueError, match="layer_index must be an integer >= 0"):
        init_hc_parameters(4, 8, -1)
