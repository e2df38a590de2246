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

# What the kernel modules define, found independently of compile_check: every @triton.jit function
# of mhc_megatron/kernels that no other one calls is a kernel; for each, the n it is launched with
# and the autotune configs compile_check would compile at its shape, against the module's configs.
_COVERAGE = r"""
import importlib, inspect, json, pkgutil, re
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction
import mhc_megatron.kernels as package
from mhc_megatron.kernels import _common, compile_check

jit = {}
for info in pkgutil.iter_modules(package.__path__):
    module = importlib.import_module(f"{package.__name__}.{info.name}")
    for obj in vars(module).values():
        fn = obj.fn if isinstance(obj, Autotuner) else obj
        if isinstance(fn, JITFunction) and fn.__module__ == module.__name__:
            jit[fn.__name__] = obj
def src(obj):
    return (obj.fn if isinstance(obj, Autotuner) else obj).src
kernels = {name: obj for name, obj in jit.items()
           if not any(re.search(rf"\b{name}\(", src(other)) for o, other in jit.items() if o != name)}
launched, n_seen, configs = set(), {}, {}
for n in _common.SUPPORTED_STREAMS:
    for launch in compile_check._launches(n):
        name = launch.fn.__name__
        launched.add(name)
        bound = dict(zip(launch.fn.arg_names, launch.args), **launch.kwargs)
        if "N" in bound:
            n_seen.setdefault(name, set()).add(bound["N"])
        configs.setdefault(name, set()).update(json.dumps(c, sort_keys=True) for c in launch.configs)
defined_configs = {name: sorted(json.dumps(c.all_kwargs(), sort_keys=True) for c in obj.configs)
                   for name, obj in kernels.items() if isinstance(obj, Autotuner)}
print(json.dumps({
    "kernels": sorted(kernels), "launched": sorted(launched), "streams": list(_common.SUPPORTED_STREAMS),
    "default_streams": list(inspect.signature(compile_check.compile_all).parameters["streams"].default),
    "n_seen": {k: sorted(v) for k, v in n_seen.items()},
    "configs": {k: sorted(v) for k, v in configs.items()}, "defined_configs": defined_configs,
}))
"""


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _compile(*args):
    proc = subprocess.run([sys.executable, "-m", "mhc_megatron.kernels.compile_check", *args],
                          capture_output=True, text=True, env=_env(), timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _kernel_modules():
    proc = subprocess.run([sys.executable, "-c", _COVERAGE], capture_output=True, text=True, env=_env(),
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_compile_check_covers_every_kernel_config_and_n_the_modules_define():
    """Fast (meta tensors, nothing compiled): the launches the compile check compiles are every
    kernel of the modules, at every n the kernels support, in every autotune config they define."""
    found = _kernel_modules()
    assert found["launched"] == found["kernels"]
    assert found["default_streams"] == found["streams"]
    assert found["n_seen"] and all(v == found["streams"] for v in found["n_seen"].values()), found["n_seen"]
    for name, defined in found["defined_configs"].items():
        assert found["configs"][name] == defined, name


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_without_spills(arch):
    rows = json.loads(_compile(str(arch), "--json"))
    found = _kernel_modules()
    assert {r["kernel"] for r in rows} == set(found["kernels"])
    for n in found["streams"]:
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
