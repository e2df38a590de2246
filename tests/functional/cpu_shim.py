"""Test-only shim that lets Megatron's real training loop (``pretrain()``) run on a CPU.

Megatron-LM assumes a CUDA device throughout ``megatron.training``; none of it is needed for the
maths. Installed in a launched process (never imported by ``mhc_megatron``), this shim redirects
exactly these things, and nothing in the product branches on it:

Device arguments (a ``torch.overrides.TorchFunctionMode``, active for the whole process):
  * every ``device=`` keyword naming CUDA (``"cuda"``, ``"cuda:N"``, a CUDA ``torch.device``, a bare
    int index) becomes the CPU; so do the positional devices of ``Tensor.to``;
  * ``Tensor.cuda()`` and ``Tensor.pin_memory()`` return the tensor itself; ``Tensor.record_stream``
    does nothing (the streams below are inert);
  * ``Tensor.type()`` (no argument) answers the CUDA type name (``torch.cuda.FloatTensor``...): the
    optimizer wrappers and gradient clipping assert it, so clipping and bf16 stay on.

``torch.cuda`` (Megatron asks it for a device, streams, memory statistics and RNG state):
  * ``is_available`` -> True, ``device_count`` -> 1, ``current_device`` -> 0, ``set_device``,
    ``synchronize``, ``empty_cache``, ``reset_peak_memory_stats``: nothing;
  * ``Stream``/``Event``/``current_stream``/``default_stream``/``stream``: inert objects (work is
    synchronous on the CPU);
  * ``memory_allocated``/``max_memory_allocated``/``memory_reserved``/``max_memory_reserved`` -> 0,
    ``memory_stats`` -> {}, ``mem_get_info`` -> (0, 0), ``get_device_name`` -> "cpu-shim",
    ``get_device_properties`` -> an object with the fields Megatron reads;
  * ``get_rng_state``/``set_rng_state``/``manual_seed``/``manual_seed_all``/``initial_seed``: the CPU
    generator's (Megatron seeds "the CUDA generator"; its dropout then draws from the CPU one);
  * ``is_current_stream_capturing`` -> False (also in ``torch.cuda.graphs``; Adam's step asks it).

megatron-core's own CUDA-only spots (as in ``tests/mcore_helpers.py``): ``GlobalMemoryBuffer.get_tensor``,
``CudaRNGStatesTracker.fork`` and the tracker's RNG-state getters (a per-name CUDA generator), the
MoE router's ``gating``, the sequence-parallel gather/scatter mappings, MTP's loss log buffer; and
``WrappedTorchNorm`` (the local spec's norm) accepts ``--sequence-parallel`` and marks its weights
``sequence_parallel``, as transformer-engine's norm does on a GPU; a core attention built for
multi-latent attention (``k_channels``/``v_channels``, which megatron-core's local
``DotProductAttention`` does not take) is the product's portable ``SDPACoreAttention``.

megatron-core's alltoall MoE dispatcher turns its split sizes into host arrays as it does for CUDA
tensors (gloo's all-to-all takes no tensor split sizes).

One check: Megatron's pipeline shape hand-shake (``P2PCommunicator._communicate_shapes``, used with
``variable_seq_lengths``) raises, so a launch that falls back to it fails.

Environment: ``TORCHDYNAMO_DISABLE=1`` (Megatron's JIT warm-up and ``torch.compile``'d pieces need a
compiler toolchain for CUDA). The launching entry initialises gloo before ``pretrain()``, which then
skips its own NCCL initialisation.
"""

from __future__ import annotations

import contextlib
import os
import types

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}


def _is_cuda_device(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True  # a bare index means a CUDA device
    if isinstance(value, str):
        return value.startswith("cuda")
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return False


class CudaToCpu(TorchFunctionMode):
    """Device arguments naming CUDA become the CPU (see the module docstring)."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.record_stream:  # the streams are inert: nothing to order
            return None
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _TYPE_NAMES.get(name, name)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to:
            args = tuple(_CPU if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


class _InertStream(torch.Stream):
    """A CPU ``torch.Stream`` (so tensor methods taking a stream accept it) that orders nothing."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls, device="cpu")

    def __init__(self, *args, **kwargs):
        self._priority = kwargs.get("priority", 0)

    @property
    def priority(self):
        return self._priority

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _InertEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    @staticmethod
    def priority_range():
        return (0, -1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _InertEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _properties(*args, **kwargs):
    return types.SimpleNamespace(
        name="cpu-shim", total_memory=0, major=9, minor=0, multi_processor_count=1,
        gcnArchName="", L2_cache_size=0,
    )


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    gen = torch.random.default_generator

    def nothing(*args, **kwargs):
        return None

    stubs = dict(
        is_available=lambda: True,
        device_count=lambda: 1,
        current_device=lambda: 0,
        set_device=nothing,
        synchronize=nothing,
        empty_cache=nothing,
        reset_peak_memory_stats=nothing,
        reset_max_memory_allocated=nothing,
        Stream=_InertStream,
        Event=_InertEvent,
        current_stream=lambda *a, **k: _InertStream(),
        default_stream=lambda *a, **k: _InertStream(),
        stream=lambda *a, **k: contextlib.nullcontext(),
        set_stream=nothing,
        memory_allocated=lambda *a, **k: 0,
        max_memory_allocated=lambda *a, **k: 0,
        memory_reserved=lambda *a, **k: 0,
        max_memory_reserved=lambda *a, **k: 0,
        memory_stats=lambda *a, **k: {},
        mem_get_info=lambda *a, **k: (0, 0),
        get_device_name=lambda *a, **k: "cpu-shim",
        get_device_properties=_properties,
        get_device_capability=lambda *a, **k: (9, 0),
        get_rng_state=lambda *a, **k: gen.get_state(),
        set_rng_state=lambda state, *a, **k: gen.set_state(state),
        manual_seed=nothing,  # torch.manual_seed seeds the CPU generator, which is all there is
        manual_seed_all=nothing,
        initial_seed=lambda: gen.initial_seed(),
        is_current_stream_capturing=lambda: False,
    )
    for name, fn in stubs.items():
        setattr(cuda, name, _distinct(fn, name))
    cuda.graphs.is_current_stream_capturing = _distinct(stubs["is_current_stream_capturing"], "graphs")


def _distinct(fn, name):
    """A function object of its own per name: torch._dynamo's trace rules refuse one object
    registered under two names."""
    if isinstance(fn, type):
        return fn

    def stub(*args, **kwargs):
        return fn(*args, **kwargs)

    stub.__name__ = stub.__qualname__ = name
    return stub


def _sequence_parallel_torch_norm() -> None:
    """megatron-core's TE-free norm (``WrappedTorchNorm``, the local spec's) refuses sequence
    parallelism; transformer-engine's, which GPU runs use, accepts it and marks its weights so
    that their gradients are all-reduced over the tensor-parallel group. Do the same here."""
    from megatron.core.transformer import torch_norm

    original = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        sp = config.sequence_parallel
        config.sequence_parallel = False
        try:
            norm = original(cls, config, hidden_size, eps, **kwargs)
        finally:
            config.sequence_parallel = sp
        for p in norm.parameters():
            p.sequence_parallel = sp
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(__new__)


def _portable_mla_core_attention() -> None:
    """megatron-core 0.19.2's local ``DotProductAttention`` cannot build multi-latent attention (it
    takes no ``k_channels``/``v_channels``; GPU runs use transformer-engine's). Where a core attention
    is built with them, build the product's portable ``SDPACoreAttention`` instead."""
    from megatron.core.models import backends
    from megatron.core.transformer import dot_product_attention
    from megatron.training.models import gpt

    from mhc_megatron.mcore.attention import SDPACoreAttention

    local = dot_product_attention.DotProductAttention

    class CoreAttention:
        def __new__(cls, *args, k_channels=None, v_channels=None, **kwargs):
            if k_channels is None and v_channels is None:
                return local(*args, **kwargs)
            return SDPACoreAttention(*args, k_channels=k_channels, v_channels=v_channels, **kwargs)

    dot_product_attention.DotProductAttention = CoreAttention
    backends.DotProductAttention = CoreAttention
    gpt.MCoreDotProductAttention = CoreAttention


def _moe_split_sizes_on_the_host() -> None:
    """megatron-core's alltoall token dispatcher moves its split sizes to the host (numpy) only
    from CUDA tensors; on the CPU they stay tensors, which gloo's ``all_to_all_single`` refuses.
    Convert them as the dispatcher does on a GPU."""
    from megatron.core.transformer.moe import token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.numpy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _forbid_shape_handshakes() -> None:
    """A check, not a redirection: Megatron's per-message shape hand-shake (``variable_seq_lengths``,
    a device sync and a host read per stage exchange) must not happen; mhc-pretrain-gpt's
    communicator knows the n-stream shapes in advance."""
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    def _communicate_shapes(self, *args, **kwargs):
        raise AssertionError("[cpu-shim] a pipeline shape hand-shake ran (variable_seq_lengths)")

    P2PCommunicator._communicate_shapes = _communicate_shapes


def _patch_megatron_core() -> None:
    import sys

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if here not in sys.path:
        sys.path.insert(0, here)
    from mcore_helpers import cpu_redirected

    # a launched process is redirected for its whole life (install() is its first statement); the
    # context is kept referenced: a collected generator context would restore the originals
    global _REDIRECTED
    _REDIRECTED = cpu_redirected()
    _REDIRECTED.__enter__()
    _sequence_parallel_torch_norm()
    _portable_mla_core_attention()
    _forbid_shape_handshakes()
    _moe_split_sizes_on_the_host()


_MODE: CudaToCpu | None = None
_REDIRECTED = None  # mcore_helpers.cpu_redirected(), entered for the process's life


def install() -> None:
    """Install every redirection for the rest of this process (idempotent)."""
    global _MODE
    if _MODE is not None:
        return
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    _patch_torch_cuda()
    _patch_megatron_core()
    _MODE = CudaToCpu()
    _MODE.__enter__()
