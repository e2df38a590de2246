"""Running a kernel on a dedicated high-priority CUDA stream, with the ordering made explicit.

The mHC paper runs the MLP's post+residual kernel on its own high-priority stream so that
pipeline communication (sends that wait for its output) is not queued behind other work.
Four rules keep that safe (a public report traced diverging interleaved-pipeline mHC runs to
breaking the second one):

1. the side stream waits for the main stream before reading the inputs;
2. every input is ``record_stream``-ed on the side stream, so the caching allocator does not
   hand its memory to a main-stream allocation while the side stream may still read it;
3. the output is ``record_stream``-ed on the main stream that will use and free it;
4. the main stream waits for the side stream before anything reads the output: at once, or, with
   ``defer_join=True``, only where the output is consumed. The side stream then records an event
   that :func:`join` (called by the next mHC sublayer's input module on its input) makes the
   consuming stream wait for; until then the main stream runs ahead. A layer whose output
   leaves its block (the stage's last layer: a pipeline send, the final norm, code that is not
   ours) joins at once.

Autograd runs each backward op on the stream of its forward op and synchronises across
streams itself. On CPU tensors nothing changes: the function runs inline. The CUDA calls go
through :data:`STREAMS`, which the tests replace to watch their order on CPU.
"""

from __future__ import annotations

import torch


class CudaStreams:
    """The stream operations :func:`on_high_priority_stream` and :func:`join` use."""

    def __init__(self):
        self._side: dict[int, torch.cuda.Stream] = {}

    def applies(self, t: torch.Tensor) -> bool:
        return t.is_cuda

    def current(self, device):
        return torch.cuda.current_stream(device)

    def side(self, device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._side:
            _, highest = torch.cuda.Stream.priority_range()
            self._side[index] = torch.cuda.Stream(device=index, priority=highest)
        return self._side[index]

    def use(self, stream):
        return torch.cuda.stream(stream)

    def wait_stream(self, waiter, stream) -> None:
        waiter.wait_stream(stream)

    def record_event(self, stream):
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait_event(self, waiter, event) -> None:
        waiter.wait_event(event)

    def record_stream(self, t: torch.Tensor, stream) -> None:
        t.record_stream(stream)


STREAMS = CudaStreams()
_PENDING: dict[int, object] = {}  # storage address of a side-stream output -> its ready event


def _storage(t: torch.Tensor) -> int:
    """Views and Megatron's viewless copies of one output share its storage."""
    return t.untyped_storage().data_ptr()


def on_high_priority_stream(fn, *inputs, defer_join: bool = False):
    """``fn(*inputs)`` on the high-priority stream of the inputs' device (inline on CPU);
    ``defer_join``: the main stream waits for it only in :func:`join` (rule 4)."""
    first = next(t for t in inputs if isinstance(t, torch.Tensor))
    if not STREAMS.applies(first):
        return fn(*inputs)
    main = STREAMS.current(first.device)
    side = STREAMS.side(first.device)
    STREAMS.wait_stream(side, main)
    with STREAMS.use(side):
        out = fn(*inputs)
    for t in inputs:
        if isinstance(t, torch.Tensor):
            STREAMS.record_stream(t, side)
    STREAMS.record_stream(out, main)
    if defer_join:
        _PENDING[_storage(out)] = STREAMS.record_event(side)
    else:
        STREAMS.wait_stream(main, side)
    return out


def join(t: torch.Tensor) -> torch.Tensor:
    """Make the current stream wait for the side-stream work that produced ``t``, if any is
    still pending; returns ``t``."""
    if _PENDING and isinstance(t, torch.Tensor):
        event = _PENDING.pop(_storage(t), None)
        if event is not None:
            STREAMS.wait_event(STREAMS.current(t.device), event)
    return t


def pending() -> int:
    """How many side-stream outputs no consumer has joined yet."""
    return len(_PENDING)
