"""mHC recompute: same gradients, the predicted activation bytes, blocks inside stages."""

import pytest
import torch

from mcore_helpers import build_gpt, lm_loss, make_batch, tiny_config
from mhc_megatron.bench.activations import SavedTensorBytes
from mhc_megatron.mcore import MHCSettings, check_transformer_config
from mhc_megatron.mcore.recompute import BlockRecompute
from mhc_megatron.mcore.specs import recompute_blocks
from mhc_megatron.recompute_plan import optimal_block_size, plan_recompute, spec_cost, stored_bytes_per_token

pytestmark = pytest.mark.usefixtures("megatron_world")


def _loss_and_grads(settings, layers=3, dtype=torch.float32, **cfg):
    model = build_gpt(tiny_config(num_layers=layers, **cfg), settings, seed=11)
    if dtype != torch.float32:
        model = model.to(dtype)
    loss = lm_loss(model, make_batch())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["mhc", "hc"])
@pytest.mark.parametrize("block", ["auto", 1, 4, 100])
def test_gradients_with_recompute_equal_those_without(mode, block):
    base = MHCSettings(mode=mode, expansion_rate=4)
    loss_ref, grads_ref = _loss_and_grads(base)
    loss, grads = _loss_and_grads(base.replace(recompute=True, recompute_block_size=block))
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_recompute_with_upstream_numerics_equals_without():
    """The rows-first Sinkhorn and the eps-outside norm run inside the recomputed coefficient step too."""
    base = MHCSettings(mode="mhc", expansion_rate=4, sinkhorn_order="rows-first", norm_eps_placement="outside",
                       backend="reference")
    loss_ref, grads_ref = _loss_and_grads(base)
    loss, grads = _loss_and_grads(base.replace(recompute=True, recompute_block_size=4))
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("block", [1, 4])
def test_kernel_path_gradients_with_recompute_equal_those_without(block):
    """The Triton kernels: the two halves take x from the chain, post+res replays rebuild it."""
    base = MHCSettings(mode="mhc", expansion_rate=4, backend="triton")
    loss_ref, grads_ref = _loss_and_grads(base, layers=2)
    loss, grads = _loss_and_grads(base.replace(recompute=True, recompute_block_size=block), layers=2)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_recompute_in_bf16_matches_bf16_without():
    base = MHCSettings(mode="mhc", expansion_rate=4)
    loss_ref, grads_ref = _loss_and_grads(base, dtype=torch.bfloat16)
    loss, grads = _loss_and_grads(base.replace(recompute=True), dtype=torch.bfloat16)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    for name, g in grads_ref.items():
        # the gradient of x_k adds the same terms grouped differently: bf16 rounding only
        scale = g.float().abs().max().clamp_min(1e-6)
        assert ((grads[name].float() - g.float()).abs().max() / scale) < 3e-2, name


def _saved_bytes(model, batch) -> int:
    """Bytes of the distinct storages autograd keeps for backward, parameters excluded: counted by
    saved-tensor hooks, code independent of the planner's formulas it is compared with."""
    with SavedTensorBytes(exclude=model.parameters()) as saved:
        lm_loss(model, batch)
    return saved.nbytes


def test_saved_bytes_count_each_storage_once_and_skip_parameters():
    a = torch.randn(100, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(100))
    with SavedTensorBytes(exclude=[w]) as saved:
        b = (a * w).exp()  # mul saves a and w; exp saves its output b
        b[:50].sin()  # sin saves a view of b: b's storage again
        b.view(10, 10).cos()
    assert saved.nbytes == 2 * 100 * 4


@pytest.mark.parametrize("block", ["auto", 3])
def test_saved_activation_bytes_match_the_planner(block):
    """Measured with the Triton kernels (interpreted on CPU), whose saved tensors the planner
    models; the extra bytes of mHC over the residual model, within 10%."""
    layers, hidden, n = 4, 32, 4
    cfg = dict(num_layers=layers, hidden_size=hidden, ffn_hidden_size=64)
    batch = make_batch(batch=2, seq=16)
    tokens = 2 * 16
    residual = _saved_bytes(build_gpt(tiny_config(**cfg), MHCSettings()), batch)
    settings = MHCSettings(mode="mhc", expansion_rate=n, backend="triton")
    without = _saved_bytes(build_gpt(tiny_config(**cfg), settings), batch) - residual
    with_rc = _saved_bytes(
        build_gpt(tiny_config(**cfg), settings.replace(recompute=True, recompute_block_size=block)), batch
    ) - residual
    plan = plan_recompute(layers, hidden, n, seq=16, micro_batch=2, act_bytes=4, block_size=block)
    assert without == pytest.approx(plan.stored_bytes_without, rel=0.10)
    assert with_rc == pytest.approx(plan.stage_stored_bytes_with[0], rel=0.10)
    # (at C = 32 the kept coefficient floats, 49 per sublayer, weigh more than at real widths)
    assert with_rc < 0.7 * without
    assert plan.stored_bytes_without == tokens * stored_bytes_per_token(2 * layers, hidden, n, 4, None)


def test_planner_formula_and_choice():
    # L_r* = sqrt(n L / (n + 2)); the integer choice minimises n ceil(L/L_r) + (n+2) L_r
    best, star = optimal_block_size(60, 4)
    assert star == pytest.approx((4 * 60 / 6) ** 0.5)
    assert spec_cost(best, 60, 4) == min(spec_cost(b, 60, 4) for b in range(1, 61))
    assert abs(best - star) <= 1.5
    plan = plan_recompute(30, 2560, 4, pp=2, seq=4096)
    assert plan.sublayers_per_stage == 30 and plan.stage_block_sizes == [plan.block_size] * 2
    assert len(plan.curve) == 30 and plan.stored_bytes_with < plan.stored_bytes_without
    with pytest.raises(ValueError, match="do not split evenly over 4 pipeline stages x 2 virtual chunks"):
        plan_recompute(30, 2560, 4, pp=4, vpp=2)


@pytest.mark.parametrize("pp", [2, 4])
def test_blocks_never_cross_a_stage_boundary(pp):
    layers = 12
    settings = MHCSettings(mode="mhc", expansion_rate=4, recompute=True, recompute_block_size=5)
    per_stage = layers // pp
    for stage in range(pp):
        ids = list(range(stage * per_stage, (stage + 1) * per_stage))
        first, last = 2 * ids[0], 2 * ids[-1] + 1
        for attn, mlp in recompute_blocks(settings, ids):
            for block, position in (attn, mlp):
                assert first <= block.first_sublayer and block.first_sublayer + block.size - 1 <= last
                assert 0 <= position < block.size


def test_interleaved_block_forward_is_refused():
    block = BlockRecompute(block_index=0, size=2, first_sublayer=0)
    block.chain_for(0, torch.zeros(3))
    with pytest.raises(RuntimeError, match="did not receive the output of the sublayer before it"):
        block.chain_for(1, torch.zeros(3))


def test_full_megatron_recompute_is_refused_with_mhc_recompute():
    cfg = tiny_config(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    with pytest.raises(ValueError, match="--mhc-recompute together with --recompute-granularity full"):
        check_transformer_config(cfg, MHCSettings(mode="mhc", recompute=True))
    check_transformer_config(cfg, MHCSettings(mode="mhc"))


def test_selective_megatron_recompute_composes():
    base = MHCSettings(mode="mhc", expansion_rate=4, recompute=True)
    # ("mlp" recompute does not terminate on CPU even for the residual model: test-setup limit)
    sel = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    loss_ref, grads_ref = _loss_and_grads(MHCSettings(mode="mhc", expansion_rate=4))
    loss, grads = _loss_and_grads(base, **sel)
    torch.testing.assert_close(loss, loss_ref)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_bad_block_size():
    with pytest.raises(ValueError, match="recompute_block_size=0: the recompute block size must be 'auto' or an integer >= 1"):
        MHCSettings(mode="mhc", recompute=True, recompute_block_size=0)


def test_plan_recompute_cli_json(capsys):
    import json

    from mhc_megatron.cli import main

    assert main(["plan-recompute", "--layers", "8", "--hidden", "64", "--pp", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["block_size"] == optimal_block_size(8, 4)[0]
    assert plan["stage_block_sizes"] == [plan["block_size"]] * 2
    assert main(["plan-recompute", "--layers", "7", "--hidden", "64", "--pp", "2"]) == 2
    assert "do not split evenly" in capsys.readouterr().err
