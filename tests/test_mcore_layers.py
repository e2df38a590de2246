"""mHC layers inside megatron-core GPTModel (single process, CPU)."""

import dataclasses

import pytest
import torch

from mcore_helpers import SEQ, VOCAB, build_gpt, lm_loss, local_block_spec, make_batch, tiny_config
from mhc_megatron.mcore import (
    HCCoefficients,
    MHCCoefficients,
    MHCSettings,
    MHCStreamContraction,
    MHCSublayerInput,
    MHCSublayerOutput,
    check_transformer_config,
    mhc_layer_spec,
)

pytestmark = pytest.mark.usefixtures("megatron_world")


def settings(mode, n=4, **kw):
    return MHCSettings(mode=mode, expansion_rate=n, **kw)


@pytest.mark.parametrize("mode", ["residual", "hc", "mhc"])
def test_modes_train_a_step(mode):
    model = build_gpt(tiny_config(), settings(mode))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = make_batch()
    losses = []
    for _ in range(3):
        loss = lm_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    coeffs = [m for m in model.modules() if isinstance(m, (MHCCoefficients, HCCoefficients))]
    assert len(coeffs) == (0 if mode == "residual" else 4)  # 2 layers x (attention, MLP)
    for m in coeffs:
        for p in m.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()


def test_layer_slots_and_stream_width():
    model = build_gpt(tiny_config(), settings("mhc", n=3))
    layer0, layer1 = model.decoder.layers
    assert isinstance(layer0.input_layernorm, MHCSublayerInput) and layer0.input_layernorm.expand_input
    assert not layer1.input_layernorm.expand_input and not layer0.pre_mlp_layernorm.expand_input
    assert isinstance(layer0.self_attn_bda, MHCSublayerOutput) and isinstance(layer0.mlp_bda, MHCSublayerOutput)
    assert isinstance(model.decoder.final_layernorm, MHCStreamContraction)
    assert [m.coefficients.sublayer_index for layer in model.decoder.layers
            for m in (layer.input_layernorm, layer.pre_mlp_layernorm)] == [0, 1, 2, 3]
    widths = []
    hooks = [layer.register_forward_hook(lambda m, i, o: widths.append(o[0].shape[-1])) for layer in model.decoder.layers]
    lm_loss(model, make_batch())
    for h in hooks:
        h.remove()
    assert widths == [3 * 32, 3 * 32]  # layers pass the flattened n-stream residual [s, b, n*C]


def _copy_shared_weights(src, dst):
    """Copy every parameter of ``src`` into ``dst`` (the norm inside mHC slots sits at .norm.)."""
    dst_params = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            for candidate in (name, name.replace("layernorm.", "layernorm.norm.")):
                if candidate in dst_params:
                    dst_params[candidate].copy_(p)
                    break
            else:
                raise KeyError(name)


def _megatron_local_spec(cfg):
    """megatron-core's own local GPT layer spec, untouched (its DotProductAttention included)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(normalization=cfg.normalization)


def _plain_megatron_gpt(cfg, seed=1234):
    """The reference nothing of ours takes part in: megatron-core's GPTModel with its local spec."""
    from megatron.core.models.gpt import GPTModel

    torch.manual_seed(seed)
    return GPTModel(cfg, _megatron_local_spec(cfg), vocab_size=VOCAB, max_sequence_length=SEQ)


def _gpt_from_megatron_spec(cfg, mhc_settings, seed=4321):
    """The product's mHC/HC transformation of that very spec (same attention, MLP and norms)."""
    from megatron.core.models.gpt import GPTModel
    from mhc_megatron.mcore.specs import get_mhc_gpt_layer_local_block_spec

    torch.manual_seed(seed)
    return GPTModel(cfg, get_mhc_gpt_layer_local_block_spec(cfg, mhc_settings), vocab_size=VOCAB,
                    max_sequence_length=SEQ)


def _causal_mask():
    # Megatron's DotProductAttention builds its default mask on the GPU: pass it explicitly
    return torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]


def _loss(model, batch):
    tokens, positions, labels = batch
    return model(tokens, positions, _causal_mask(), labels=labels).float().mean()


def test_hc_starts_as_the_residual_model():
    """Pre-norm style HC initialisation is Megatron's residual GPT: same weights, same loss."""
    residual = _plain_megatron_gpt(tiny_config())
    hc = _gpt_from_megatron_spec(tiny_config(), settings("hc"))
    _copy_shared_weights(residual, hc)
    batch = make_batch()
    assert _loss(hc, batch).item() == pytest.approx(_loss(residual, batch).item(), abs=1e-6)


@pytest.mark.parametrize("n,res_init_diag", [(1, 0.0), (4, 0.0), (4, 6.0)])
def test_mhc_starts_close_to_the_residual_model(n, res_init_diag):
    residual = _plain_megatron_gpt(tiny_config())
    mhc = _gpt_from_megatron_spec(tiny_config(), settings("mhc", n=n, res_init_diag=res_init_diag))
    _copy_shared_weights(residual, mhc)
    tokens, positions, _ = make_batch()
    ref = residual(tokens, positions, _causal_mask())
    out = mhc(tokens, positions, _causal_mask())
    rel = ((out - ref).norm() / ref.norm()).item()
    # n = 1: H_pre = 1/2 meets the pre-norm epsilon (5e-3 here); n > 1: only the dynamic part
    assert rel < (1e-2 if n == 1 else 5e-3), rel


def _sinkhorn(logits, iters):
    """The paper's Sinkhorn-Knopp, literally: exp, then ``iters`` times columns, then rows."""
    p = logits.exp()
    for _ in range(iters):
        p = p / p.sum(dim=-2, keepdim=True)  # every column sums to 1
        p = p / p.sum(dim=-1, keepdim=True)  # every row sums to 1
    return p


def _coefficients_by_hand(x, coefficients, s):
    """H_pre, H_post, H_res of the n-stream residual ``x`` [s, b, n, C] from the module's own
    phi, bias and alpha: r = sqrt(mean(v^2) + eps), logits = alpha * (v phi) / r + bias."""
    n = x.shape[-2]
    phi, bias, alpha = (t.double() for t in (coefficients.phi, coefficients.bias, coefficients.alpha))
    v = x.flatten(-2)
    proj = (v @ phi) / (v.square().mean(-1, keepdim=True) + s.coeff_eps).sqrt()
    pre = alpha[0] * proj[..., :n] + bias[:n]
    post = alpha[1] * proj[..., n:2 * n] + bias[n:2 * n]
    res = alpha[2] * proj[..., 2 * n:] + bias[2 * n:]
    return torch.sigmoid(pre), 2 * torch.sigmoid(post), _sinkhorn(res.unflatten(-1, (n, n)), s.sinkhorn_iters)


@pytest.mark.parametrize("n", [3, 4])
def test_mhc_model_computes_the_mhc_maths(n):
    """The built GPT against the mHC equations written out here in plain torch (float64 for the
    residual maths), with Megatron's own attention/MLP/norm modules as the sublayer functions F:
    x_0 = n copies of the embedding; per sublayer
    x_{l+1} = H_res x_l + H_post^T (F(norm(H_pre x_l)) + bias); exit: final norm of the stream
    mean; forward and every parameter's gradient. The coefficient parameters are moved far from their initial values first (uneven,
    asymmetric H_res, H_pre and H_post away from 1/n and 1), and the linear biases from 0, so
    that no shortcut of the initial state passes."""
    s = settings("mhc", n=n)
    model = _gpt_from_megatron_spec(tiny_config(), s)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MHCCoefficients):
                m.alpha.copy_(torch.tensor([0.7, 0.9, 1.3]))
                m.bias.add_(torch.randn(m.bias.shape, generator=g))
                m.phi.mul_(2.0)
        for name, p in model.named_parameters():  # Megatron starts its linear biases at 0
            if name.endswith(".bias") and ".coefficients." not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    tokens, positions, _ = make_batch()
    mask = _causal_mask()
    got = model(tokens, positions, mask)  # [b, s, V]

    h = model.embedding(input_ids=tokens, position_ids=positions)  # [s, b, C]
    x = h.double().unsqueeze(-2).expand(*h.shape[:-1], n, h.shape[-1])
    res_seen = []
    for layer in model.decoder.layers:
        for slot, sublayer in ((layer.input_layernorm, lambda u: layer.self_attention(u, attention_mask=mask)),
                               (layer.pre_mlp_layernorm, layer.mlp)):
            h_pre, h_post, h_res = _coefficients_by_hand(x, slot.coefficients, s)
            res_seen.append(h_res.detach())
            u = torch.einsum("sbj,sbjc->sbc", h_pre, x)
            f, f_bias = sublayer(slot.norm(u.float()))
            f = f.double() + (f_bias.double() if f_bias is not None else 0.0)
            x = torch.einsum("sbij,sbjc->sbic", h_res, x) + h_post.unsqueeze(-1) * f.unsqueeze(-2)
    hidden = model.decoder.final_layernorm.norm(x.mean(-2).float())
    tied = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    want, _ = model.output_layer(hidden, weight=tied)
    want = want.transpose(0, 1)

    # the perturbation really made H_res uneven and asymmetric
    h_res = torch.stack(res_seen)
    assert (h_res - h_res.transpose(-1, -2)).abs().max() > 0.1 and (h_res - 1 / n).abs().max() > 0.1
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-5)  # measured: 1e-7
    # backward too (the product's Sinkhorn and mixing have their own autograd functions): every
    # parameter's gradient of one random projection of the logits
    names, params = zip(*model.named_parameters())
    w = torch.randn(got.shape, generator=g)
    grads_got = torch.autograd.grad((got * w).sum(), params, retain_graph=False, allow_unused=True)
    grads_want = torch.autograd.grad((want * w).sum(), params, allow_unused=True)
    assert any(".coefficients.phi" in name for name in names)
    for name, a, b in zip(names, grads_got, grads_want):
        assert a is not None and b is not None, name
        scale = b.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(a / scale, b.to(a.dtype) / scale, rtol=0, atol=5e-5, msg=name)  # measured: 4e-6


def test_bf16_model_runs_the_coefficient_maths_in_fp32():
    """The parameters follow the model's dtype (Megatron's optimizers keep fp32 main copies); the
    coefficients themselves are computed in float32."""
    model = build_gpt(tiny_config(), settings("mhc")).bfloat16()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    coefficients = model.decoder.layers[0].input_layernorm.coefficients
    seen = []
    coefficients.register_forward_hook(lambda module, inputs, out: seen.append([h.dtype for h in out]))
    tokens, positions, labels = make_batch()
    loss = model(tokens, positions, None, labels=labels).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert seen == [[torch.float32] * 3]
    assert coefficients.phi.grad is not None and coefficients.phi.grad.abs().sum() > 0


def test_fp32_residual_connection():
    model = build_gpt(tiny_config(fp32_residual_connection=True), settings("mhc"))
    loss = lm_loss(model, make_batch())
    loss.backward()
    assert torch.isfinite(loss)


def test_check_finite_names_the_sublayer():
    model = build_gpt(tiny_config(), settings("mhc", check_finite=True))
    with torch.no_grad():
        model.decoder.layers[1].pre_mlp_layernorm.coefficients.phi[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite|NaN/Inf.*mHC sublayer 3"):
        lm_loss(model, make_batch())


def test_weight_decay_applies_to_phi_only():
    """megatron-core's standard overrides skip weight decay for 1-D and '*.bias' parameters:
    bias and alpha (the static mapping and the gates) are not decayed, phi is."""
    from megatron.core.optimizer import OptimizerConfig, get_standard_config_overrides

    overrides = get_standard_config_overrides(OptimizerConfig(lr=1e-3, weight_decay=0.1))
    model = build_gpt(tiny_config(), settings("mhc"))
    coeff = model.decoder.layers[0].input_layernorm.coefficients
    no_wd = {}
    for name, p in coeff.named_parameters(prefix="decoder.layers.0.input_layernorm.coefficients"):
        no_wd[name.rsplit(".", 1)[1]] = any(
            key.matches(p, name) and o.get("wd_mult") == 0.0 for key, o in overrides.items()
        )
    assert no_wd == {"phi": False, "bias": True, "alpha": True}


def test_moe_block_spec_builds_and_trains():
    from megatron.core.models.gpt import GPTModel
    from mhc_megatron.mcore.attention import SDPACoreAttention
    from mhc_megatron.mcore.specs import get_mhc_gpt_decoder_block_spec, with_core_attention

    cfg = tiny_config(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=32,
                      moe_layer_freq=[0, 1], moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=0.0,
                      add_bias_linear=False)
    spec = get_mhc_gpt_decoder_block_spec(cfg, settings("mhc"), use_transformer_engine=False)
    spec = with_core_attention(spec, SDPACoreAttention)
    torch.manual_seed(0)
    model = GPTModel(cfg, spec, vocab_size=96, max_sequence_length=16)
    assert type(model.decoder.layers[1].mlp).__name__ == "MoELayer"
    loss = lm_loss(model, make_batch())
    loss.backward()
    assert torch.isfinite(loss)
    assert model.decoder.layers[1].pre_mlp_layernorm.coefficients.phi.grad.abs().sum() > 0


def test_sharded_checkpoint_keys_match_between_local_and_fused_norm_layouts():
    model = build_gpt(tiny_config(), settings("mhc"))
    keys = {t.key for t in model.sharded_state_dict().values() if hasattr(t, "key")}
    # the inner norm keeps the key transformer-engine's fused layer-norm linear uses
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in keys
    assert "decoder.layers.input_layernorm.coefficients.phi" in keys
    assert not any("linear_qkv.layer_norm_coefficients" in k for k in keys)


def test_residual_mode_leaves_the_spec_alone():
    """Residual mode hands Megatron's spec back untouched (the very object); mhc mode installs
    ModuleSpecs of our modules in the four slots. (A spec slot holds a ModuleSpec or a builder,
    never the class itself: compare ``.module``, not the slot, with the class.)"""
    from megatron.core.transformer.spec_utils import ModuleSpec

    from mhc_megatron.mcore.specs import mhc_block_spec

    cfg = tiny_config()
    plain = _megatron_local_spec(cfg)
    assert mhc_block_spec(plain, cfg, settings("residual")) is plain
    assert local_block_spec(cfg, settings("residual")).submodules.self_attn_bda is plain.submodules.self_attn_bda
    mhc = mhc_block_spec(plain, cfg, settings("mhc"))
    sub = mhc.layer_specs[0].submodules
    for slot in ("self_attn_bda", "mlp_bda"):
        assert isinstance(getattr(sub, slot), ModuleSpec) and getattr(sub, slot).module is MHCSublayerOutput
        assert getattr(plain.submodules, slot) is not getattr(sub, slot)
    for slot in ("input_layernorm", "pre_mlp_layernorm"):
        assert getattr(sub, slot).func is MHCSublayerInput
        assert getattr(sub, slot).keywords["norm"] is getattr(plain.submodules, slot)
    # everything else is Megatron's
    for field in dataclasses.fields(sub):
        if field.name not in ("self_attn_bda", "mlp_bda", "input_layernorm", "pre_mlp_layernorm",
                              "sharded_state_dict_keys_map"):
            assert getattr(sub, field.name) == getattr(plain.submodules, field.name), field.name


def test_non_transformer_layer_spec_is_refused():
    from megatron.core.transformer.spec_utils import ModuleSpec

    @dataclasses.dataclass
    class MambaLikeSubmodules:
        mixer: object = None

    with pytest.raises(ValueError, match="mhc_hybrid_stack_spec"):
        mhc_layer_spec(ModuleSpec(module=torch.nn.Identity, submodules=MambaLikeSubmodules()), settings("mhc"), 0)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(recompute_granularity="selective", recompute_modules=["layernorm"]), "drop 'layernorm'"),
        (dict(cuda_graph_impl="local"), "CUDA graphs"),
        (dict(inference_fuse_tp_communication=True), "inference-optimized"),
        (dict(pipeline_model_parallel_size=2), "configure_pipeline"),
    ],
)
def test_incompatible_megatron_options_are_refused(overrides, match):
    cfg = tiny_config()
    for k, v in overrides.items():
        object.__setattr__(cfg, k, v)
    with pytest.raises(ValueError, match=match):
        check_transformer_config(cfg, settings("mhc"))
    check_transformer_config(cfg, settings("residual"))  # residual mode accepts anything


def test_upstream_hyper_connections_in_the_same_config_are_refused():
    """Megatron-LM main's real config field (megatron-core 0.20); 0.19 has no upstream mHC."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    if "enable_mhc_connections" not in {f.name for f in dataclasses.fields(TransformerConfig)}:
        pytest.skip("this megatron-core has no upstream mHC (enable_mhc_connections); the compat run checks it")
    cfg = tiny_config(enable_mhc_connections=True, mhc_num_residual_streams=4)
    with pytest.raises(ValueError, match="enable_mhc_connections=True.*drop --enable-mhc-connections"):
        check_transformer_config(cfg, settings("mhc"))
    with pytest.raises(ValueError, match="enable_mhc_connections=True"):
        build_gpt(cfg, settings("hc"))  # the spec builder checks it too
    check_transformer_config(cfg, settings("residual"))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(mode="nope"), "residual mode must be one of residual, hc, mhc"),
        (dict(mode="mhc", expansion_rate=0), "expansion rate must be an integer >= 1, got 0"),
        (dict(mode="mhc", sinkhorn_iters=0), "Sinkhorn iterations"),
        (dict(mode="mhc", contraction="max"), "stream contraction"),
        (dict(mode="mhc", coeff_eps=0.0), "epsilon"),
        (dict(mode="mhc", coeff_eps=float("inf")), "epsilon must be a finite value"),
        (dict(mode="mhc", check_finite="yes"), "check_finite='yes': must be True or False"),
    ],
)
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        MHCSettings(**kw)
