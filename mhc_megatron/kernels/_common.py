"""What every kernel module shares: Triton availability, supported inputs, launch helpers."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

SUPPORTED_STREAMS = (1, 2, 4, 8)


def num_coefficients(n: int) -> int:
    """Number of coefficient logits per token: n (pre) + n (post) + n*n (res)."""
    return n * n + 2 * n
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: SMs assumed under the interpreter: an H200's, so that CPU runs (tests, ``bench traffic``) make
#: the same launches, with the same token splits, as the GPU they stand in for.
INTERPRETER_SMS = 132


@contextlib.contextmanager
def interpreter_sms(count: int):
    """Within ``with``, the interpreter assumes ``count`` SMs (the launches' token splits follow)."""
    global INTERPRETER_SMS
    saved, INTERPRETER_SMS = INTERPRETER_SMS, count
    try:
        yield
    finally:
        INTERPRETER_SMS = saved


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Triton's CPU interpreter (``TRITON_INTERPRET=1``) runs kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unsupported_reason(*tensors: torch.Tensor, n: int | None = None) -> str | None:
    """Why the Triton kernels cannot take these inputs, or ``None`` if they can."""
    if not triton_available():
        return "triton is not installed"
    for t in tensors:
        if t.device.type != "cuda" and not (interpreting() and t.device.type == "cpu"):
            return f"the kernels run on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), got {t.device}"
        if t.dtype not in SUPPORTED_DTYPES and t.dtype != torch.float64:
            return f"unsupported dtype {t.dtype}"
        if t.dtype == torch.float64:
            return "float64 is reference-only (the kernels compute in float32)"
    if n is not None and n not in SUPPORTED_STREAMS:
        return f"the kernels support n in {SUPPORTED_STREAMS}, got n={n}"
    return None


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def _no_timing(kernel_call, quantiles):
    """The interpreter's 'benchmark': nothing runs, every config ties, the first one wins."""
    return [1.0 for _ in quantiles]


def _quick_timing(kernel_call, quantiles):
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def autotune(configs, key, prune, restore_value=()):
    """``@triton.autotune`` over ``configs``, keyed by ``key`` (Triton adds the dtypes of the
    tensor arguments, so the cache is per (n, C, dtype)), with ``prune(configs, named_args)``
    dropping the configs that do not fit the shape before anything is timed, and a short timing
    (5 ms warm-up, 20 ms) so the first call of a shape stays short. ``restore_value``: the
    arguments a launch accumulates into, restored after every timed run. Under the interpreter
    nothing is timed: the first config that survives pruning runs."""
    import triton

    def early_prune(cfgs, named_args, **kwargs):
        return prune(cfgs, {**named_args, **kwargs})

    return triton.autotune(
        configs=configs, key=list(key), prune_configs_by={"early_config_prune": early_prune},
        restore_value=list(restore_value) or None, do_bench=_no_timing if interpreting() else _quick_timing,
    )


def fit_block_c(configs, C: int, name: str = "BLOCK_C"):
    """Configs whose C-tile is no wider than C needs (the narrowest one if none is)."""
    cap = next_pow2(C)
    fitting = [c for c in configs if c.kwargs[name] <= cap]
    return fitting or [min(configs, key=lambda c: c.kwargs[name])]
