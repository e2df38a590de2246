"""Kernel benchmark: time, achieved bandwidth against the memory-traffic floor, and the same ops
in other implementations, all measured in one run.

For every shape and op (coefficients, pre-mix, post+residual; forward and backward, and the
whole mHC sublayer = all three, forward + backward) it times:

* ``triton``: our fused kernels (``backend="triton"``);
* ``reference``: the PyTorch reference, eager (``backend="reference"``);
* ``compile``: the reference maths under ``torch.compile`` (the approach of upstream Megatron);
* ``liger``: Liger-Kernel's mHC ops (``liger_kernel`` must be importable when asked for; its
  coefficient maths differs in small details — a row softmax first and epsilons — but moves the
  same bytes).

The ``sublayer`` row of ``triton`` is the fused sublayer path the Megatron layers run (both halves
sharing one x gradient); the others compose their three ops, and autograd adds the gradients.

Bandwidth is the op's memory-traffic floor (the bytes it must read and write,
with bf16/fp16 activations and fp32 coefficients; for the sublayer the (4n+2)C / (9n+3)C floors
of docs/kernels.md) divided by the time, and is also given as a
fraction of the device's copy bandwidth measured at the start of the run.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch

OPS = ("coefficients", "pre", "post_res", "sublayer")
IMPLS = ("triton", "reference", "compile", "liger")


@dataclass
class Record:
    op: str
    pass_: str
    impl: str
    tokens: int
    hidden: int
    n: int
    ms: float
    floor_bytes: int
    gbps: float
    copy_fraction: float

    def as_dict(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d


def floor_bytes(op: str, pass_: str, T: int, n: int, C: int, act: int = 2) -> int:
    """Bytes an op must move per call: activations at ``act`` bytes, coefficients at 4."""
    m = n * n + 2 * n
    per_token = {
        ("coefficients", "fwd"): n * C * act + m * 4,  # read x, write H
        ("coefficients", "bwd"): 2 * n * C * act + m * 4,  # read x and g_H, write g_x
        ("pre", "fwd"): n * C * act + n * 4 + C * act,  # read x and H_pre, write y
        ("pre", "bwd"): C * act + n * C * act + n * 4 + n * C * act + n * 4,
        ("post_res", "fwd"): (n + 1) * C * act + (n + n * n) * 4 + n * C * act,
        ("post_res", "bwd"): n * C * act * 2 + C * act + (n + n * n) * 4 * 2 + n * C * act + C * act,
    }
    if op == "sublayer":  # the practical floors of the fused sublayer (docs/kernels.md)
        from .traffic import floors

        return T * floors(n, C, act)["forward" if pass_ == "fwd" else "backward"]
    return T * per_token[(op, pass_)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1000 / reps


def copy_bandwidth_gbps(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write counted)."""
    if device.type != "cuda":
        nbytes = 1 << 24
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, warmup=3, reps=10)
    return 2 * nbytes / (ms * 1e6)


def _inputs(T: int, n: int, C: int, dtype, device, seed: int = 0):
    from .. import ops

    g = torch.Generator(device="cpu").manual_seed(seed)
    m = ops.num_coefficients(n)

    def rnd(*shape, dt=torch.float32, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dt)

    return {
        "x": rnd(T, n, C, dt=dtype),
        "f": rnd(T, C, dt=dtype),
        "phi": rnd(n * C, m, scale=(n * C) ** -0.5),
        "bias": rnd(m),
        "alpha": torch.full((3,), 0.01, device=device),
        "h_pre": torch.rand(T, n, generator=g).to(device),
        "h_post": 2 * torch.rand(T, n, generator=g).to(device),
        "h_res": torch.softmax(rnd(T, n, n), -1),
    }


def _op_fns(impl: str, iters: int):
    """``{op: fn(**inputs) -> outputs}`` for one implementation (None when unavailable)."""
    from .. import ops

    if impl in ("triton", "reference"):
        b = impl
        fns = {
            "coefficients": lambda x, phi, bias, alpha, **_: ops.mhc_coefficients(x, phi, bias, alpha, iters, backend=b),
            "pre": lambda x, h_pre, **_: ops.mhc_pre(x, h_pre, backend=b),
            "post_res": lambda x, f, h_post, h_res, **_: ops.mhc_post_res(x, f, h_post, h_res, backend=b),
        }
        if impl == "triton":
            fns["sublayer"] = _fused_sublayer(iters)
        return fns
    if impl == "compile":
        ref = _op_fns("reference", iters)
        return {name: torch.compile(fn, dynamic=False) for name, fn in ref.items()}
    if impl == "liger":
        try:
            from liger_kernel.ops import mhc as liger
        except ImportError:
            return None
        return {
            "coefficients": lambda x, phi, bias, alpha, **_: liger.LigerMHCCoeffsFunction.apply(
                x, phi, bias, alpha[0], alpha[1], alpha[2], True, iters, 1e-6, 0.0, 0.0, 2.0
            ),
            "pre": lambda x, h_pre, **_: liger.LigerMHCPreFunction.apply(x, h_pre),
            "post_res": lambda x, f, h_post, h_res, **_: liger.LigerMHCPostResFunction.apply(x, f, h_post, h_res),
        }
    raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")


def _sublayer(fns):
    """All three ops as one mHC sublayer would call them (F itself excluded: f is an input)."""

    def run(x, phi, bias, alpha, f, **_):
        h_pre, h_post, h_res = fns["coefficients"](x=x, phi=phi, bias=bias, alpha=alpha)
        y = fns["pre"](x=x, h_pre=h_pre)
        return fns["post_res"](x=x, f=f + y, h_post=h_post, h_res=h_res)

    return run


def _fused_sublayer(iters: int):
    """What an mHC sublayer runs with the kernels: the two halves sharing one x gradient."""

    def run(x, phi, bias, alpha, f, **_):
        from ..kernels.post_res import mhc_post_res_triton
        from ..kernels.sublayer import SublayerLink, mhc_sublayer_input_triton

        link = SublayerLink()
        y, _, h_post, h_res = mhc_sublayer_input_triton(x, phi, bias, alpha, iters, 1e-6, link)
        return mhc_post_res_triton(x, f + y, h_post, h_res, None, 0.0, link)[0]

    return run


def _differentiable(inputs: dict) -> dict:
    return {k: (v.detach().clone().requires_grad_() if v.is_floating_point() else v) for k, v in inputs.items()}


def run_benchmark(
    tokens=(4096, 16384), hidden=(2048, 4096, 7168), n: int = 4, dtype=torch.bfloat16,
    iters: int = 20, impls=IMPLS, device: str = "cuda", warmup: int = 5, reps: int = 20,
) -> tuple[list[Record], float]:
    dev = torch.device(device)
    copy_gbps = copy_bandwidth_gbps(dev)
    records: list[Record] = []
    for impl in impls:
        fns = _op_fns(impl, iters)
        if fns is None:
            raise ValueError(f"bench kernels: --impls has {impl} but liger_kernel is not importable; "
                             "pip install liger-kernel, or leave liger out of --impls")
        fns.setdefault("sublayer", _sublayer(fns))
        for T in tokens:
            for C in hidden:
                base = _inputs(T, n, C, dtype, dev)
                for op in OPS:
                    fn = fns[op]
                    inputs = _differentiable(base)
                    outs = fn(**inputs)
                    outs = outs if isinstance(outs, tuple) else (outs,)
                    leaves = [v for v in inputs.values() if v.requires_grad]
                    grads = [torch.randn_like(o) for o in outs]
                    fwd = _time_ms(lambda: fn(**inputs), dev, warmup, reps)
                    bwd = _time_ms(
                        lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True, allow_unused=True),
                        dev, warmup, reps,
                    )
                    for pass_, ms in (("fwd", fwd), ("bwd", bwd)):
                        nbytes = floor_bytes(op, pass_, T, n, C, act=base["x"].element_size())
                        gbps = nbytes / (ms * 1e6)
                        records.append(Record(op, pass_, impl, T, C, n, ms, nbytes, gbps, gbps / copy_gbps))
    return records, copy_gbps


def format_table(records: list[Record], copy_gbps: float, device_name: str) -> str:
    lines = [
        f"device: {device_name}; measured copy bandwidth {copy_gbps:.0f} GB/s; GB/s = memory-traffic floor / time",
        "",
        f"{'op':<13}{'pass':<5}{'tokens':>7}{'C':>6}  {'impl':<10}{'time ms':>9}{'GB/s':>8}{'% copy':>8}{'vs ref':>8}",
    ]
    ref = {(r.op, r.pass_, r.tokens, r.hidden): r.ms for r in records if r.impl == "reference"}
    key = lambda r: (OPS.index(r.op), r.pass_ != "fwd", r.tokens, r.hidden, IMPLS.index(r.impl))  # noqa: E731
    for r in sorted(records, key=key):
        speedup = ref.get((r.op, r.pass_, r.tokens, r.hidden))
        sp = f"{speedup / r.ms:.2f}x" if speedup else "-"
        lines.append(
            f"{r.op:<13}{r.pass_:<5}{r.tokens:>7}{r.hidden:>6}  {r.impl:<10}{r.ms:>9.3f}{r.gbps:>8.0f}"
            f"{100 * r.copy_fraction:>7.0f}%{sp:>8}"
        )
    return "\n".join(lines)


def enable_cpu_interpreter() -> None:
    """The CPU smoke run needs Triton's interpreter, switched on before triton is imported
    (triton.language's own jit helpers are fixed at import)."""
    import sys

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and "triton" in sys.modules:
        raise RuntimeError("triton is already imported; run with TRITON_INTERPRET=1 set in the environment")
    os.environ["TRITON_INTERPRET"] = "1"
