"""Counting the memory traffic and the launches of a piece of PyTorch + Triton code, on CPU.

Under Triton's interpreter (``TRITON_INTERPRET=1``) every ``tl.load`` / ``tl.store`` of a kernel
goes through the interpreter's builder with the element addresses and the mask of the lanes.
:class:`TrafficCounter` wraps those builder methods and the kernel launch itself, so each launch
is recorded with the bytes its active (unmasked) lanes load and store: *requested* (every lane of
every program, what the kernel asks of the memory system, L2 hits included) and *unique* (distinct
addresses, the compulsory traffic a perfect cache would still move to and from HBM). Every other
operator on the path is seen by a ``TorchDispatchMode``: each aten op that runs a kernel (views,
allocations and metadata changes do not) is one launch that reads its tensor inputs and writes its
tensor outputs once.

Nothing here estimates: the numbers are counted from the code that ran. They say nothing about
time; a GPU run measures that.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

# aten ops that launch nothing: allocation and metadata only (views are recognised by schema)
_NO_KERNEL = {
    aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
    aten.new_empty_strided.default, aten._unsafe_view.default, aten.lift_fresh.default, aten.set_.source_Storage,
    aten.set_.source_Storage_storage_offset, aten.resize_.default, aten.detach_.default,
    aten.is_same_size.default, aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
}
# ops whose first argument is only written, never read
_WRITE_ONLY_SELF = {
    "fill_", "zero_", "copy_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_", "geometric_",
    "cauchy_", "log_normal_",
}


@dataclass
class ArgTraffic:
    read_requested: int = 0
    read_unique: int = 0
    write_requested: int = 0
    write_unique: int = 0


@dataclass
class Launch:
    """One kernel launch: a Triton kernel or one aten op."""

    name: str
    kind: str  # "triton" or "torch"
    phase: str
    read_requested: int
    read_unique: int
    write_requested: int
    write_unique: int
    args: dict[str, ArgTraffic] = field(default_factory=dict)  # per kernel argument (Triton)

    @property
    def requested(self) -> int:
        return self.read_requested + self.write_requested

    @property
    def unique(self) -> int:
        return self.read_unique + self.write_unique


class _LaunchRecord:
    """Addresses touched by one interpreted Triton launch, mapped to the kernel's arguments."""

    def __init__(self, name: str, arg_names, args_dev):
        self.name = name
        self.reads: list[tuple[np.ndarray, int]] = []
        self.writes: list[tuple[np.ndarray, int]] = []
        spans = []
        for arg_name, arg in zip(arg_names, args_dev):
            t = getattr(arg, "base", arg)  # TensorWrapper
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                spans.append((s.data_ptr(), s.data_ptr() + s.nbytes(), arg_name))
        spans.sort()
        self.starts = np.array([s[0] for s in spans], dtype=np.uint64)
        self.ends = np.array([s[1] for s in spans], dtype=np.uint64)
        self.arg_names = [s[2] for s in spans]

    def add(self, which: str, ptrs, mask) -> None:
        addresses = np.asarray(ptrs.data)
        active = np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)
        itemsize = np.dtype(_np_dtype(ptrs.get_element_ty())).itemsize
        (self.reads if which == "read" else self.writes).append((addresses[active].astype(np.uint64), itemsize))

    def _arg_index(self, addresses: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.starts, addresses, side="right") - 1
        bad = (idx < 0) | (addresses >= self.ends[np.clip(idx, 0, None)])
        if bad.any():
            raise RuntimeError(
                f"{self.name}: {int(bad.sum())} accesses fall outside every tensor argument (out-of-bounds "
                "lanes that a mask should have switched off)"
            )
        return idx

    def finish(self, phase: str) -> Launch:
        args = {name: ArgTraffic() for name in self.arg_names}
        totals = {}
        for which, accesses in (("read", self.reads), ("write", self.writes)):
            requested = unique = 0
            for itemsize in sorted({size for _, size in accesses}):
                addresses = np.concatenate([a for a, size in accesses if size == itemsize])
                distinct = np.unique(addresses)
                requested += addresses.size * itemsize
                unique += distinct.size * itemsize
                for counts, attr in ((addresses, "requested"), (distinct, "unique")):
                    per_arg = np.bincount(self._arg_index(counts), minlength=len(self.arg_names))
                    for name, count in zip(self.arg_names, per_arg):
                        key = f"{which}_{attr}"
                        setattr(args[name], key, getattr(args[name], key) + int(count) * itemsize)
            totals[which] = (requested, unique)
        args = {k: v for k, v in args.items() if v.read_requested or v.write_requested}
        return Launch(self.name, "triton", phase, *totals["read"], *totals["write"], args)


def _np_dtype(tt_dtype):
    from triton.runtime.interpreter import _get_np_dtype

    return _get_np_dtype(tt_dtype)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _AtenCounter(TorchDispatchMode):
    def __init__(self, counter: "TrafficCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        c = self.counter
        if c._phase is None or c._paused or c._in_launch or func.is_view or func in _NO_KERNEL:
            return out
        inputs = tree_leaves((args, kwargs))
        name = func.overloadpacket.__name__
        if name in _WRITE_ONLY_SELF or name.endswith("_like"):  # *_like reads only the shape
            inputs = inputs[1:] if inputs and isinstance(inputs[0], torch.Tensor) else inputs
        seen = set()
        read = 0
        for t in inputs:
            if isinstance(t, torch.Tensor):
                key = (t.data_ptr(), t.shape, t.stride(), t.dtype)
                if key not in seen:
                    seen.add(key)
                    read += _tensor_bytes(t)
        write = sum(_tensor_bytes(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        c.launches.append(Launch(f"aten.{name}", "torch", c._phase, read, read, write, write))
        return out


class TrafficCounter:
    """Context manager: record every launch made inside :meth:`phase` blocks (see module doc)."""

    def __init__(self):
        self.launches: list[Launch] = []
        self._phase: str | None = None
        self._paused = 0
        self._in_launch = 0
        self._current: _LaunchRecord | None = None
        self._restore = []

    # --- what the measured code calls -------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self._phase = self._phase, name
        try:
            yield self
        finally:
            self._phase = previous

    @contextlib.contextmanager
    def paused(self):
        """Launches in here are not counted (the opaque sublayer function F)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    # --- patching the interpreter -----------------------------------------------------------
    def __enter__(self):
        from ..kernels import interpreting

        if not interpreting():
            raise RuntimeError(
                "counting memory traffic needs Triton's CPU interpreter: set TRITON_INTERPRET=1 before "
                "triton is imported (mhc-megatron bench traffic does this itself)"
            )
        from triton.runtime import interpreter as ti

        builder = ti.InterpreterBuilder
        counter = self

        def patch(owner, name, wrapper):
            original = getattr(owner, name)
            setattr(owner, name, wrapper(original))
            self._restore.append((owner, name, original))

        def counted_load(original):
            def load(b, ptrs, mask, other, *rest):
                if counter._current is not None:
                    counter._current.add("read", ptrs, mask)
                return original(b, ptrs, mask, other, *rest)
            return load

        def counted_store(original):
            def store(b, ptrs, value, mask, *rest):
                if counter._current is not None:
                    counter._current.add("write", ptrs, mask)
                return original(b, ptrs, value, mask, *rest)
            return store

        def counted_rmw(original):
            def rmw(b, op, ptr, val, mask, *rest):
                if counter._current is not None:
                    counter._current.add("read", ptr, mask)
                    counter._current.add("write", ptr, mask)
                return original(b, op, ptr, val, mask, *rest)
            return rmw

        def refused(original):
            def fn(b, *args, **kwargs):
                if counter._current is not None:
                    raise NotImplementedError(
                        f"{counter._current.name}: the traffic counter does not count block-pointer, "
                        "descriptor or compare-and-swap memory ops"
                    )
                return original(b, *args, **kwargs)
            return fn

        def counted_launch(original):
            def call(executor, *args_dev, **kwargs):
                if counter._phase is None or counter._paused:
                    counter._in_launch += 1
                    try:
                        return original(executor, *args_dev, **kwargs)
                    finally:
                        counter._in_launch -= 1
                names = list(executor.arg_names)
                values = list(args_dev) + [kwargs[n] for n in names[len(args_dev):] if n in kwargs]
                record = _LaunchRecord(executor.fn.__name__, names, values)
                counter._current, counter._in_launch = record, counter._in_launch + 1
                try:
                    original(executor, *args_dev, **kwargs)
                finally:
                    counter._current, counter._in_launch = None, counter._in_launch - 1
                counter.launches.append(record.finish(counter._phase))
            return call

        patch(builder, "create_masked_load", counted_load)
        patch(builder, "create_masked_store", counted_store)
        patch(builder, "create_atomic_rmw", counted_rmw)
        for name in ("create_atomic_cas", "create_tensor_pointer_load", "create_tensor_pointer_store",
                     "create_descriptor_load", "create_descriptor_store"):
            patch(builder, name, refused)
        patch(ti.GridExecutor, "__call__", counted_launch)
        self._mode = _AtenCounter(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore.clear()
        return False
