"""Compile every kernel for a GPU architecture without a GPU, and report registers and spills.

Triton can lower a kernel all the way to a cubin for a given target on any machine (the wheel
ships ``ptxas``). This catches what the CPU interpreter cannot: code that does not lower, and
configurations that spill registers. Run as ``python -m mhc_megatron.kernels.compile_check``
(``TRITON_INTERPRET`` must be unset: the interpreter replaces the kernels with Python).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

KERNELS_PER_N = (1, 2, 4, 8)


@dataclass
class CompileResult:
    kernel: str
    config: str
    arch: int
    registers: int
    spill_bytes: int


def _cases(n: int):
    from ..ops.coefficients import num_coefficients
    from . import coefficients as co
    from . import post_res, pre, sinkhorn
    from ._common import next_pow2

    m = num_coefficients(n)
    mp = max(16, next_pow2(m))
    block_k, warps = co.proj_config(mp)
    act = "*bf16"
    yield post_res._post_res_fwd_kernel, {
        "x_ptr": act, "f_ptr": act, "h_post_ptr": "*fp32", "h_res_ptr": "*fp32", "out_ptr": act, "C": "i32",
    }, {"N": n, "BLOCK_C": 1024}
    yield post_res._post_res_bwd_kernel, {
        "g_out_ptr": act, "x_ptr": act, "f_ptr": act, "h_post_ptr": "*fp32", "h_res_ptr": "*fp32",
        "g_x_ptr": act, "g_f_ptr": act, "g_h_post_ptr": "*fp32", "g_h_res_ptr": "*fp32", "C": "i32",
    }, {"N": n, "BLOCK_C": 512}
    yield pre._pre_fwd_kernel, {"x_ptr": act, "h_ptr": "*fp32", "y_ptr": act, "C": "i32"}, {"N": n, "BLOCK_C": 1024}
    yield pre._pre_bwd_kernel, {
        "g_y_ptr": act, "x_ptr": act, "h_ptr": "*fp32", "g_x_ptr": act, "g_h_ptr": "*fp32", "C": "i32",
    }, {"N": n, "BLOCK_C": 1024}
    yield sinkhorn._sinkhorn_fwd_kernel, {
        "logits_ptr": "*fp32", "out_ptr": "*fp32", "T": "i32", "iters": "i32",
    }, {"N": n, "BLOCK_T": sinkhorn.block_t(n)}
    yield sinkhorn._sinkhorn_bwd_kernel, {
        "logits_ptr": "*fp32", "g_out_ptr": "*fp32", "g_in_ptr": "*fp32", "T": "i32", "iters": "i32",
    }, {"N": n, "BLOCK_T": sinkhorn.block_t(n)}
    yield co._proj_fwd_kernel, {
        "v_ptr": act, "phi_ptr": "*fp32", "proj_ptr": "*fp32", "sumsq_ptr": "*fp32", "T": "i32", "K": "i32", "M": "i32",
    }, {"BLOCK_T": co.BLOCK_T_PROJ, "BLOCK_K": block_k, "MP": mp, "PRECISION": "tf32"}, warps
    finish = {
        "proj_ptr": "*fp32", "sumsq_ptr": "*fp32", "bias_ptr": "*fp32", "alpha_ptr": "*fp32",
    }
    yield co._finish_fwd_kernel, {
        **finish, "h_pre_ptr": "*fp32", "h_post_ptr": "*fp32", "h_res_ptr": "*fp32",
        "T": "i32", "M": "i32", "inv_K": "fp32", "eps": "fp32", "iters": "i32",
    }, {"N": n, "BLOCK_T": co.finish_block_t(n)}
    yield co._finish_bwd_kernel, {
        **finish, "g_pre_ptr": "*fp32", "g_post_ptr": "*fp32", "g_res_ptr": "*fp32", "g_logits_ptr": "*fp32",
        "T": "i32", "M": "i32", "inv_K": "fp32", "eps": "fp32", "iters": "i32",
    }, {"N": n, "BLOCK_T": co.finish_block_t(n)}
    yield co._proj_bwd_kernel, {
        "v_ptr": act, "phi_ptr": "*fp32", "g_proj_ptr": "*fp32", "c_ptr": "*fp32", "g_v_ptr": act,
        "g_phi_ptr": "*fp32", "T": "i32", "K": "i32", "M": "i32", "tokens_per_split": "i32",
    }, {"BLOCK_T": co.BLOCK_T_PROJ, "BLOCK_K": block_k, "MP": mp, "PRECISION": "tf32"}, warps


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", path, "-o", os.path.join(d, "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return regs, spills


def compile_all(arch: int = 90) -> list[CompileResult]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels with Python")
    results = []
    for n in KERNELS_PER_N:
        for case in _cases(n):
            fn, signature, constexprs = case[:3]
            warps = case[3] if len(case) > 3 else 4
            signature = {**signature, **{k: "constexpr" for k in constexprs}}
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
            regs, spills = _ptxas_usage(compiled.asm["ptx"], arch)
            config = ", ".join(f"{k}={v}" for k, v in constexprs.items() if k != "PRECISION") + f", warps={warps}"
            results.append(CompileResult(fn.__name__, f"n={n}, {config}", arch, regs, spills))
    return results


def main(argv=None) -> int:
    arch = int((argv or sys.argv[1:] or ["90"])[0])
    results = compile_all(arch)
    print(f"{'kernel':<24}{'config':<52}{'regs':>6}{'spill B':>9}")
    for r in results:
        print(f"{r.kernel:<24}{r.config:<52}{r.registers:>6}{r.spill_bytes:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
