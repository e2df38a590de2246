"""``mhc-pretrain-gpt --megatron-lm PATH`` runs the checkout's megatron for everything.

A fake checkout (built here) has a ``megatron`` package that differs from the installed wheel; its
``pretrain_gpt.py`` reports which megatron modules the process imported and whether the launcher's
hooks sit on the checkout's functions. Each launch runs in a fresh subprocess (the point is what
the process imports first).
"""

import os
import subprocess
import sys
import textwrap

import pytest

FAKE_VERSION = "9.9.9+fake-checkout"

REPORT = """
import sys
import megatron.core
import megatron.training.arguments as arguments
root = {root!r}
foreign = sorted(n for n, m in sys.modules.items()
                 if (n == "megatron" or n.startswith("megatron.")) and getattr(m, "__file__", None)
                 and not m.__file__.startswith(root))
print("CORE", megatron.core.__version__, megatron.core.__file__)
print("FOREIGN", foreign)
print("HOOKED", arguments.parse_and_validate_args.__qualname__)
"""


def fake_checkout(root):
    files = {
        "megatron/__init__.py": "",
        "megatron/core/__init__.py": f"__version__ = {FAKE_VERSION!r}\n",
        "megatron/training/__init__.py": "",
        # the attributes the launcher's hooks replace
        "megatron/training/arguments.py": "def parse_and_validate_args(*a, **k):\n    raise SystemExit('not hooked')\n",
        "megatron/training/argument_utils.py": "def gpt_config_from_args(*a, **k): pass\n"
                                               "def hybrid_config_from_args(*a, **k): pass\n",
        "pretrain_gpt.py": REPORT.format(root=str(root)),
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


# the console script's import, and python -m
ENTRIES = {
    "console-script": [sys.executable, "-c", "import sys; from mhc_megatron.training.launcher import main; sys.exit(main())"],
    "python -m": [sys.executable, "-m", "mhc_megatron.training.launcher"],
}


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_checkout_megatron_is_the_only_megatron(tmp_path, entry):
    root = fake_checkout(tmp_path / "Megatron-LM")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("MEGATRON_LM", None)
    out = subprocess.run([*ENTRIES[entry], "--megatron-lm", str(root), "--num-layers", "2"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"mhc-pretrain-gpt: Megatron-LM checkout {root}: megatron-core {FAKE_VERSION} from {root}" in lines
    assert f"CORE {FAKE_VERSION} {root / 'megatron' / 'core' / '__init__.py'}" in lines
    assert "FOREIGN []" in lines  # nothing came from the installed wheel
    assert "HOOKED parse_and_validate_args_hook.<locals>.parse_and_validate_args" in lines


def test_checkout_without_megatron_is_named(tmp_path):
    (tmp_path / "pretrain_gpt.py").write_text("")
    out = subprocess.run([*ENTRIES["python -m"], "--megatron-lm", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"mhc-pretrain-gpt: error: --megatron-lm {tmp_path}: no megatron/core package there" in out.stderr


@pytest.mark.parametrize("script,extra", [("pretrain_gpt.py", []), ("pretrain_hybrid.py", ["--hybrid-layer-pattern", "*-"])])
def test_checkout_without_pretrain_gpt_is_refused_before_megatron_is_imported(tmp_path, script, extra):
    """A tree with megatron/ but without the entry script (a wheel's site-packages, a sub-directory of
    the checkout) is refused by the console entry, naming the flag, the path and the fix, before
    the checkout's (here: failing) megatron is imported."""
    root = fake_checkout(tmp_path / "Megatron-LM")
    (root / "megatron" / "core" / "__init__.py").write_text("raise SystemExit('imported')\n")
    if script == "pretrain_gpt.py":
        (root / script).unlink()
    else:  # the GPT script is there, the hybrid one is what the pattern needs
        (root / "pretrain_gpt.py").write_text("raise SystemExit('wrong script')\n")
    out = subprocess.run([*ENTRIES["console-script"], "--megatron-lm", str(root), "--num-layers", "2", *extra],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout == ""  # refused before the launch log line, i.e. before use_checkout
    assert out.stderr.startswith(f"mhc-pretrain-gpt: error: --megatron-lm {root}: no {script} there; give the root "
                                 f"of a Megatron-LM checkout (the directory holding {script} and megatron/"), out.stderr
    assert "or drop --megatron-lm (and unset $MEGATRON_LM) to run the built-in entry" in out.stderr


def test_megatron_imported_already_is_refused(tmp_path):
    """In-process callers that imported the wheel's megatron cannot switch to a checkout."""
    import megatron.core  # noqa: F401  (the wheel's)

    from mhc_megatron.training.checkout import use_checkout

    root = fake_checkout(tmp_path / "Megatron-LM")
    with pytest.raises(ValueError, match="already imported megatron from .*fresh process"):
        use_checkout(str(root))


@pytest.mark.compat
@pytest.mark.skipif(not os.environ.get("MEGATRON_LM"), reason="needs a Megatron-LM checkout in $MEGATRON_LM")
def test_upstream_mhc_flag_is_refused_in_checkout_mode():
    """Megatron-LM main's parser knows --enable-mhc-connections; on the checkout route it is ours to refuse."""
    from launcher_workers import TINY_GPT_ARGS

    checkout = os.environ["MEGATRON_LM"]
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", PYTHONWARNINGS="ignore")
    out = subprocess.run([*ENTRIES["python -m"], "--megatron-lm", checkout, *TINY_GPT_ARGS, "--residual-mode", "mhc",
                          "--enable-mhc-connections"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"megatron-core" in out.stdout and os.path.abspath(checkout) in out.stdout
    assert "--residual-mode mhc and upstream Megatron's --enable-mhc-connections" in out.stderr, out.stderr[-2000:]
