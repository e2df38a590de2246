"""The registry of runtime changes to Megatron: complete, reversible, documented."""

import ast
import importlib
import os
import re

import pytest

from mhc_megatron import hooks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "mhc_megatron")


def _current(hook):
    owner, attribute = hook.owner_and_attribute()  # a module, or a class for "module:Class.attr"
    return getattr(owner, attribute)


class _Log:
    def wrap_training_log(self, original):
        return lambda *a, **k: original(*a, **k)


# hooks of one attribute: (schedule hooks of get_forward_backward_func, hooks of torch.cuda.current_device)
EXCLUSIVE = (("dualpipev-schedule", "pipeline-stream-shapes"),
             ("meta-device-build", "checkpoint-io-device", "cpu-model-device"))


@pytest.mark.parametrize("choice", [0, 1, 2])
def test_every_hook_installs_idempotently_and_uninstalls_to_megatrons_original(choice):
    from mhc_megatron.training.launcher import LaunchState

    left_out = {name for group in EXCLUSIVE for i, name in enumerate(group) if i != choice % len(group)}
    names = [h.name for h in hooks.HOOKS if h.name not in left_out]
    originals = {n: _current(hooks.BY_NAME[n]) for n in names}
    assert hooks.installed() == []
    with hooks.active(*[n for n in names if n != "diagnostics-log"], context=LaunchState()):
        hooks.install("diagnostics-log", _Log())
        replaced = {n: _current(hooks.BY_NAME[n]) for n in names}
        assert all(replaced[n] is not originals[n] for n in names), "a hook that changes nothing"
        hooks.install("arguments", LaunchState())  # idempotent: the installed one stays
        assert _current(hooks.BY_NAME["arguments"]) is replaced["arguments"]
        assert all(hooks.original(n) is originals[n] for n in names)
        assert sorted(hooks.installed()) == sorted(names)
        for other in left_out:
            with pytest.raises(RuntimeError, match="both replace"):
                hooks.install(other)
    assert hooks.installed() == []
    for name, original in originals.items():
        assert _current(hooks.BY_NAME[name]) is original, name


def test_uninstall_refuses_when_someone_replaced_the_attribute_after_us():
    import megatron.training.training as training

    original = training.get_forward_backward_func
    hooks.install("dualpipev-schedule")
    try:
        training.get_forward_backward_func = lambda: None  # a third party's change on top of ours
        with pytest.raises(RuntimeError, match="replaced again after us"):
            hooks.uninstall("dualpipev-schedule")
    finally:
        training.get_forward_backward_func = hooks._installed["dualpipev-schedule"][3]
        hooks.uninstall("dualpipev-schedule")
    assert training.get_forward_backward_func is original


def _megatron_aliases(tree) -> set[str]:
    """Names a module binds to megatron (or torch.cuda) objects by import."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("megatron") or a.name == "torch":
                    names.add((a.asname or a.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron"):
            names.update(a.asname or a.name for a in node.names)
    return names


def _assignments_to_imported_objects(path):
    tree = ast.parse(open(path).read(), path)
    aliases = _megatron_aliases(tree)
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
        for t in targets:
            base = t
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(t, ast.Attribute) and isinstance(base, ast.Name) and base.id in aliases:
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {ast.unparse(t)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Name) and first.id in aliases:
                found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} setattr({first.id}, ...)")
    return found


def test_nothing_outside_the_registry_assigns_to_megatron():
    offenders = []
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            path = os.path.join(folder, f)
            if f.endswith(".py") and path != os.path.join(PACKAGE, "hooks.py"):
                offenders += _assignments_to_imported_objects(path)
    assert offenders == [], "runtime changes to Megatron belong in mhc_megatron/hooks.py:\n" + "\n".join(offenders)


def test_the_grep_finds_a_runtime_change(tmp_path):
    """The check above can fail: an assignment like the ones the registry replaced is caught."""
    source = tmp_path / "m.py"
    source.write_text("import megatron.training.training as training\n"
                      "from megatron.core import parallel_state\n"
                      "training.training_log = print\nparallel_state._X = 1\nsetattr(training, 'a', 1)\n")
    assert len(_assignments_to_imported_objects(str(source))) == 3


def test_the_docs_table_is_the_registry():
    text = open(os.path.join(ROOT, "docs", "megatron.md")).read()
    match = re.search(r"<!-- hooks table: start -->\n(.*?)<!-- hooks table: end -->", text, re.S)
    assert match, "docs/megatron.md lost its hooks table markers"
    assert match.group(1) == hooks.table(), "regenerate: python -c 'from mhc_megatron import hooks; print(hooks.table())'"
