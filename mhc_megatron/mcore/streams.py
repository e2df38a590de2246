"""Running a kernel on a dedicated high-priority CUDA stream, with the ordering made explicit.

The mHC paper runs the MLP's post+residual kernel on its own high-priority stream so that
pipeline communication (sends that wait for its output) is not queued behind other work.
Three rules keep that safe (a public report traced diverging interleaved-pipeline mHC runs to
breaking the second one):

1. the side stream waits for the main stream before reading the inputs;
2. every input is ``record_stream``-ed on the side stream, so the caching allocator does not
   hand its memory to a main-stream allocation while the side stream may still read it;
3. the main stream waits for the side stream before anything consumes the output, and the
   output is ``record_stream``-ed on the main stream that will use and free it.

Autograd runs each backward op on the stream of its forward op and synchronises across
streams itself. On CPU tensors nothing changes: the function runs inline.
"""

from __future__ import annotations

import torch

_STREAMS: dict[int, "torch.cuda.Stream"] = {}


def high_priority_stream(device: torch.device) -> "torch.cuda.Stream":
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _, highest = torch.cuda.Stream.priority_range()
        _STREAMS[index] = torch.cuda.Stream(device=index, priority=highest)
    return _STREAMS[index]


def on_high_priority_stream(fn, *inputs):
    """``fn(*inputs)`` on the high-priority stream of the inputs' device (inline on CPU)."""
    first = next(t for t in inputs if isinstance(t, torch.Tensor))
    if not first.is_cuda:
        return fn(*inputs)
    main = torch.cuda.current_stream(first.device)
    side = high_priority_stream(first.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out = fn(*inputs)
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t.record_stream(side)
    main.wait_stream(side)
    out.record_stream(main)
    return out
