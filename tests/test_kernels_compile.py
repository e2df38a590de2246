"""Every kernel, as the launchers launch it at C = 4096 (aligned, divisible-by-16 specialisation)
and in every autotune config that survives pruning, lowers to a Hopper (sm_90) and an Ampere
(sm_80) cubin without register spills; the register table in docs/kernels.md is this output.

The CPU interpreter checks the maths but not whether a kernel compiles for a GPU; Triton can
compile for a target without one (the wheel ships ptxas). Runs in a subprocess: the test
session has switched the interpreter on, which replaces the kernels with Python.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = {
    "_proj_fwd_kernel", "_finish_fwd_kernel", "_finish_bwd_kernel", "_proj_bwd_kernel", "_pre_fwd_kernel",
    "_pre_bwd_kernel", "_post_res_fwd_kernel", "_post_res_bwd_kernel", "_sum_rows_kernel", "_sinkhorn_fwd_kernel",
    "_sinkhorn_bwd_kernel",
}


def _compile(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([sys.executable, "-m", "mhc_megatron.kernels.compile_check", *args],
                          capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_without_spills(arch):
    rows = json.loads(_compile(str(arch), "--json"))
    assert {r["kernel"] for r in rows} == KERNELS
    for n in (1, 2, 4, 8):
        assert any(f"N={n}," in r["config"] for r in rows if r["kernel"] == "_post_res_bwd_kernel"), n
    spilling = [(r["kernel"], r["config"]) for r in rows if r["spill_bytes"] > 0]
    assert not spilling, spilling
    # the specialisation a GPU runs: C = 4096 assumed divisible by 16, pointers 16-byte aligned
    post = [r for r in rows if r["kernel"] == "_post_res_fwd_kernel"]
    assert all("x_ptr" in r["aligned"] and r["aligned"].endswith("C") for r in post)


@pytest.mark.slow
def test_docs_register_table_is_the_compile_check_output():
    table = _compile("90", "--n", "4", "--markdown").strip()
    with open(os.path.join(ROOT, "docs", "kernels.md")) as f:
        assert table in f.read(), "regenerate: python -m mhc_megatron.kernels.compile_check 90 --n 4 --markdown"
