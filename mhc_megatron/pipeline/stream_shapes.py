"""Megatron's own pipeline schedules (1F1B, interleaved) carrying the n-stream residual, no host sync.

Megatron sizes the receive buffer of every stage-to-stage message as ``[s, b, hidden_size]``. The
stages of an mHC model exchange ``[s, b, n * hidden_size]``. Two ways to make the buffers fit:

* ``config.variable_seq_lengths`` (:func:`mhc_megatron.mcore.configure_pipeline`): Megatron sends
  each message's shape first; its receiver synchronises the device and reads the shape on the
  host, once per exchange. Kept for users who drive Megatron's schedules themselves;
* :class:`StreamShapesP2PCommunicator` (this module, what ``mhc-pretrain-gpt`` uses): megatron-core's
  ``P2PCommunicator`` whose receive buffers are n times wider, handed to the schedule through its
  ``p2p_communicator`` argument by hook ``pipeline-stream-shapes`` (:mod:`mhc_megatron.hooks`),
  which wraps the function ``get_forward_backward_func`` returns. The shape is known on every
  rank in advance, so nothing is exchanged and nothing waits for the host.
"""

from __future__ import annotations

import functools

from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator


class StreamShapesP2PCommunicator(P2PCommunicator):
    """megatron-core's communicator with receive buffers ``[s, b, n * hidden]``."""

    def __init__(self, pp_group, config, expansion_rate: int):
        super().__init__(pp_group, config)
        if expansion_rate < 1:
            raise ValueError(f"expansion rate must be >= 1, got {expansion_rate}")
        self.expansion_rate = expansion_rate

    def _communicate(self, *, tensor_shape, **kwargs):
        if tensor_shape is not None and len(tensor_shape):
            tensor_shape = (*tensor_shape[:-1], self.expansion_rate * tensor_shape[-1])
        return super()._communicate(tensor_shape=tensor_shape, **kwargs)


def with_stream_shapes(schedule):
    """``schedule`` (one of Megatron's pipeline schedules) with an n-stream communicator when the
    caller passes none; a call that brings its own communicator runs unchanged."""
    from megatron.core.pipeline_parallel import schedules

    if schedule is schedules.forward_backward_no_pipelining:
        return schedule

    @functools.wraps(schedule)
    def run(*, model, p2p_communicator=None, pg_collection=None, **kwargs):
        if p2p_communicator is None and pg_collection is None:
            from megatron.core import parallel_state
            from megatron.core.process_groups_config import ProcessGroupCollection
            from megatron.core.utils import get_model_config

            from ..mcore.sublayer import streams_of

            chunks = model if isinstance(model, list) else [model]
            p2p_communicator = StreamShapesP2PCommunicator(
                parallel_state.get_pipeline_model_parallel_group(), get_model_config(chunks[0]), streams_of(chunks)
            )
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        return schedule(model=model, p2p_communicator=p2p_communicator, pg_collection=pg_collection, **kwargs)

    return run


def get_forward_backward_func_hook(original, context=None):
    """Hook ``pipeline-stream-shapes``: ``get_forward_backward_func`` returning the wrapped schedule."""

    @functools.wraps(original)
    def get_forward_backward_func(*args, **kwargs):
        return with_stream_shapes(original(*args, **kwargs))

    return get_forward_backward_func
