"""The first-GPU-run check behind ``scripts/gpu-check.sh``: every step, its command, and the
Markdown report it writes under ``docs/benchmarks/``.

Steps, each under its own time limit so that the whole run stays within 8 minutes on one GPU
(the two-GPU step adds up to 150 s where it runs):

1. the kernel tests on CUDA (every kernel against its reference, the fused sublayer, the Megatron
   layers with the kernels) and the stream-ordering test of the high-priority post+res stream;
2. ``mhc-megatron bench kernels`` at C = 4096 and 7168, 16384 tokens: our kernels, the eager
   reference, ``torch.compile`` of the reference and Liger-Kernel, whose package is installed
   into a temporary virtual environment layered over ``.venv`` when it is not importable;
3. the post+res stream in a profiler trace (:mod:`.stream_trace`): the streams its kernels ran on
   and the share of their time beside another stream's kernels;
4. ``mhc-megatron profile`` of a small GPT, residual against mhc, without and with recompute;
5. on a machine with two GPUs only: ``mhc-megatron profile --config examples/small_moe/ep2_overlap.yaml``,
   the real training loop at expert parallel 2 with ``--overlap-moe-expert-parallel-comm``,
   residual against mhc (one GPU cannot run EP = 2; the report says the step was not run).

``--dry-run`` prints the steps and the report path and runs nothing (works without a GPU).
A step that fails or runs out of time is reported as such in the table; nothing is skipped
silently.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIGER = os.environ.get("LIGER_SPEC", "liger-kernel==0.8.5")  # a version, or a wheel file for offline machines


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: int
    parse: str  # "pytest", "bench", "profile", "stream", "profile-mp"
    env: dict = field(default_factory=dict)
    min_gpus: int = 1  # a step needing more GPUs than the machine has is reported as not run

    def command(self) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (prefix + " " if prefix else "") + " ".join(shlex.quote(a) for a in self.argv)


def steps(python: str) -> list[Step]:
    cli = [python, "-m", "mhc_megatron.cli"]
    return [
        Step("kernel tests (CUDA) and stream ordering", [
            python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py",
            "tests/test_kernels_sublayer.py",
            "tests/test_post_res_stream.py::test_side_stream_result_survives_main_stream_allocations",
        ], 210, "pytest"),
        Step("bench kernels: triton, reference, torch.compile, Liger-Kernel", [
            *cli, "bench", "kernels", "--tokens", "16384", "--hidden", "4096,7168", "--reps", "20",
            "--impls", "triton,reference,compile,liger", "--json",
        ], 130, "bench"),
        Step("post+res stream: its kernels beside other streams' (profiler trace)", [
            python, "-m", "mhc_megatron.bench.stream_trace", "--steps", "3", "--out", "{tmp}/stream-trace", "--json",
        ], 30, "stream"),
        Step("profile small GPT: residual vs mhc", [
            *cli, "profile", "--device", "cuda", "--modes", "residual,mhc", "--steps", "10", "--warmup", "3",
            "--out", "{tmp}/profile", "--json",
        ], 40, "profile"),
        Step("profile small GPT: residual vs mhc, recompute", [
            *cli, "profile", "--device", "cuda", "--modes", "residual,mhc", "--steps", "10", "--warmup", "3",
            "--recompute", "--out", "{tmp}/profile-rc", "--json",
        ], 40, "profile"),
        Step("expert-parallel overlap (EP=2): residual vs mhc, both with --overlap-moe-expert-parallel-comm", [
            *cli, "profile", "--config", "examples/small_moe/ep2_overlap.yaml", "--steps", "10", "--warmup", "3",
            "--out", "{tmp}/ep-overlap", "--json",
        ], 150, "profile-mp", min_gpus=2),
    ]


def report_path(device: str, day: datetime.date) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    return os.path.join(ROOT, "docs", "benchmarks", f"gpu-check-{day.isoformat()}-{slug}.md")


def liger_python(python: str, tmp: str) -> tuple[str, str]:
    """A Python that can import liger_kernel: ``python`` itself, or a temporary venv layered over
    it (a .pth file adds ``python``'s site-packages) with the package installed. Returns
    ``(python, note)``."""
    probe = subprocess.run([python, "-c", "import liger_kernel"], capture_output=True)
    if probe.returncode == 0:
        return python, "Liger-Kernel: already installed"
    venv = os.path.join(tmp, "liger-venv")
    subprocess.run([python, "-m", "venv", "--without-pip", venv], check=True)
    site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    vsite = subprocess.run([os.path.join(venv, "bin", "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(vsite, "base.pth"), "w") as fh:
        fh.write(site + "\n" + ROOT + "\n")
    inst = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--target", vsite, LIGER],
                          capture_output=True, text=True)
    if inst.returncode != 0:
        return python, f"Liger-Kernel: NOT measured, `pip install {LIGER}` failed: {inst.stderr.strip()[-300:]}"
    return os.path.join(venv, "bin", "python"), f"Liger-Kernel: {LIGER} installed into a temporary venv"


def _pytest_summary(out: str) -> str:
    lines = [line for line in out.strip().splitlines() if " in " in line and ("passed" in line or "failed" in line)]
    return lines[-1].strip("= ") if lines else "no pytest summary (see the log)"


def _bench_table(report: dict) -> list[str]:
    lines = [f"copy bandwidth measured in the same run: {report['copy_gbps']:.0f} GB/s", "",
             "| op | pass | tokens | C | impl | ms | GB/s (floor bytes / time) | % of copy | vs reference |",
             "|---|---|---|---|---|---|---|---|---|"]
    ref = {(r["op"], r["pass"], r["tokens"], r["hidden"]): r["ms"] for r in report["records"] if r["impl"] == "reference"}
    for r in report["records"]:
        base = ref.get((r["op"], r["pass"], r["tokens"], r["hidden"]))
        speedup = f"{base / r['ms']:.2f}x" if base else "-"
        lines.append(f"| {r['op']} | {r['pass']} | {r['tokens']} | {r['hidden']} | {r['impl']} | {r['ms']:.3f} | "
                     f"{r['gbps']:.0f} | {100 * r['copy_fraction']:.0f}% | {speedup} |")
    return lines


def _profile_table(report: dict, title: str) -> list[str]:
    c = report["config"]
    lines = [f"{title}: {c['layers']} layers, hidden {c['hidden']}, seq {c['seq_len']} x batch {c['batch_size']}, "
             f"n = {c['expansion_rate']}", "", "| mode | ms/step | overhead | mHC fwd ms | mHC bwd ms |", "|---|---|---|---|---|"]
    for r in report["results"]:
        over = "-" if r["overhead_percent"] is None else f"{r['overhead_percent']:+.1f}%"
        b = r["breakdown_ms"]
        lines.append(f"| {r['mode']} | {r['step_ms_median']:.2f} | {over} | {b['mhc_forward']:.2f} | {b['mhc_backward']:.2f} |")
    return lines


def _stream_table(report: dict) -> list[str]:
    return [f"{report['steps']} profiled steps of a 4-layer mHC GPT (hidden 1024, seq 1024 x 4) with the post+res stream; "
            f"trace kept at {report['trace']}", "",
            "| post+res forward launches | their streams | all kernel streams | kernel time (us) | beside another stream's kernels |",
            "|---|---|---|---|---|",
            f"| {report['launches']} | {report['kernel_streams']} | {report['all_streams']} | {report['busy_us']:.0f} | "
            f"{report['overlapped_us']:.0f} us ({report['overlapped_fraction']:.0%}) |"]


def _multiprocess_table(report: dict) -> list[str]:
    lines = [f"{report['processes']} processes ({report['layout']}), {report['data']}; {report['timing']}", "",
             "| mode | ms/step | tokens/s | overhead |", "|---|---|---|---|"]
    for r in report["results"]:
        over = "-" if r["overhead_percent"] is None else f"{r['overhead_percent']:+.1f}%"
        lines.append(f"| {r['mode']} | {r['step_ms_median']:.2f} | {r['tokens_per_s']:.0f} | {over} |")
    return lines


_TABLES = {"bench": _bench_table, "stream": _stream_table, "profile-mp": _multiprocess_table}


def run(python: str, dry_run: bool) -> int:
    day = datetime.date.today()
    if dry_run:
        pattern = os.path.relpath(report_path("DEVICE", day), ROOT).replace("device", "<device>")
        print(f"gpu-check (dry run): would write {pattern}")
        print(f"0. Liger-Kernel: use it if importable, else `pip install --no-deps {LIGER}` into a temporary venv")
        for i, step in enumerate(steps(python), 1):
            needs = f", only with {step.min_gpus} GPUs" if step.min_gpus > 1 else ""
            print(f"{i}. {step.name} (limit {step.timeout_s} s{needs})\n   {step.command()}")
        return 0
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA GPU; --dry-run lists what it would run")
    device = torch.cuda.get_device_name()
    rows, sections = [], []
    with tempfile.TemporaryDirectory() as tmp:
        liger_py, liger_note = liger_python(python, tmp)
        for step in steps(python):
            if torch.cuda.device_count() < step.min_gpus:
                rows.append(f"| {step.name} | `{step.command()}` | not run: needs {step.min_gpus} GPUs, this machine "
                            f"has {torch.cuda.device_count()} | 0 |")
                continue
            argv = [a.replace("{tmp}", tmp) for a in step.argv]
            if step.parse == "bench":
                argv[0] = liger_py
                if "NOT measured" in liger_note:  # the other columns still run; the report says why
                    argv[argv.index("--impls") + 1] = "triton,reference,compile"
            env = {**os.environ, **step.env}
            env.pop("TRITON_INTERPRET", None)
            start = time.time()
            try:
                proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=step.timeout_s)
                status, out = ("ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"), proc.stdout
                err = proc.stderr
            except subprocess.TimeoutExpired as e:
                status, out, err = f"TIMED OUT after {step.timeout_s} s", (e.stdout or b"").decode(), (e.stderr or b"").decode()
            took = time.time() - start
            result = status
            if step.parse == "pytest":
                result += ": " + _pytest_summary(out)
            elif status == "ok":
                data = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
                table = _TABLES[step.parse](data) if step.parse in _TABLES else _profile_table(data, step.name)
                sections.append((step.name, table))
            if status != "ok":
                sections.append((f"{step.name}: log tail", ["```", (out + err)[-3000:], "```"]))
            rows.append(f"| {step.name} | `{step.command()}` | {result} | {took:.0f} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [f"# GPU check: {device}, {day.isoformat()}", "",
             f"Commit {commit}; torch {torch.__version__}, triton {__import__('triton').__version__}; "
             f"written by `scripts/gpu-check.sh`. {liger_note}.", "",
             "| step | command | result | seconds |", "|---|---|---|---|", *rows]
    for title, body in sections:
        lines += ["", f"## {title}", "", *body]
    path = report_path(device, day)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"gpu-check: wrote {os.path.relpath(path, ROOT)}")
    return 0 if all("| ok" in r or "| not run: needs" in r for r in rows) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu-check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list the steps and the report path; run nothing")
    args = p.parse_args(argv)
    return run(sys.executable, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
