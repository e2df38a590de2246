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
                 "bench kernels", "compile", "liger", "mhc_megatron.bench.stream_trace", "profile --device cuda",
                 "--recompute"):
        assert what in out, what
    assert sum(step.timeout_s for step in gpu_check.steps("python") if step.min_gpus == 1) <= 8 * 60 - 30  # setup
    assert "examples/small_moe/ep2_overlap.yaml" in out and "only with 2 GPUs" in out


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


def test_stream_overlap_reads_a_chrome_trace():
    """Side stream 7 runs two post+res kernels, [10, 20) and [30, 40); main stream 1 runs [0, 15)
    and [35, 36): 5 + 1 of the 20 us overlap."""
    from mhc_megatron.bench.stream_trace import stream_overlap

    def kernel(name, stream, ts, dur):
        return {"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}

    trace = {"traceEvents": [
        kernel("_post_res_fwd_kernel", 7, 10, 10), kernel("_post_res_fwd_kernel", 7, 30, 10),
        kernel("ampere_sgemm", 1, 0, 15), kernel("ampere_sgemm", 1, 35, 1), kernel("other", 7, 50, 5),
        {"cat": "cpu_op", "name": "_post_res_fwd_kernel", "ts": 0, "dur": 100},
    ]}
    report = stream_overlap(trace)
    assert report["launches"] == 2 and report["kernel_streams"] == [7] and report["all_streams"] == [1, 7]
    assert report["busy_us"] == 20 and report["overlapped_us"] == 6 and report["overlapped_fraction"] == 0.3
    lines = gpu_check._stream_table({**report, "steps": 3, "trace": "t.json"})
    assert "| 2 | [7] | [1, 7] | 20 | 6 us (30%) |" in lines


def test_multiprocess_profile_table():
    report = {"processes": 2, "layout": {"tp": 1, "pp": 1, "cp": 1, "ep": 2, "dp": 2}, "data": "mock data",
              "timing": "Megatron's iteration log", "results": [
                  {"mode": "residual", "step_ms_median": 100.0, "tokens_per_s": 1000.0, "overhead_percent": None},
                  {"mode": "mhc", "step_ms_median": 105.0, "tokens_per_s": 952.4, "overhead_percent": 5.0}]}
    lines = gpu_check._multiprocess_table(report)
    assert "| residual | 100.00 | 1000 | - |" in lines and "| mhc | 105.00 | 952 | +5.0% |" in lines

