"""The test-only CPU redirections of megatron-core are scoped: after their context (or fixture)
ends, megatron-core's original objects are back, the very same objects."""

import pytest
import torch

from mcore_helpers import cpu_redirected, redirected_attributes, whole_process_on_cpu
from pipeline_workers import cpu_schedules


def _lookup(owner, name):
    """The attribute as stored on ``owner`` (a class's own ``__dict__`` entry, not a bound method)."""
    return owner.__dict__[name] if isinstance(owner, type) and name in owner.__dict__ else getattr(owner, name)


def _snapshot(attributes):
    return {(id(owner), name): _lookup(owner, name) for owner, name in attributes}


def _schedules_attributes():
    from megatron.core.pipeline_parallel import schedules

    return [(schedules, "torch")]


_CUDA = [(torch.cuda, "current_device"), (torch.cuda, "synchronize")]
# taken at collection, before any test (or fixture) of the session ran
PRISTINE = _snapshot(redirected_attributes() + _schedules_attributes() + _CUDA)


def _same(before, after):
    assert before.keys() == after.keys()
    changed = [key[1] for key in before if after[key] is not before[key]]
    assert not changed, f"not restored: {changed}"


def test_redirected_attributes_cover_the_cuda_only_spots():
    names = {name for _, name in redirected_attributes()}
    assert {"get_tensor", "fork", "_get_cuda_rng_state", "_set_cuda_rng_state", "gating",
            "_gather_along_first_dim", "_reduce_scatter_along_first_dim"} <= names


@pytest.mark.parametrize(
    "context,attributes",
    [(cpu_redirected, redirected_attributes), (cpu_schedules, _schedules_attributes),
     (whole_process_on_cpu, lambda: _CUDA)],
    ids=["cpu_redirected", "cpu_schedules", "whole_process_on_cpu"],
)
def test_context_restores_the_originals(context, attributes):
    attrs = attributes()
    before = _snapshot(attrs)
    with context():
        inside = _snapshot(attrs)
        assert all(inside[k] is not before[k] for k in before), "the context redirected nothing"
        with context():  # nested use (a worker inside the fixture's redirections) changes nothing more
            pass
        if context is cpu_redirected:
            _same(inside, _snapshot(attrs))
    _same(before, _snapshot(attrs))
    with pytest.raises(RuntimeError, match="boom"):
        with context():
            raise RuntimeError("boom")
    _same(before, _snapshot(attrs))


def test_redirections_work_inside_and_are_gone_after():
    from megatron.core import utils as mcore_utils

    buffer = mcore_utils.GlobalMemoryBuffer()
    with cpu_redirected():
        t = buffer.get_tensor((2, 3), torch.float32, "test")
        assert t.device.type == "cpu" and t.shape == (2, 3)
    assert _lookup(mcore_utils.GlobalMemoryBuffer, "get_tensor") is PRISTINE[(id(mcore_utils.GlobalMemoryBuffer), "get_tensor")]


def test_megatron_world_redirects_for_its_test(megatron_world):
    now = _snapshot(redirected_attributes())
    assert all(now[k] is not PRISTINE[k] for k in now)


def test_nothing_leaked_from_earlier_tests():
    """Run after other tests of the session (e.g. after tests/test_mcore_layers.py, whose tests
    use ``megatron_world``): no redirection outlives its test."""
    _same(PRISTINE, _snapshot(redirected_attributes() + _schedules_attributes() + _CUDA))


def test_launched_process_stays_redirected(tmp_path):
    """The real-loop shim (tests/functional/cpu_shim.py) enters ``cpu_redirected`` for the rest of
    its process: the redirections survive garbage collection (an unreferenced generator context
    would be closed, restoring the originals)."""
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "shim.py"
    script.write_text(
        "import gc, sys\n"
        f"sys.path[:0] = [{os.path.join(tests, 'functional')!r}, {tests!r}]\n"
        "import cpu_shim\n"
        "from megatron.core import utils\n"
        "original = utils.GlobalMemoryBuffer.get_tensor\n"
        "cpu_shim.install()\n"
        "gc.collect()\n"
        "assert utils.GlobalMemoryBuffer.get_tensor is not original, 'the shim lost its redirections'\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
