"""Recompute of the mHC intermediates in blocks of sublayers (docs/recompute.md).

A block of L_r consecutive sublayers keeps only its first n-stream input ``x_{l0}``. Backward
walks a block from its last sublayer; the first request rebuilds every input of the block,
``x_{l0+1}, x_{l0+2}, ...``, from ``x_{l0}`` by replaying each sublayer's post + residual step
from its kept inputs (the sublayer output ``f``, ``H_post``, ``H_res``, bias and dropout seed):
attention and the MLP are never re-run, and each post + residual step at most once (the block's
last one never: its output is not an input of the block). The rebuilt inputs are a transient of
at most ``(L_r - 1) nC`` per token, each dropped as soon as the last step that needs it has
taken it.

Two ways a step uses the chain:

* the Triton kernels (:mod:`mhc_megatron.kernels.sublayer`): the two autograd functions of a
  sublayer keep everything they need but ``x`` (the per-token coefficient floats, ``m + 1 + n``
  of them, are kept: recomputing them would re-read ``x``, nC elements, to save ``4 (m + 1 + n)``
  bytes) and take ``x`` from the chain in backward: their backward kernels run directly,
  nothing is re-run to rebuild a graph;
* the PyTorch reference and HC (no kernels): every step runs through :class:`_Recomputed`, whose
  forward builds no graph and whose backward re-runs the step with autograd.

One :class:`BlockRecompute` per block is shared by the block's sublayer modules (the spec
builder creates it); each forward pass of the block opens its own chain, so micro-batches whose
forward and backward interleave (pipeline schedules) do not share state. A block never crosses a
pipeline stage: the spec builder plans blocks per stage (or virtual chunk).
"""

from __future__ import annotations

import torch


class RecomputeChain:
    """One forward pass through one block: what it needs to rebuild the block's inputs."""

    def __init__(self, x0: torch.Tensor):
        self.x = {0: x0}  # position -> n-stream input, present while a step still needs it
        self.replays: dict[int, object] = {}  # position -> replay(x) -> the next position's input
        self.uses: dict[int, int] = {}  # position -> backward steps still to take x
        self.last_output_ptr: int | None = None
        self._rebuilt_on: dict[int, object] = {}  # position -> the CUDA stream that rebuilt it

    def register_use(self, position: int) -> None:
        self.uses[position] = self.uses.get(position, 0) + 1

    def record_post(self, position: int, replay, output: torch.Tensor) -> None:
        """``replay(x)`` recomputes ``output`` (the input of ``position + 1``) without autograd."""
        self.replays[position] = replay
        self.last_output_ptr = output.untyped_storage().data_ptr()

    def expects(self, x: torch.Tensor) -> bool:
        return x.untyped_storage().data_ptr() == self.last_output_ptr

    def take(self, position: int) -> torch.Tensor:
        """The block input at ``position`` for a backward step (rebuilt if needed)."""
        if position not in self.x:
            start = max(p for p in self.x if p < position)
            x = self.x[start]
            with torch.no_grad():
                for p in range(start, position):
                    x = self.replays[p](x)
                    self.x[p + 1] = x
                    if x.is_cuda:
                        self._rebuilt_on[p + 1] = torch.cuda.current_stream(x.device)
            for p in range(position):  # inputs below position are rebuilt or kept: drop the rest
                self.replays.pop(p, None)
        x = self.x[position]
        self.uses[position] -= 1
        if self.uses[position] == 0:
            del self.x[position]
        if x.is_cuda:  # rebuilt on one stream, maybe used on another (the high-priority post+res one)
            torch.cuda.current_stream(x.device).wait_stream(self._rebuilt_on.get(position, torch.cuda.current_stream(x.device)))
            x.record_stream(torch.cuda.current_stream(x.device))
        return x

    def source(self, position: int):
        """For a kernel step at ``position``: registers one use, returns the getter of ``x``."""
        self.register_use(position)
        return lambda: self.take(position)


class BlockRecompute:
    """Shared by the sublayer modules of one recompute block."""

    def __init__(self, block_index: int, size: int, first_sublayer: int):
        self.block_index = block_index
        self.size = size
        self.first_sublayer = first_sublayer
        self.current: RecomputeChain | None = None

    def chain_for(self, position: int, x: torch.Tensor) -> RecomputeChain:
        """Position 0 opens a new chain with ``x`` as the kept input; later positions continue
        the current one and check that ``x`` is the previous position's output."""
        if position == 0:
            self.current = RecomputeChain(x)
            return self.current
        chain = self.current
        if chain is None or not chain.expects(x):
            raise RuntimeError(
                f"mHC recompute block {self.block_index} (sublayers {self.first_sublayer}.."
                f"{self.first_sublayer + self.size - 1}): sublayer {self.first_sublayer + position} did not "
                "receive the output of the sublayer before it; the block's forward was interleaved "
                "with another one (run without --mhc-recompute, or report the schedule)"
            )
        return chain

    def __repr__(self) -> str:
        return f"BlockRecompute(block={self.block_index}, sublayers={self.first_sublayer}+{self.size})"


class _Recomputed(torch.autograd.Function):
    """``fn(x, *args)`` that keeps ``args`` (and, at position 0, ``x``) but not its own graph."""

    @staticmethod
    def forward(ctx, fn, chain: RecomputeChain, position: int, x, *args):
        ctx.fn, ctx.chain, ctx.position = fn, chain, position
        ctx.save_for_backward(*((x,) if position == 0 else ()), *args)
        chain.register_use(position)
        with torch.no_grad():
            out = fn(x, *args)
        return out

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        args = saved[1:] if ctx.position == 0 else saved
        x = ctx.chain.take(ctx.position)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            args_in = [a.detach().requires_grad_(a.requires_grad) for a in args]
            out = ctx.fn(x_in, *args_in)
            outs = out if isinstance(out, tuple) else (out,)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            wrt = [x_in] + [a for a in args_in if a.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
        it = iter(got[1:])
        arg_grads = [next(it) if a.requires_grad else None for a in args_in]
        return (None, None, None, got[0], *arg_grads)


def recomputed(fn, chain: RecomputeChain, position: int, x: torch.Tensor, *args):
    """Run one mHC step of a recompute block (see the module docstring)."""
    return _Recomputed.apply(fn, chain, position, x, *args)
