"""Megatron's schedules with the n-stream communicator: the receive buffers are n times wider and
no shape is exchanged (the real-loop PP cases run with the hand-shake forbidden)."""

import types

import pytest

from mhc_megatron.pipeline.stream_shapes import StreamShapesP2PCommunicator, with_stream_shapes


class _Group:
    def size(self):
        return 1

    def rank(self):
        return 0


def test_receive_buffers_are_n_times_wider(monkeypatch):
    import torch.distributed as dist
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    monkeypatch.setattr(dist, "get_global_rank", lambda group, rank: rank)
    seen = {}

    def communicate(self, *, tensor_shape, **kwargs):
        seen["shape"] = tensor_shape
        return None, None

    monkeypatch.setattr(P2PCommunicator, "_communicate", communicate)
    config = types.SimpleNamespace(virtual_pipeline_model_parallel_size=None, variable_seq_lengths=False)
    comm = StreamShapesP2PCommunicator(_Group(), config, expansion_rate=4)
    comm._communicate(tensor_send_next=None, tensor_send_prev=None, recv_prev=True, recv_next=False,
                      tensor_shape=(32, 2, 64))
    assert seen["shape"] == (32, 2, 256)
    comm._communicate(tensor_send_next=None, tensor_send_prev=None, recv_prev=False, recv_next=False, tensor_shape=None)
    assert seen["shape"] is None  # sends carry no shape
    with pytest.raises(ValueError, match="expansion rate"):
        StreamShapesP2PCommunicator(_Group(), config, expansion_rate=0)


def test_the_wrapper_leaves_a_callers_communicator_and_the_unpipelined_schedule_alone():
    from megatron.core.pipeline_parallel import schedules

    assert with_stream_shapes(schedules.forward_backward_no_pipelining) is schedules.forward_backward_no_pipelining
    calls = []

    def schedule(**kwargs):
        calls.append(kwargs)

    mine, groups = object(), object()
    with_stream_shapes(schedule)(model=[None], p2p_communicator=mine, pg_collection=groups, num_microbatches=2)
    assert calls == [dict(model=[None], p2p_communicator=mine, pg_collection=groups, num_microbatches=2)]
