"""scripts/gpu-check.sh: the dry run (what a GPU machine would run) and the report tables."""

import os
import stat

import pytest

from mhc_megatron.bench import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_lists_every_step_within_eight_minutes(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "docs/benchmarks/gpu-check-" in out and "<device>.md" in out
    for what in ("tests/test_kernels.py", "tests/test_kernels_sublayer.py",
                 "test_post_res_stream.py::test_side_stream_result_survives_main_stream_allocations",
                 "bench kernels", "compile", "liger", "profile --device cuda", "--recompute"):
        assert what in out, what
    assert sum(step.timeout_s for step in gpu_check.steps("python")) <= 8 * 60 - 30  # room for setup


def test_the_script_runs_the_module_and_passes_its_arguments():
    path = os.path.join(ROOT, "scripts", "gpu-check.sh")
    assert os.stat(path).st_mode & stat.S_IXUSR
    with open(path) as f:
        text = f.read()
    assert "-m mhc_megatron.bench.gpu_check \"$@\"" in text


def test_without_a_gpu_it_refuses_and_names_the_dry_run(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU; --dry-run lists what it would run"):
        gpu_check.main([])


def test_report_tables():
    bench = {"copy_gbps": 4000.0, "records": [
        {"op": "pre", "pass": "fwd", "tokens": 16, "hidden": 64, "impl": "reference", "ms": 2.0, "gbps": 10.0,
         "copy_fraction": 0.1},
        {"op": "pre", "pass": "fwd", "tokens": 16, "hidden": 64, "impl": "triton", "ms": 0.5, "gbps": 40.0,
         "copy_fraction": 0.4}]}
    table = gpu_check._bench_table(bench)
    assert "| pre | fwd | 16 | 64 | triton | 0.500 | 40 | 40% | 4.00x |" in table
    profile = {"config": {"layers": 4, "hidden": 128, "seq_len": 128, "batch_size": 8, "expansion_rate": 4},
               "results": [{"mode": "residual", "step_ms_median": 10.0, "overhead_percent": None,
                            "breakdown_ms": {"mhc_forward": 0.0, "mhc_backward": 0.0}},
                           {"mode": "mhc", "step_ms_median": 11.0, "overhead_percent": 10.0,
                            "breakdown_ms": {"mhc_forward": 0.4, "mhc_backward": 0.5}}]}
    assert "| mhc | 11.00 | +10.0% | 0.40 | 0.50 |" in gpu_check._profile_table(profile, "p")
    assert gpu_check._pytest_summary("....\n12 passed, 1 skipped in 3.2s\n") == "12 passed, 1 skipped in 3.2s"
