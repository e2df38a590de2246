"""The docs say what the code does: the flag reference is the parsers' own text."""

import os

from mhc_megatron.cli.reference_doc import render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flag_reference_matches_the_parsers():
    with open(os.path.join(ROOT, "docs", "flags.md")) as f:
        committed = f.read()
    assert committed == render(), "regenerate: python -m mhc_megatron.cli.reference_doc > docs/flags.md"


def test_every_doc_linked_from_the_readme_exists():
    import re

    with open(os.path.join(ROOT, "README.md")) as f:
        links = re.findall(r"\]\(((?:docs|examples|patches)/[^)#]+)", f.read())
    assert links
    for link in links:
        assert os.path.exists(os.path.join(ROOT, link)), link


def _doc_files():
    for top in ("README.md", "docs", "examples", "patches"):
        path = os.path.join(ROOT, top)
        if os.path.isfile(path):
            yield path
        for dirpath, _, names in os.walk(path):
            for name in names:
                if name.endswith((".md", ".yaml", ".yml", ".sh", ".patch")):
                    yield os.path.join(dirpath, name)


def test_docs_stand_on_their_own():
    """No citations of a spec document the repository does not ship, no install of an unpublished package."""
    import re

    bad = re.compile(r"spec section|§|mhc-spec|pip install mhc-megatron\b")
    hits = []
    for path in _doc_files():
        with open(path) as f:
            hits += [f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}"
                     for i, line in enumerate(f, 1) if bad.search(line)]
    assert not hits, "\n".join(hits)


def test_code_comments_stand_on_their_own():
    """Docstrings and comments name the repository's docs, not sections of a spec it does not ship."""
    import re

    bad = re.compile(r"spec section|§|mhc-spec", re.IGNORECASE)
    hits = []
    for top in ("mhc_megatron", "tests", "scripts", "examples"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                path = os.path.join(dirpath, name)
                if not name.endswith(".py") or path == os.path.abspath(__file__):
                    continue
                with open(path) as f:
                    hits += [f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}"
                             for i, line in enumerate(f, 1) if bad.search(line)]
    assert not hits, "\n".join(hits)


def test_python_snippets_import_what_exists():
    """Every ``from mhc_megatron... import names`` in a python block of the docs resolves."""
    import importlib
    import re

    checked = 0
    for path in _doc_files():
        if not path.endswith(".md"):
            continue
        with open(path) as f:
            blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
        for block in blocks:
            for module, names in re.findall(r"^\s*from (mhc_megatron[\w.]*) import (\([^)]*\)|[^\n]+)", block, re.M):
                mod = importlib.import_module(module)
                for name in re.sub(r"#.*", "", names).strip("()").split(","):
                    name = name.split(" as ")[0].strip()
                    if name:
                        checked += 1
                        assert hasattr(mod, name), f"{os.path.relpath(path, ROOT)}: from {module} import {name}"
    assert checked
