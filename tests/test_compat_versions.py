"""The tested megatron-core range: one range in pyproject.toml and in the import-time check, which
names an untested version and the override."""

import os
import re
import subprocess
import sys

import pytest

from mhc_megatron import compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyproject_declares_the_tested_range():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        declared = re.search(r'"megatron-core([^"]*)"', f.read())[1]
    assert declared == compat.TESTED_SPECIFIER == ">=0.19.2,<0.21"


@pytest.mark.parametrize("version", ["0.19.2", "0.19.2+0bf7107", "0.19.7", "0.20.0", "0.20.0rc1", "0.20.3+abc"])
def test_tested_versions_pass(version):
    compat.check_megatron_core(version, environ={})


@pytest.mark.parametrize("version", ["0.19.1", "0.18.0", "0.21.0", "0.21.0rc0", "1.0.0"])
def test_untested_versions_are_named_with_the_override(version):
    with pytest.raises(ImportError) as err:
        compat.check_megatron_core(version, "/somewhere/megatron/core", environ={})
    text = str(err.value)
    assert f"found megatron-core {version} at /somewhere/megatron/core" in text
    assert "pip install 'megatron-core>=0.19.2,<0.21'" in text and "MHC_MEGATRON_ALLOW_UNTESTED_MEGATRON=1" in text


def test_the_override_turns_the_error_into_a_warning():
    with pytest.warns(UserWarning, match="found megatron-core 0.21.0.*running anyway"):
        compat.check_megatron_core("0.21.0", environ={"MHC_MEGATRON_ALLOW_UNTESTED_MEGATRON": "1"})
    with pytest.raises(ImportError):
        compat.check_megatron_core("0.21.0", environ={"MHC_MEGATRON_ALLOW_UNTESTED_MEGATRON": "0"})


def test_importing_the_glue_checks_the_installed_megatron(tmp_path):
    """A stand-in megatron-core 0.21.0 first on the path: importing mhc_megatron.mcore fails, naming it."""
    core = tmp_path / "megatron" / "core"
    core.mkdir(parents=True)
    (tmp_path / "megatron" / "__init__.py").write_text("")
    (core / "__init__.py").write_text("")
    (core / "package_info.py").write_text("__version__ = '0.21.0'\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", PYTHONWARNINGS="ignore")
    env.pop("MHC_MEGATRON_ALLOW_UNTESTED_MEGATRON", None)
    out = subprocess.run([sys.executable, "-c", "import mhc_megatron.mcore"], capture_output=True, text=True, env=env)
    assert out.returncode != 0
    assert f"found megatron-core 0.21.0 at {core}" in out.stderr
