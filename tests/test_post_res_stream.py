"""The MLP post+residual on a dedicated high-priority CUDA stream."""

import contextlib

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


class RecordingStreams:
    """Stands in for the CUDA stream calls on CPU tensors and logs them in order."""

    def __init__(self, log):
        self.log, self.events = log, 0

    def applies(self, t):
        return True

    def current(self, device):
        return "main"

    def side(self, device):
        return "side"

    @contextlib.contextmanager
    def use(self, stream):
        self.log.append(("enter", stream))
        yield
        self.log.append(("exit", stream))

    def wait_stream(self, waiter, stream):
        self.log.append(("wait_stream", waiter, stream))

    def record_event(self, stream):
        self.events += 1
        self.log.append(("record_event", stream, self.events))
        return self.events

    def wait_event(self, waiter, event):
        self.log.append(("wait_event", waiter, event))

    def record_stream(self, t, stream):
        self.log.append(("record_stream", stream))


def _stream_log(model, batch, monkeypatch):
    from mhc_megatron.mcore import streams
    from mhc_megatron.mcore.sublayer import MHCStreamContraction, MHCSublayerInput

    log = []
    monkeypatch.setattr(streams, "STREAMS", RecordingStreams(log))
    for name, module in model.named_modules():
        if isinstance(module, (MHCSublayerInput, MHCStreamContraction)):
            module.register_forward_pre_hook(lambda m, args, name=name: log.append(("reads", name)))
    loss = lm_loss(model, batch)
    assert streams.pending() == 0  # every deferred output was joined
    return loss, log


def test_the_main_stream_waits_for_the_post_residual_only_where_the_next_layer_reads_it(monkeypatch):
    """Three layers: layers 0 and 1 hand their MLP output to the next layer's attention input,
    which joins the side stream's event; the block's last layer joins at once (its output
    leaves the block). Inputs are recorded on the side stream, the output on the main one."""
    model = build_gpt(tiny_config(num_layers=3), MHCSettings(mode="mhc", expansion_rate=4, post_res_stream=True))
    _, log = _stream_log(model, make_batch(seed=3), monkeypatch)
    side_runs = [i for i, e in enumerate(log) if e == ("enter", "side")]
    assert len(side_runs) == 3  # the MLP post+res of each layer, nothing else
    for layer, start in enumerate(side_runs):
        assert log[start - 1] == ("wait_stream", "side", "main")  # rule 1: inputs are ready
        end = log.index(("exit", "side"), start)
        after = log[end + 1 :]
        inputs = 4  # x, F, H_post, H_res
        assert after[:inputs + 1] == [("record_stream", "side")] * inputs + [("record_stream", "main")]
        if layer < 2:
            event = next(e for e in after if e[0] == "record_event")
            assert event[1] == "side"
            reads = after.index(("reads", f"decoder.layers.{layer + 1}.input_layernorm"))
            waits = after.index(("wait_event", "main", event[2]))
            # the join comes right where the next layer reads, and not before
            assert waits == reads + 1
            assert ("wait_stream", "main", "side") not in after[:reads]
        else:
            assert after[inputs + 1] == ("wait_stream", "main", "side")
            assert after.index(("wait_stream", "main", "side")) < after.index(("reads", "decoder.final_layernorm"))


def test_the_stream_option_gives_the_same_loss_and_gradients(monkeypatch):
    cfg = tiny_config(num_layers=3)
    batch = make_batch(seed=3)
    results = []
    for stream in (False, True):
        model = build_gpt(cfg, MHCSettings(mode="mhc", expansion_rate=4, post_res_stream=stream), seed=7)
        loss, log = _stream_log(model, batch, monkeypatch)
        assert any(e[0] == "enter" for e in log) == stream
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
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
