"""The Megatron-LM checkout patch applies, and the patched script behaves: it builds mHC layers,
refuses the flags only mhc-pretrain-gpt implements before Megatron prints its arguments, and
mhc-pretrain-gpt names a patched script instead of argparse's "conflicting option string".

The fixture ``pretrain_gpt.py`` is built from the patch's own hunks (their context and removed
lines, at their line numbers), with just enough around them to run against the installed
megatron-core: Megatron's real parser and config builders, and a ``pretrain`` that stops there.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mhc_megatron.training as training
from launcher_workers import TINY_GPT_ARGS

PATCH = Path(__file__).resolve().parents[1] / "patches" / "megatron-lm-pretrain-gpt-mhc.patch"
ARGUMENTS_PRINTED = "------------------------ arguments ------------------------"

# what the fixture puts before each hunk (the rest of the gap is blank lines or `pass`)
BEFORE_FIRST_HUNK = """\
from megatron.training import (
    get_args,
"""
BEFORE_SECOND_HUNK = """\
has_nvidia_modelopt = False
add_modelopt_args = ModelOptModelConfig = None


class inprocess_restart:  # Megatron-LM's in-process restart wrapper: a no-op here
    @staticmethod
    def maybe_wrap_for_inprocess_restart(fn):
        return fn, None


def pretrain(full_config, *args, **kwargs):  # the fixture stops where training would start
    spec = model_cfg.transformer_layer_spec  # the module-level config the patched main block built
    print("LAYER SPEC", getattr(spec, "__qualname__", type(spec).__name__), flush=True)


if __name__ == "__main__":
"""
AFTER_LAST_HUNK = "    )\n"


def hunks():
    """(first old line, old-side lines) of each hunk of the patch."""
    out = []
    for header, body in re.findall(r"^@@ -(\d+),\d+ \+\d+,\d+ @@.*?\n(.*?)(?=^@@|\Z)", PATCH.read_text(), re.S | re.M):
        old = [line[1:] for line in body.splitlines() if line[:1] in (" ", "-")]
        out.append((int(header), old))
    return out


def _gap(text: str, size: int, next_line: str) -> list[str]:
    lines = text.splitlines()
    assert len(lines) <= size, "the fixture's filler no longer fits before the hunk"
    indent = next_line[: len(next_line) - len(next_line.lstrip())]
    filler = [f"{indent}pass" if indent and not text else ""] * (size - len(lines))
    return filler + lines


def fixture_script() -> str:
    lines: list[str] = []
    fillers = [BEFORE_FIRST_HUNK, BEFORE_SECOND_HUNK] + [""] * 8
    for (start, old), text in zip(hunks(), fillers):
        lines += _gap(text, start - 1 - len(lines), old[0])
        lines += old
    return "\n".join(lines) + "\n" + AFTER_LAST_HUNK


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    """A checkout-like tree: the fixture script, patched, and the installed megatron package."""
    import megatron.core

    root = tmp_path_factory.mktemp("Megatron-LM")
    (root / "pretrain_gpt.py").write_text(fixture_script())
    (root / "megatron").symlink_to(Path(megatron.core.__file__).parents[1], target_is_directory=True)
    out = subprocess.run(["git", "apply", "--verbose", str(PATCH)], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "with fuzz" not in out.stderr and "offset" not in out.stderr, out.stderr  # the context lines are exact
    return root


def _run(cmd, root):
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", PYTHONWARNINGS="ignore")
    env.pop("MEGATRON_LM", None)
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300, env=env)


def test_patch_imports_exist():
    added = "\n".join(l[1:] for l in PATCH.read_text().splitlines() if l.startswith("+") and not l.startswith("+++"))
    block = re.search(r"from mhc_megatron\.training import \((.*?)\)", added, re.S).group(1)
    names = [n.strip() for n in re.sub(r"#.*", "", block).split(",") if n.strip()]
    assert names == ["add_mhc_patch_arguments", "apply_mhc_to_gpt_config", "chain_args_providers", "mhc_settings_from_args"]
    for name in names:
        assert callable(getattr(training, name)), name


@pytest.mark.slow
def test_patched_script_builds_mhc_layers(patched):
    out = _run([sys.executable, "pretrain_gpt.py", *TINY_GPT_ARGS, "--residual-mode", "mhc", "--expansion-rate", "2"], patched)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LAYER SPEC apply_mhc_to_gpt_config.<locals>.mhc_layer_spec" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("flag,value", [("--pipeline-schedule", "dualpipev"), ("--mhc-log-interval", "10"),
                                        ("--mhc-lr-step-decay", "0.8:0.316,0.9:0.1"), ("--mhc-profile-ranges", None)])
def test_patched_script_refuses_launcher_only_flags(patched, flag, value):
    given = [flag] if value is None else [flag, value]  # None: a store_true flag
    out = _run([sys.executable, "pretrain_gpt.py", *TINY_GPT_ARGS, "--residual-mode", "mhc", *given], patched)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"pretrain_gpt.py: error: {' '.join(given)}: not supported by the patched pretrain_gpt.py" in out.stderr, out.stderr
    assert "launch with mhc-pretrain-gpt instead" in out.stderr
    assert ARGUMENTS_PRINTED not in out.stdout


def test_every_launcher_only_flag_is_refused_here():
    """A flag added to LAUNCHER_ONLY gets a case in the test above."""
    import inspect

    from mhc_megatron.training.patch_entry import LAUNCHER_ONLY

    cases = inspect.getsource(test_patched_script_refuses_launcher_only_flags)
    assert all(f'("{flag}"' in cases for flag in LAUNCHER_ONLY)


@pytest.mark.slow
def test_launcher_names_a_patched_checkout(patched):
    out = _run([sys.executable, "-m", "mhc_megatron.training.launcher", "--megatron-lm", str(patched), *TINY_GPT_ARGS,
                "--residual-mode", "mhc"], patched)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "mhc-pretrain-gpt: error: --megatron-lm: the checkout's pretrain_gpt.py already adds the mHC flags" in out.stderr
    assert "conflicting option string" not in out.stderr and ARGUMENTS_PRINTED not in out.stdout
