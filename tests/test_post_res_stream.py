"""The MLP post+residual on a dedicated high-priority CUDA stream."""

import pytest
import torch

from mcore_helpers import build_gpt, lm_loss, make_batch, tiny_config
from mhc_megatron import ops
from mhc_megatron.mcore import MHCSettings
from mhc_megatron.mcore.streams import on_high_priority_stream

pytestmark = pytest.mark.usefixtures("megatron_world")


def test_only_the_mlp_post_residual_moves_to_the_stream():
    model = build_gpt(tiny_config(), MHCSettings(mode="mhc", expansion_rate=4, post_res_stream=True))
    layer = model.decoder.layers[0]
    assert layer.mlp_bda.high_priority_stream and not layer.self_attn_bda.high_priority_stream


def test_on_cpu_the_stream_option_changes_nothing():
    cfg = tiny_config()
    batch = make_batch(seed=3)
    losses = []
    for stream in (False, True):
        model = build_gpt(cfg, MHCSettings(mode="mhc", expansion_rate=4, post_res_stream=stream), seed=7)
        loss = lm_loss(model, batch)
        loss.backward()
        losses.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert losses[0][0] == losses[1][0]
    for a, b in zip(losses[0][1], losses[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA streams")
def test_side_stream_result_survives_main_stream_allocations():
    """Many rounds in which temporaries handed to the side stream are dropped at once and the
    main stream keeps allocating and writing: the side-stream result and its backward must equal
    the reference every time."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    for _ in range(50):
        x = torch.randn(4096, 4, 1024, device=dev, requires_grad=True)
        f = torch.randn(4096, 1024, device=dev, requires_grad=True)
        h_post = torch.rand(4096, 4, device=dev)
        h_res = torch.softmax(torch.randn(4096, 4, 4, device=dev), -1)
        want = ops.mhc_post_res(x, f, h_post, h_res, backend="reference")
        got = on_high_priority_stream(lambda *a: ops.mhc_post_res(*a), x * 1, f * 1, h_post, h_res)
        scratch = [torch.full_like(x, 7.0) for _ in range(4)]  # main-stream allocations meanwhile
        (got.square().sum() + scratch[0].sum() * 0).backward()
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
