"""Compatibility run: our layer, pipeline, launcher and checkpoint tests against a Megatron-LM checkout.

    MEGATRON_LM=/path/to/Megatron-LM ./scripts/test.sh -m compat

Each suite runs in its own pytest process with the checkout first on ``PYTHONPATH`` (spawned
workers and launcher subprocesses inherit it), and ``tests/conftest.py`` stops a suite that would
import megatron-core from anywhere else. Skipped without ``MEGATRON_LM``. The last checked commit
and its results are in docs/megatron.md ("Megatron-LM versions").
"""

import os
import re
import subprocess
import sys

import pytest

CHECKOUT = os.environ.get("MEGATRON_LM")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITES = (
    "test_mcore_layers.py", "test_hybrid.py", "test_mtp.py", "test_recompute.py", "test_upstream_numerics.py",
    "test_convert_checkpoint.py", "test_upstream_mhc_interop.py", "test_pipeline.py", "test_mcore_parallel.py",
    "test_launcher.py",
)

pytestmark = [
    pytest.mark.compat,
    pytest.mark.skipif(not CHECKOUT, reason="set MEGATRON_LM=/path/to/Megatron-LM to run the compatibility tests"),
]


def _env():
    checkout = os.path.abspath(CHECKOUT)
    path = os.pathsep.join(p for p in (checkout, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, MHC_MEGATRON_EXPECT_CHECKOUT=checkout, PYTHONWARNINGS="ignore")


def test_the_checkout_is_what_the_suites_import():
    out = subprocess.run(
        [sys.executable, "-c", "import megatron.core as m, mhc_megatron.mcore; print(m.__file__); print(m.__version__)"],
        capture_output=True, text=True, env=_env(), cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr  # importing mhc_megatron.mcore checks the version
    location, version = out.stdout.split()[-2:]
    assert os.path.realpath(location).startswith(os.path.realpath(CHECKOUT)), location
    commit = subprocess.run(["git", "-C", CHECKOUT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"Megatron-LM checkout {CHECKOUT}: megatron-core {version}, commit {commit or 'unknown (not a git work tree)'}")


@pytest.mark.parametrize("suite", SUITES)
def test_suite_passes_against_the_checkout(suite):
    out = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.join("tests", suite), "-q", "-p", "no:cacheprovider", "-rs"],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=3600,
    )
    summary = [line for line in out.stdout.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    print(f"{suite} against {CHECKOUT}: {summary[-1] if summary else 'no summary'}")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
