"""Every Triton kernel against its PyTorch reference, forward and backward.

On a machine without a GPU these run in Triton's interpreter (TRITON_INTERPRET=1, set by
conftest) on CPU tensors; on a GPU machine, on CUDA. Shapes are kept small for the interpreter.

Tolerances: outputs in float32 (all coefficients, and fp32 activations) to 1e-5 absolute and
relative; gradients to 1e-4 (different summation order); bfloat16 activations and their
gradients to 2e-2 (bf16 keeps 8 bits: one rounding of a value near 4 is 1.6e-2).
"""

import pytest
import torch

from mhc_megatron import ops
from mhc_megatron.ops._backend import choose

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STREAMS = [1, 2, 4, 8]
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(16, 5), (33, 3), (130, 37)]  # (C, tokens): power of two and not, odd token counts


def tol(t):
    return dict(rtol=2e-2, atol=2e-2) if t.dtype in (torch.bfloat16, torch.float16) else dict(rtol=1e-4, atol=1e-5)


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


def assert_match(results, inputs):
    (out_t, grad_t), (out_r, grad_r) = results
    for a, b in zip(out_t, out_r):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **(tol(a) if a.dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)))
    for a, b, x in zip(grad_t, grad_r, inputs):
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, b / scale, **tol(x))


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
@pytest.mark.parametrize("T,iters", [(3, 20), (37, 6)])
def test_sinkhorn(n, spread, T, iters):
    inputs = [spread * torch.randn(T, n, n, device=DEVICE)]
    assert_match(run_both("sinkhorn_knopp", inputs, iters), inputs)


def test_sinkhorn_huge_logits_stay_finite():
    logits = (1e4 * torch.randn(40, 4, 4, device=DEVICE)).requires_grad_()
    m = ops.sinkhorn_knopp(logits, 20, backend="triton")
    assert torch.isfinite(m).all()
    m.backward(torch.randn_like(m))
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,T", [(16, 5), (33, 37)])
def test_mhc_coefficients(n, dtype, C, T):
    m = ops.num_coefficients(n)
    inputs = [
        torch.randn(T, n, C, device=DEVICE, dtype=dtype),
        torch.randn(n * C, m, device=DEVICE) / (n * C) ** 0.5,
        torch.randn(m, device=DEVICE),
        torch.rand(3, device=DEVICE) + 0.1,
    ]
    assert_match(run_both("mhc_coefficients", inputs, 8, 1e-6), inputs)


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


def test_memory_floor_matches_the_spec_table():
    from mhc_megatron.bench.kernels import floor_bytes

    n, C, T = 4, 4096, 10
    # post+res: read (n+1)C and write nC activations (plus the fp32 coefficients)
    assert floor_bytes("post_res", "fwd", T, n, C) == T * (2 * (2 * n + 1) * C + 4 * (n + n * n))
    # coefficients: read nC once, write n^2 + 2n floats
    assert floor_bytes("coefficients", "fwd", T, n, C) == T * (2 * n * C + 4 * (n * n + 2 * n))


@pytest.mark.usefixtures("megatron_world")
def test_megatron_layers_with_triton_kernels_match_the_reference():
    from mcore_helpers import build_gpt, lm_loss, make_batch, tiny_config
    from mhc_megatron.mcore import MHCSettings

    results = {}
    for backend in ("reference", "triton"):
        model = build_gpt(tiny_config(num_layers=1, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2),
                          MHCSettings(mode="mhc", expansion_rate=4, backend=backend), seed=7)
        loss = lm_loss(model, make_batch(batch=1, seq=8))
        loss.backward()
        results[backend] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_r, grads_r), (loss_t, grads_t) = results["reference"], results["triton"]
    assert loss_t == pytest.approx(loss_r, rel=1e-5)
    for name, g in grads_r.items():
        torch.testing.assert_close(grads_t[name], g, rtol=1e-3, atol=1e-5, msg=name)
