"""Multi-token prediction on an mHC model: the MTP block runs residual layers on the contracted
decoder output, leaves the main loss untouched, and trains."""

import pytest
import torch

from mcore_helpers import SEQ, VOCAB, local_block_spec, make_batch, tiny_config
from mhc_megatron.mcore import MHCSettings

pytestmark = pytest.mark.usefixtures("megatron_world")


def _model(settings, mtp: bool, seed=3):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec

    from mhc_megatron.mcore.attention import SDPACoreAttention
    from mhc_megatron.mcore.specs import with_core_attention

    cfg = tiny_config(num_layers=2, mtp_num_layers=1 if mtp else None)
    residual_layer = with_core_attention(get_gpt_layer_local_spec(normalization="RMSNorm"), SDPACoreAttention)
    mtp_spec = get_gpt_mtp_block_spec(cfg, residual_layer, use_transformer_engine=False) if mtp else None
    torch.manual_seed(seed)
    return GPTModel(cfg, local_block_spec(cfg, settings), vocab_size=VOCAB, max_sequence_length=SEQ,
                    mtp_block_spec=mtp_spec, position_embedding_type="none")


@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_mtp_trains_on_top_of_the_mhc_decoder(mode):
    settings = MHCSettings(mode=mode, expansion_rate=4)
    with_mtp, without = _model(settings, True), _model(settings, False)
    without.load_state_dict({k: v for k, v in with_mtp.state_dict().items() if not k.startswith("mtp.")})
    tokens, positions, labels = make_batch(seed=1)
    main = with_mtp(tokens, positions, None, labels=labels).float().mean()
    torch.testing.assert_close(main, without(tokens, positions, None, labels=labels).float().mean())
    main.backward()  # MTP's loss joins the gradients through Megatron's MTPLossAutoScaler
    grads = {n: p.grad for n, p in with_mtp.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert any(n.startswith("mtp.") and g.abs().sum() > 0 for n, g in grads.items())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".coefficients.phi" in n)
    opt = torch.optim.AdamW(with_mtp.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):  # the same batch: the loss must go down
        opt.zero_grad()
        loss = with_mtp(tokens, positions, None, labels=labels).float().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
