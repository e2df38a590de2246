import pytest
import torch

from mhc_megatron.ops import amax_gain, composite_amax_gain, composite_mapping, sinkhorn_knopp


def test_amax_gain_definition():
    m = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    fwd, bwd = amax_gain(m)
    assert fwd.item() == 3.0  # row |1| + |-2|
    assert bwd.item() == 2.25  # column |-2| + |0.25|


def test_amax_gain_averages_over_tokens():
    m = torch.stack([torch.eye(3), 3 * torch.eye(3)])
    fwd, bwd = amax_gain(m)
    assert fwd.item() == 2.0 and bwd.item() == 2.0


def test_doubly_stochastic_has_unit_gains():
    m = sinkhorn_knopp(torch.randn(100, 4, 4, dtype=torch.float64), iters=200)
    fwd, bwd = amax_gain(m)
    assert abs(fwd.item() - 1) < 1e-9 and abs(bwd.item() - 1) < 1e-9


def test_composite_order_last_layer_leftmost():
    layers = [torch.randn(5, 3, 3) for _ in range(4)]
    expected = layers[3] @ layers[2] @ layers[1] @ layers[0]
    torch.testing.assert_close(composite_mapping(layers), expected)
    prefixes = composite_mapping(layers, cumulative=True)
    assert prefixes.shape == (4, 5, 3, 3)
    torch.testing.assert_close(prefixes[1], layers[1] @ layers[0])
    torch.testing.assert_close(prefixes[-1], expected)
    torch.testing.assert_close(composite_mapping(torch.stack(layers)), expected)


def test_composite_of_64_mhc_layers_stays_near_one_and_hc_grows():
    gen = torch.Generator().manual_seed(0)
    mhc = [sinkhorn_knopp(torch.randn(256, 4, 4, generator=gen, dtype=torch.float64)) for _ in range(64)]
    hc = [torch.eye(4, dtype=torch.float64) + 0.2 * torch.randn(256, 4, 4, generator=gen, dtype=torch.float64) for _ in range(64)]
    mf, mb = composite_amax_gain(mhc)
    hf, hb = composite_amax_gain(hc)
    assert abs(mf.item() - 1) < 1e-6 and mb.item() < 1.06
    assert hf.item() > 10 and hb.item() > 10


def test_errors():
    with pytest.raises(ValueError, match=r"\[\.\.\., n, n\], got shape \(3, 2\)"):
        amax_gain(torch.randn(3, 2))
    with pytest.raises(ValueError, match="at least one layer"):
        composite_mapping([])
