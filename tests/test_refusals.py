"""The refusal table (mhc_megatron/training/refusals.py): the docs hold it, each API row raises.

The launch rows run through the real entry point in tests/functional/test_real_loop.py (-k refused).
"""

import ast
import inspect
import os
import pkgutil

import pytest
import torch

from mhc_megatron import ops
from mhc_megatron.mcore import MHCSettings
from mhc_megatron.training import refusals
from mhc_megatron.training.checks import warn_reference_fallback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_troubleshooting_holds_the_generated_table():
    with open(os.path.join(ROOT, "docs", "troubleshooting.md")) as f:
        committed = refusals.between_markers(f.read())
    assert committed == refusals.table(), (
        "regenerate: python -m mhc_megatron.training.refusals --write docs/troubleshooting.md")


@pytest.mark.parametrize("row", refusals.API, ids=[r.call[:50] for r in refusals.API])
def test_api_refusal(row):
    error = {"ValueError": ValueError, "TypeError": TypeError}[row.error]
    with pytest.raises(error) as info:
        eval(row.call, {"MHCSettings": MHCSettings, "ops": ops, "torch": torch})
    assert row.message in str(info.value)


@pytest.mark.parametrize("row", refusals.LAUNCH, ids=[r.message[:40] for r in refusals.LAUNCH])
def test_launch_row_names_a_function_that_exists(row):
    assert callable(pkgutil.resolve_name(row.raised_in))


@pytest.mark.parametrize("row", refusals.ROUTE, ids=[r.message[:40] for r in refusals.ROUTE])
def test_route_row_message_is_in_its_function_and_its_test_exists(row):
    assert row.message in inspect.getsource(pkgutil.resolve_name(row.raised_in)), f"{row.raised_in} no longer says {row.message!r}"
    path, name = row.test.split("::")
    with open(os.path.join(ROOT, path)) as f:
        defined = {n.name for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.FunctionDef)}
    assert name in defined, f"{row.test}: no such test"


def test_settings_accept_what_they_should():
    MHCSettings(mode="mhc", expansion_rate=3)  # auto / reference: any n (the launch warns on a GPU)
    MHCSettings(mode="hc", expansion_rate=8, backend="triton")
    MHCSettings(mode="residual", expansion_rate=4)
    MHCSettings(alpha_init=0, coeff_eps=1e-5)
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    assert ops.mhc_pre(x, torch.rand(2, 4, dtype=torch.float64)).dtype == torch.float64


def test_launch_warns_once_for_n_without_kernels_on_a_gpu(capsys):
    assert warn_reference_fallback(MHCSettings(mode="mhc", expansion_rate=3), cuda=True)
    err = capsys.readouterr().err
    assert err.startswith("mhc-pretrain-gpt: WARNING: --expansion-rate 3:") and err.count("\n") == 1
    for settings, cuda in ((MHCSettings(mode="mhc", expansion_rate=3), False),
                           (MHCSettings(mode="mhc", expansion_rate=4), True),
                           (MHCSettings(mode="mhc", expansion_rate=3, backend="reference"), True)):
        assert not warn_reference_fallback(settings, cuda=cuda)
    assert capsys.readouterr().err == ""


def test_triton_kernels_without_a_device_are_refused_at_launch(monkeypatch):
    from mhc_megatron.training.checks import check_kernels_runnable

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^--mhc-kernels triton: this machine has no CUDA device"):
        check_kernels_runnable(MHCSettings(mode="mhc", backend="triton"), cuda=False)
    check_kernels_runnable(MHCSettings(mode="mhc", backend="triton"), cuda=True)
    check_kernels_runnable(MHCSettings(mode="mhc", backend="auto"), cuda=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_kernels_runnable(MHCSettings(mode="mhc", backend="triton"), cuda=False)
