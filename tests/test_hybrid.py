"""mHC in megatron-core's HybridModel: the pattern '*-*-' computes what the GPT model does."""

import dataclasses

import pytest
import torch

from mcore_helpers import SEQ, VOCAB, local_block_spec, make_batch, tiny_config
from mhc_megatron.mcore import MHCSettings
from mhc_megatron.mcore.hybrid import mhc_hybrid_stack_spec

pytestmark = pytest.mark.usefixtures("megatron_world")


def _local_stack_spec():
    from mhc_megatron.mcore.attention import SDPACoreAttention
    from mhc_megatron.mcore.hybrid import local_hybrid_stack_spec

    return local_hybrid_stack_spec(SDPACoreAttention)


def _hybrid(settings, pattern="*-*-"):
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    cfg = tiny_config(num_layers=len(pattern))
    return HybridModel(cfg, mhc_hybrid_stack_spec(_local_stack_spec(), settings, pattern), vocab_size=VOCAB,
                       max_sequence_length=SEQ, hybrid_layer_pattern=pattern, position_embedding_type="none",
                       share_embeddings_and_output_weights=False)


def _gpt(settings):
    from megatron.core.models.gpt import GPTModel

    cfg = tiny_config(num_layers=2)
    return GPTModel(cfg, local_block_spec(cfg, settings), vocab_size=VOCAB, max_sequence_length=SEQ,
                    position_embedding_type="none", share_embeddings_and_output_weights=False)


def _gpt_name_in_hybrid(name: str) -> str:
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        i, rest = int(parts[2]), parts[3:]
        mlp_side = rest[0] in ("pre_mlp_layernorm", "mlp")
        return ".".join(["decoder", "layers", str(2 * i + mlp_side), *rest])
    if name.startswith("decoder.final_layernorm."):
        return name.replace("decoder.final_layernorm.norm.", "decoder.final_norm.").replace(
            "decoder.final_layernorm.", "decoder.final_norm.")
    return name


@pytest.mark.parametrize("mode", ["mhc", "hc", "residual"])
def test_hybrid_pattern_computes_what_the_gpt_model_does(mode):
    settings = MHCSettings(mode=mode, expansion_rate=4, res_init_diag=2.0)
    torch.manual_seed(0)
    gpt = _gpt(settings)
    hybrid = _hybrid(settings)
    gpt_state = gpt.state_dict()
    hybrid_state = hybrid.state_dict()
    mapped = {_gpt_name_in_hybrid(k): v for k, v in gpt_state.items() if not k.endswith("_extra_state")}
    missing = [k for k in hybrid_state if not k.endswith("_extra_state") and k not in mapped]
    assert not missing, missing
    hybrid.load_state_dict({**hybrid_state, **{k: v for k, v in mapped.items() if k in hybrid_state}})
    tokens, positions, labels = make_batch(seed=9)
    losses = []
    for model in (gpt, hybrid):
        loss = model(tokens, positions, None, labels=labels).float().mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    hybrid_grads = dict(hybrid.named_parameters())
    for name, p in gpt.named_parameters():
        torch.testing.assert_close(hybrid_grads[_gpt_name_in_hybrid(name)].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_layers_mhc_cannot_wrap_are_refused():
    settings = MHCSettings(mode="mhc")
    with pytest.raises(ValueError, match=r"'M' \(Mamba\)"):
        mhc_hybrid_stack_spec(_local_stack_spec(), settings, "M*M-")
    with pytest.raises(ValueError, match="multi-token prediction"):
        mhc_hybrid_stack_spec(_local_stack_spec(), settings, "*-*-/*-")


def test_pipeline_bars_are_layers_of_one_stack():
    model = _hybrid(MHCSettings(mode="mhc", expansion_rate=2), pattern="*-*-")
    kinds = [type(layer.input_layernorm).__name__ if i % 2 == 0 else type(layer.pre_mlp_layernorm).__name__
             for i, layer in enumerate(model.decoder.layers)]
    assert kinds == ["MHCSublayerInput"] * 4
    assert model.decoder.layers[0].input_layernorm.expand_input
    assert model.decoder.layers[-1].mlp_bda.contraction == "mean"
    assert model.decoder.layers[1].mlp_bda.contraction is None


def test_moe_layers_of_a_pattern_are_mhc_sublayers():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import MoETransformerLayer

    moe_full = get_gpt_layer_local_spec(num_experts=4, normalization="RMSNorm")
    moe = ModuleSpec(module=MoETransformerLayer, submodules=dataclasses.replace(
        moe_full.submodules, input_layernorm=IdentityOp, self_attention=IdentityOp, self_attn_bda=IdentityFuncOp))
    stack = _local_stack_spec()
    stack = dataclasses.replace(stack, submodules=dataclasses.replace(stack.submodules, moe_layer=moe))
    cfg = tiny_config(num_layers=4, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                      moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=0.0, add_bias_linear=False)
    pattern = "*E*-"
    torch.manual_seed(0)
    model = HybridModel(cfg, mhc_hybrid_stack_spec(stack, MHCSettings(mode="mhc"), pattern), vocab_size=VOCAB,
                        max_sequence_length=SEQ, hybrid_layer_pattern=pattern, position_embedding_type="none")
    assert type(model.decoder.layers[1].mlp).__name__ == "MoELayer"
    tokens, positions, labels = make_batch(seed=2)
    loss = model(tokens, positions, None, labels=labels).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert model.decoder.layers[1].pre_mlp_layernorm.coefficients.phi.grad.abs().sum() > 0


def test_the_builder_builds_each_position_of_the_pattern():
    """One spec per layer type; the builder decides per ``layer_number`` (first expands, last
    contracts) and builds megatron-core's own layer class, not a wrapper."""
    from megatron.core.ssm.mlp_layer import MLPLayer

    from mhc_megatron.mcore.hybrid import BuildWithBuilder, HybridLayerBuilder

    settings = MHCSettings(mode="mhc", expansion_rate=2)
    stack = _local_stack_spec()
    entry = mhc_hybrid_stack_spec(stack, settings, "*-*-").submodules.mlp_layer
    assert entry.module is BuildWithBuilder
    builder = entry.params["builder"]
    assert builder == HybridLayerBuilder(stack.submodules.mlp_layer, settings, "mlp", 4)
    assert [builder.spec(i).submodules.mlp_bda.params["contract"] for i in (2, 4)] == [False, True]
    attention = HybridLayerBuilder(stack.submodules.attention_layer, settings, "attention", 4)
    assert [attention.spec(i).submodules.input_layernorm.keywords["expand_input"] for i in (1, 3)] == [True, False]
    layer = BuildWithBuilder(config=tiny_config(num_layers=4), layer_number=4, builder=builder)
    assert type(layer) is MLPLayer and layer.layer_number == 4
    assert layer.mlp_bda.contraction == "mean"
