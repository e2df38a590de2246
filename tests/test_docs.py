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
