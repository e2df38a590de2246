"""Compile every kernel for a GPU architecture without a GPU, as it is launched, and report
registers and spills.

Triton can lower a kernel all the way to a cubin for a given target on any machine (the wheel
ships ``ptxas``). This catches what the CPU interpreter cannot: code that does not lower, and
configurations that spill registers. To compile what a GPU would run, the launchers themselves
run at a representative shape (``C = 4096``, 16384 tokens, bf16 streams, each n) on meta tensors
with every kernel launch intercepted; each captured launch is then compiled the way the JIT
specialises it on a GPU (Triton's own binder: argument types, constexprs, and the 16-byte
alignment and divisibility-by-16 assumptions it makes for pointers and integers such as
``C = 4096``), once for every autotune config that survives pruning for those arguments.

Run as ``python -m mhc_megatron.kernels.compile_check [ARCH] [--markdown] [--n N ...]``
(``TRITON_INTERPRET`` must be unset: the interpreter replaces the kernels with Python).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from ._common import SUPPORTED_STREAMS  # the n the kernels are built for (torch only, no triton import)

SHAPE = {"tokens": 16384, "hidden": 4096, "iters": 20}


@dataclass
class CompileResult:
    kernel: str
    config: str
    arch: int
    registers: int
    spill_bytes: int
    aligned: str  # the arguments specialised as 16-byte aligned / divisible by 16


@dataclass
class _Launch:
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    configs: list  # [dict of extra kwargs] (one per surviving autotune config)


def _signature(launch: _Launch):
    def describe(v):
        return (str(v.dtype), tuple(v.shape)) if hasattr(v, "dtype") else v

    return launch.fn.__name__, tuple(map(describe, launch.args)), tuple(sorted(launch.kwargs.items()))


def _add(found: list, launch: _Launch) -> None:
    """Record a launch unless the same kernel already ran with the same kind of arguments."""
    if all(_signature(other) != _signature(launch) for other in found):
        found.append(launch)


@contextlib.contextmanager
def _captured_launches(found: list):
    """Kernel launches are recorded instead of run."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def jit_run(self, *args, grid, warmup, **kwargs):
        _add(found, _Launch(self, args, kwargs, [{}]))

    def tuner_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        configs = [c.all_kwargs() for c in self.prune_configs(kwargs)]
        self.nargs = None
        _add(found, _Launch(self.fn, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}, configs))

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, tuner_run
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


def _launches(n: int) -> list[_Launch]:
    """Every launch the kernels make for one sublayer at SHAPE, forward and backward, with and
    without accumulation, bias and dropout, plus the stand-alone Sinkhorn kernels."""
    import torch

    from . import _common
    from . import coefficients as co
    from . import post_res, pre, sinkhorn

    T, C, iters = SHAPE["tokens"], SHAPE["hidden"], SHAPE["iters"]
    m = _common.num_coefficients(n)
    meta = dict(device="meta")
    act, f32 = dict(dtype=torch.bfloat16, **meta), dict(dtype=torch.float32, **meta)
    x = torch.empty(T, n, C, **act)
    f, bias = torch.empty(T, C, **act), torch.empty(C, **act)
    phi, cbias, alpha = torch.empty(n * C, m, **f32), torch.empty(m, **f32), torch.empty(3, **f32)
    h_pre, h_post, h_res = torch.empty(T, n, **f32), torch.empty(T, n, **f32), torch.empty(T, n, n, **f32)
    found: list[_Launch] = []
    with _captured_launches(found):
        v = x.view(T, n * C)
        _, _, _, proj, sumsq = co.coefficients_forward(v, phi, cbias, alpha, n, iters, 1e-6)
        for g_v in (None, torch.empty_like(v)):
            co.coefficients_backward(v, phi, cbias, alpha, proj, sumsq, h_pre, h_post, h_res, n, iters, 1e-6, g_v=g_v)
        pre.pre_forward(x, h_pre)
        for g_x in (None, torch.empty_like(x)):
            pre.pre_backward(f, x, h_pre, g_x)
        for b, seed in ((None, None), (bias, post_res.draw_seed(x.device))):
            post_res.post_res_forward(x, f, h_post, h_res, b, seed, 0.1)
            post_res.post_res_backward(x, x, f, h_post, h_res, b, seed, 0.1)
        sinkhorn.sinkhorn_fwd(h_res, iters)
        sinkhorn.sinkhorn_bwd(h_res, h_res, iters)
    return found


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        out = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", path, "-o", os.path.join(d, "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return regs, spills


def _compile(launch: _Launch, extra: dict, arch: int):
    """The cubin of one launch with one config, specialised as the JIT would on a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = {**launch.kwargs, **extra}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    names = [p.name for p in fn.params]
    aligned = [names[path[0]] for path, a in attrs.items() if a]
    shown = {names[path[0]]: v for path, v in constexprs.items()
             if names[path[0]] not in ("PRECISION",) and not isinstance(v, str)}
    config = ", ".join(f"{k}={v}" for k, v in shown.items())
    config += f", warps={options.num_warps}, stages={options.num_stages}"
    return compiled, config, aligned


def _compile_one(job: tuple[int, int, int, int]) -> CompileResult:
    n, i, j, arch = job
    launch = _launches(n)[i]
    compiled, config, aligned = _compile(launch, launch.configs[j], arch)
    regs, spills = _ptxas_usage(compiled.asm["ptx"], arch)
    return CompileResult(launch.fn.__name__, config, arch, regs, spills, ", ".join(aligned))


def compile_all(arch: int = 90, streams=SUPPORTED_STREAMS, workers: int | None = None) -> list[CompileResult]:
    """Every (launch, surviving config) at SHAPE for each n, compiled in ``workers`` processes."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels with Python")
    jobs = [(n, i, j, arch) for n in streams for i, launch in enumerate(_launches(n))
            for j in range(len(launch.configs))]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        results = [_compile_one(job) for job in jobs]
    else:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_compile_one, jobs))
    unique, seen = [], set()
    for r in results:  # launches that compile to the same specialisation are listed once
        if (r.kernel, r.config) not in seen:
            seen.add((r.kernel, r.config))
            unique.append(r)
    return unique


def markdown(results: list[CompileResult]) -> str:
    """The register table of docs/kernels.md."""
    lines = ["| kernel | config | registers | spills |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| `{r.kernel}` | {r.config} | {r.registers} | {r.spill_bytes} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mhc_megatron.kernels.compile_check", description=__doc__.split("\n\n")[0])
    p.add_argument("arch", nargs="?", type=int, default=90, help="compute capability x 10 (default 90)")
    p.add_argument("--n", type=int, action="append",
                   help=f"expansion rates (default {', '.join(map(str, SUPPORTED_STREAMS))}: those the kernels support)")
    p.add_argument("--markdown", action="store_true", help="print the docs table")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    results = compile_all(args.arch, tuple(args.n or SUPPORTED_STREAMS))
    if args.markdown:
        print(markdown(results))
        return 0
    if args.json:
        import dataclasses
        import json

        print(json.dumps([dataclasses.asdict(r) for r in results]))
        return 0
    print(f"{'kernel':<24}{'config':<72}{'regs':>6}{'spill B':>9}  aligned / divisible by 16")
    for r in results:
        print(f"{r.kernel:<24}{r.config:<72}{r.registers:>6}{r.spill_bytes:>9}  {r.aligned}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
