"""The package's layers import downwards only: the maths (``ops``) may call the kernels, the
kernels never import the maths, and neither imports the Megatron glue."""

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mhc_megatron")
FORBIDDEN = {"kernels": ("ops", "mcore", "training", "pipeline"), "ops": ("mcore", "training", "pipeline")}


def imported_packages(path: str, package: str) -> set[str]:
    """First-level mhc_megatron subpackages a module imports (absolute or relative)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").startswith("mhc_megatron."):
                found.add(node.module.split(".")[1])
            elif node.level == 2 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 2:
                found.update(alias.name for alias in node.names)
            elif node.level == 1:
                found.add(package)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("mhc_megatron."))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_never_imports_the_layers_above_it(package):
    bad = []
    for name in sorted(os.listdir(os.path.join(PKG, package))):
        if name.endswith(".py"):
            hits = imported_packages(os.path.join(PKG, package, name), package) & set(FORBIDDEN[package])
            bad += [f"{package}/{name} imports {hit}" for hit in sorted(hits)]
    assert not bad, bad


def test_the_check_sees_a_relative_import_of_another_layer(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from ..ops.coefficients import num_coefficients\n")
    assert "ops" in imported_packages(str(module), "kernels")


def private_imports_across_packages(path: str, package: str) -> list[str]:
    """``pkg._module`` or ``_name`` a module imports from another first-level mhc_megatron package."""
    found = []
    for node in ast.walk(ast.parse(open(path).read())):
        if not isinstance(node, ast.ImportFrom) or node.level == 1:
            continue
        if node.level == 0:
            if not (node.module or "").startswith("mhc_megatron."):
                continue
            parts = node.module.split(".")[1:]
        elif node.level == 2:
            parts = (node.module or "").split(".") if node.module else []
        else:
            continue
        for alias in node.names:
            full = [*parts, alias.name] if parts else [alias.name]
            if full[0] == package:
                continue
            private = [p for p in full if p.startswith("_") and not p.startswith("__")]
            if private:
                found.append(".".join(full))
    return found


def test_no_package_imports_another_packages_private_modules_or_names():
    bad = []
    for dirpath, _, names in os.walk(PKG):
        rel = os.path.relpath(dirpath, PKG)
        if rel == ".":
            continue
        package = rel.split(os.sep)[0]
        for name in sorted(names):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                bad += [f"{os.path.relpath(path, PKG)} imports {hit}" for hit in private_imports_across_packages(path, package)]
    assert not bad, bad


def test_the_private_import_check_sees_a_private_module(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from ..kernels._common import interpreting\nfrom ..kernels import _common\nfrom ._x import y\n")
    assert private_imports_across_packages(str(module), "ops") == ["kernels._common.interpreting", "kernels._common"]
