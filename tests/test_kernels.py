"""Every Triton kernel against its PyTorch reference, forward and backward.

On a machine without a GPU these run in Triton's interpreter (TRITON_INTERPRET=1, set by
conftest) on CPU tensors; on a GPU machine, on CUDA. Shapes are kept small for the interpreter.

Tolerances come from one table (:data:`TOLERANCES`) by what is compared and the activation dtype,
and must hold on a GPU too. The coefficient projection's GEMMs run in TF32 on a GPU (10-bit
mantissa) and in exact fp32 in the interpreter, so everything downstream of them has its own
"tf32" rows; ``test_tf32_rows_cover_a_tf32_rounded_reference`` checks here, without a GPU, that
those rows hold against a reference that rounds the GEMM operands to TF32 the way the matrix
units do (to nearest, or truncated: both are checked).
"""

import pytest
import torch

from mhc_megatron import ops
from mhc_megatron.ops._backend import choose

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STREAMS = [1, 2, 4, 8]
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(16, 5), (33, 3), (130, 37)]  # (C, tokens): power of two and not, odd token counts

# (what, activation dtype) -> (rtol, atol). Gradients are compared after dividing both sides by
# max(1, max |reference|). bf16 keeps 8 bits: one rounding of a value near 4 is 1.6e-2. The tf32
# rows: the largest TF32 deviation measured on the shapes below is 7.3e-4 for the coefficients
# (fp32 whatever the activation dtype) and 1.6e-3 for their scaled gradients (the gates').
TOLERANCES = {
    ("output", torch.float32): (1e-5, 1e-5),
    ("output", torch.bfloat16): (2e-2, 2e-2),
    ("grad", torch.float32): (1e-4, 1e-5),
    ("grad", torch.bfloat16): (2e-2, 2e-2),
    ("tf32 output", torch.float32): (2e-3, 2e-3),
    ("tf32 output", torch.bfloat16): (2e-3, 2e-3),
    ("tf32 grad", torch.float32): (5e-3, 5e-3),
    ("tf32 grad", torch.bfloat16): (2e-2, 2e-2),
}


def tol(what: str, dtype) -> dict:
    rtol, atol = TOLERANCES[(what, torch.float32 if dtype == torch.float32 else torch.bfloat16)]
    return dict(rtol=rtol, atol=atol)


def run_both(fn_name, inputs, *args, **kwargs):
    """Outputs and input gradients of ops.<fn_name> with backend='triton' and 'reference'."""
    fn = getattr(ops, fn_name)
    results = []
    grads_out = None
    for backend in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*leaves, *args, backend=backend, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        if grads_out is None:
            grads_out = [torch.randn_like(o) for o in outs]
        grads = torch.autograd.grad(outs, leaves, grads_out)
        results.append((outs, grads))
    return results


def assert_match(results, inputs, tf32: bool = False):
    (out_t, grad_t), (out_r, grad_r) = results
    for a, b in zip(out_t, out_r):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol("tf32 output" if tf32 else "output", a.dtype))
    for a, b, x in zip(grad_t, grad_r, inputs):
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, b / scale, **tol("tf32 grad" if tf32 else "grad", x.dtype))


@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,T", SHAPES)
def test_post_res(n, dtype, C, T):
    inputs = [
        torch.randn(T, n, C, device=DEVICE, dtype=dtype),
        torch.randn(T, C, device=DEVICE, dtype=dtype),
        torch.rand(T, n, device=DEVICE) * 2,
        torch.rand(T, n, n, device=DEVICE),
    ]
    assert_match(run_both("mhc_post_res", inputs), inputs)


@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,T", SHAPES)
def test_pre(n, dtype, C, T):
    inputs = [torch.randn(T, n, C, device=DEVICE, dtype=dtype), torch.rand(T, n, device=DEVICE)]
    assert_match(run_both("mhc_pre", inputs), inputs)


@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize("spread", [1.0, 5.0])
@pytest.mark.parametrize("T,iters", [(3, 20), (37, 6), (5, 1), (9, 2)])
def test_sinkhorn(n, spread, T, iters):
    inputs = [spread * torch.randn(T, n, n, device=DEVICE)]
    assert_match(run_both("sinkhorn_knopp", inputs, iters), inputs)


def test_sinkhorn_huge_logits_stay_finite():
    logits = (1e4 * torch.randn(40, 4, 4, device=DEVICE)).requires_grad_()
    m = ops.sinkhorn_knopp(logits, 20, backend="triton")
    assert torch.isfinite(m).all()
    m.backward(torch.randn_like(m))
    assert torch.isfinite(logits.grad).all()


def _coefficient_inputs(n, dtype, C, T):
    m = ops.num_coefficients(n)
    return [
        torch.randn(T, n, C, device=DEVICE, dtype=dtype),
        torch.randn(n * C, m, device=DEVICE) / (n * C) ** 0.5,
        torch.randn(m, device=DEVICE),
        torch.rand(3, device=DEVICE) + 0.1,
    ]


@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,T", [(16, 5), (33, 37)])
def test_mhc_coefficients(n, dtype, C, T):
    inputs = _coefficient_inputs(n, dtype, C, T)
    assert_match(run_both("mhc_coefficients", inputs, 8, 1e-6), inputs, tf32=True)


def _tf32(t: torch.Tensor, mode: str) -> torch.Tensor:
    """``t`` rounded to TF32 (10 mantissa bits) as the matrix units read it, returned in float64."""
    bits = t.float().contiguous().view(torch.int32)
    if mode == "truncate":
        bits = bits & ~0x1FFF
    else:  # to nearest, ties to even
        bits = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32).double()


class _TF32MatMul(torch.autograd.Function):
    """``v @ phi`` with TF32 operands, forward and both backward GEMMs (as the kernels do)."""

    @staticmethod
    def forward(ctx, v, phi, mode):
        ctx.save_for_backward(v, phi)
        ctx.mode = mode
        return _tf32(v, mode) @ _tf32(phi, mode)

    @staticmethod
    def backward(ctx, g):
        v, phi = ctx.saved_tensors
        m = ctx.mode
        return _tf32(g, m) @ _tf32(phi, m).T, _tf32(v, m).T @ _tf32(g, m), None


def _tf32_coefficients(x, phi, bias, alpha, iters, eps, mode):
    """The spec's coefficients in float64, the projection with TF32 operands."""
    n, C = x.shape[-2:]
    v = x.reshape(*x.shape[:-2], n * C).double()
    proj = _TF32MatMul.apply(v, phi.double(), mode)
    inv_r = torch.rsqrt(v.square().mean(-1, keepdim=True) + eps)
    gate = torch.cat([alpha[0:1].expand(n), alpha[1:2].expand(n), alpha[2:3].expand(n * n)]).double()
    logits = proj * inv_r * gate + bias.double()
    h_res = ops.sinkhorn_knopp(logits[..., 2 * n :].unflatten(-1, (n, n)), iters, backend="reference")
    return torch.sigmoid(logits[..., :n]).float(), (2 * torch.sigmoid(logits[..., n : 2 * n])).float(), h_res.float()


@pytest.mark.parametrize("mode", ["nearest", "truncate"])
@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tf32_rows_cover_a_tf32_rounded_reference(mode, n, dtype):
    """The kernels (exact fp32 here) against a TF32 reference, with the tf32 rows: a GPU run
    (TF32 kernels against the exact reference) is then within the same distance."""
    inputs = _coefficient_inputs(n, dtype, 130, 37)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    got = ops.mhc_coefficients(*leaves, 20, 1e-6, backend="triton")
    g_out = [torch.randn_like(o) for o in got]
    got_grads = torch.autograd.grad(got, leaves, g_out)
    ref_leaves = [t.detach().clone().requires_grad_() for t in inputs]
    want = _tf32_coefficients(*ref_leaves, 20, 1e-6, mode)
    want_grads = torch.autograd.grad(want, ref_leaves, g_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol("tf32 output", dtype))
    for a, b in zip(got_grads, want_grads):
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, b.to(a.dtype) / scale, **tol("tf32 grad", dtype))


def test_tf32_emulation_is_not_exact():
    """The TF32 reference really rounds: the exact-fp32 tolerance would not cover it."""
    inputs = _coefficient_inputs(4, torch.float32, 130, 37)
    exact = ops.mhc_coefficients(*inputs, 20, 1e-6, backend="reference")
    rounded = _tf32_coefficients(*inputs, 20, 1e-6, "nearest")
    worst = max((a - b).abs().max().item() for a, b in zip(exact, rounded))
    assert TOLERANCES[("output", torch.float32)][1] < worst < TOLERANCES[("tf32 output", torch.float32)][1]


def test_leading_dims_and_non_contiguous_inputs():
    x = torch.randn(2, 3, 4, 24, device=DEVICE).transpose(0, 1)  # [3, 2, n, C], not contiguous
    h = torch.rand(3, 2, 4, device=DEVICE)
    torch.testing.assert_close(ops.mhc_pre(x, h, backend="triton"), ops.mhc_pre(x, h, backend="reference"))
    h_res = torch.rand(3, 2, 4, 4, device=DEVICE)
    f = torch.randn(3, 2, 24, device=DEVICE)
    torch.testing.assert_close(
        ops.mhc_post_res(x, f, h, h_res, backend="triton"), ops.mhc_post_res(x, f, h, h_res, backend="reference")
    )


def test_triton_backend_refuses_what_it_does_not_support():
    with pytest.raises(ValueError, match=r"support n in \(1, 2, 4, 8\), got n=3.*Supported:"):
        ops.mhc_pre(torch.randn(2, 3, 8, device=DEVICE), torch.rand(2, 3, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="float64 is reference-only"):
        ops.sinkhorn_knopp(torch.randn(2, 4, 4, dtype=torch.float64, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of auto, reference, triton, got 'cuda'"):
        ops.mhc_pre(torch.randn(2, 4, 8), torch.rand(2, 4), backend="cuda")
    with pytest.raises(ValueError, match="no Triton kernel"):
        ops.hc_coefficients(torch.randn(2, 4, 8), torch.zeros(8, 6), torch.zeros(24), torch.zeros(3), backend="triton")


def test_auto_runs_the_reference_on_cpu_tensors(monkeypatch):
    import mhc_megatron.kernels.pre as pre

    monkeypatch.setattr(pre, "mhc_pre_triton", lambda *a: pytest.fail("auto must not use Triton on CPU"))
    ops.mhc_pre(torch.randn(2, 4, 8), torch.rand(2, 4))


class _FakeCuda:
    """Enough of a CUDA tensor for the backend choice (no GPU needed)."""

    is_cuda = True
    device = torch.device("cuda")
    dtype = torch.float32


def test_auto_warns_once_and_names_why_it_falls_back(monkeypatch):
    import mhc_megatron.ops._backend as backend

    monkeypatch.setattr(backend, "_warned", set())
    with pytest.warns(UserWarning, match=r"mhc_pre: running the PyTorch reference .* n=3"):
        assert choose("mhc_pre", "auto", _FakeCuda(), n=3) == "reference"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose("mhc_pre", "auto", _FakeCuda(), n=3) == "reference"  # only once
    assert choose("mhc_pre", "auto", _FakeCuda(), n=4) == "triton"


def test_bench_kernels_cpu_smoke():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "mhc_megatron.cli", "bench", "kernels", "--device", "cpu", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    report = json.loads(proc.stdout)
    ops_seen = {(r["op"], r["pass"], r["impl"]) for r in report["records"]}
    for op in ("coefficients", "pre", "post_res", "sublayer"):
        for p in ("fwd", "bwd"):
            assert {(op, p, "triton"), (op, p, "reference")} <= ops_seen
    assert all(r["ms"] > 0 and r["floor_bytes"] > 0 for r in report["records"])


def test_bench_kernels_refuses_liger_when_it_is_not_installed(monkeypatch):
    import builtins

    from mhc_megatron.bench.kernels import run_benchmark

    real_import = builtins.__import__

    def no_liger(name, *args, **kwargs):
        if name.startswith("liger_kernel"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_liger)
    with pytest.raises(ValueError, match="--impls has liger but liger_kernel is not importable"):
        run_benchmark(tokens=(4,), hidden=(16,), impls=("liger",), device="cpu", warmup=0, reps=1)


def test_memory_floor_matches_the_spec_table():
    from mhc_megatron.bench.kernels import floor_bytes

    n, C, T = 4, 4096, 10
    # post+res: read (n+1)C and write nC activations (plus the fp32 coefficients)
    assert floor_bytes("post_res", "fwd", T, n, C) == T * (2 * (2 * n + 1) * C + 4 * (n + n * n))
    # coefficients: read nC once, write n^2 + 2n floats
    assert floor_bytes("coefficients", "fwd", T, n, C) == T * (2 * n * C + 4 * (n * n + 2 * n))
    # the fused sublayer: (4n + 2)C forward, (9n + 3)C backward (derived in docs/kernels.md)
    assert floor_bytes("sublayer", "fwd", T, n, C) == T * 2 * 18 * C
    assert floor_bytes("sublayer", "bwd", T, n, C) == T * 2 * 39 * C


@pytest.mark.usefixtures("megatron_world")
@pytest.mark.parametrize("recompute", [False, True])
def test_megatron_layers_with_triton_kernels_match_the_reference(recompute):
    """A Megatron GPT whose mHC sublayers run the kernels (fused sublayer functions, shared x
    gradient; with recompute, x rebuilt by the chain) against the reference backend."""
    from mcore_helpers import build_gpt, lm_loss, make_batch, tiny_config
    from mhc_megatron.mcore import MHCSettings

    results = {}
    for backend in ("reference", "triton"):
        settings = MHCSettings(mode="mhc", expansion_rate=4, backend=backend, recompute=recompute,
                               recompute_block_size=2)
        model = build_gpt(tiny_config(num_layers=1, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2),
                          settings, seed=7).to(DEVICE)
        loss = lm_loss(model, [t.to(DEVICE) for t in make_batch(batch=1, seq=8)])
        loss.backward()
        results[backend] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_r, grads_r), (loss_t, grads_t) = results["reference"], results["triton"]
    assert loss_t == pytest.approx(loss_r, rel=1e-5 if DEVICE == "cpu" else 1e-3)  # TF32 on a GPU
    for name, g in grads_r.items():
        scale = g.abs().max().clamp_min(1.0)
        torch.testing.assert_close(grads_t[name] / scale, g / scale, **tol("tf32 grad", torch.float32), msg=name)


def test_autotune_pruning_keeps_fitting_configs_and_the_interpreter_runs_the_first():
    import triton

    from mhc_megatron.kernels import coefficients as co
    from mhc_megatron.kernels import pre
    from mhc_megatron.kernels._common import fit_block_c

    configs = [triton.Config({"BLOCK_C": bc}) for bc in (1024, 512, 2048)]
    assert [c.kwargs["BLOCK_C"] for c in fit_block_c(configs, 4096)] == [1024, 512, 2048]
    assert [c.kwargs["BLOCK_C"] for c in fit_block_c(configs, 600)] == [1024, 512]
    assert [c.kwargs["BLOCK_C"] for c in fit_block_c(configs, 33)] == [512]  # the narrowest when none fits
    # projection tiles beyond the register budget go (n = 8: m = 80, MP = 128)
    kept = co._prune_proj(co._proj_configs(), {"MP": 128, "K": 8 * 4096})
    assert kept and all(c.kwargs["BLOCK_T"] * 128 + 2 * c.kwargs["BLOCK_K"] * 128 + c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_K"]
                        <= co._TILE_REGISTERS * 32 * c.num_warps for c in kept)
    assert len(kept) < len(co._proj_configs())
    if DEVICE == "cpu":
        x, h = torch.randn(3, 4, 4096), torch.rand(3, 4)
        ops.mhc_pre(x, h, backend="triton")
        assert pre._pre_fwd_kernel.best_config.kwargs["BLOCK_C"] == 1024  # the first config, untimed


def test_bench_kernels_cpu_obeys_given_shapes_and_names_the_defaults_it_applies():
    import argparse

    from mhc_megatron.cli.bench_cmd import kernel_shapes

    def ns(**kw):
        base = dict(device="cpu", tokens=None, hidden=None, impls=None, reps=None)
        return argparse.Namespace(**{**base, **kw})

    given = kernel_shapes(ns(tokens="64", hidden="64,128", impls="reference", reps=3))
    assert (given["tokens"], given["hidden"], given["impls"], given["reps"]) == ((64,), (64, 128), ("reference",), 3)
    assert given["defaulted"] == []
    smoke = kernel_shapes(ns(hidden="64"))
    assert (smoke["tokens"], smoke["hidden"]) == ((8,), (64,))
    assert smoke["defaulted"] == ["--tokens 8", "--impls triton,reference", "--reps 1"]
    assert kernel_shapes(ns(device="cuda"))["tokens"] == (4096, 16384)
    with pytest.raises(ValueError, match="--tokens '6x4'"):
        kernel_shapes(ns(tokens="6x4"))
