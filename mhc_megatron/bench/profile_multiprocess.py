"""``mhc-megatron profile --config launch.yaml`` for a launch of more than one process: the user's real
launch, run twice with torchrun (residual mode, then as configured), timed by Megatron's own log.

Each run trains ``warmup + steps`` iterations on mock data with ``--log-interval 1``; the last rank
prints Megatron's ``elapsed time per iteration (ms): X`` for every iteration, and the profile takes
the median of the iterations after the warm-up. The residual run drops ``expansion_rate`` and every
``mhc_*`` flag; both runs drop the config's checkpoint and logging sections (no checkpoint is read
or written, nothing goes to the user's TensorBoard or W&B), its data paths and the flags that set
the run's length and learning-rate warm-up/decay, which the profile sets itself.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
from dataclasses import dataclass, field

ENTRY_MODULE = "mhc_megatron.training.launcher"  # mhc-pretrain-gpt's module (pyproject.toml)
MHC_KEYS = ("residual_mode", "expansion_rate")  # plus every key starting with mhc_
# what the profile sets itself (length, logging, evaluation, data) or must not touch (checkpoints)
RUN_KEYS = (
    "train_iters", "train_samples", "log_interval", "eval_iters", "eval_interval", "exit_interval",
    "exit_duration_in_mins", "lr_warmup_iters", "lr_warmup_samples", "lr_warmup_fraction", "lr_decay_iters",
    "lr_decay_samples", "lr_wsd_decay_iters", "lr_wsd_decay_samples", "rampup_batch_size", "mock_data",
    "data_path", "train_data_path", "valid_data_path", "test_data_path", "split", "data_cache_path",
    "per_split_data_args_path", "data_args_path", "profile", "profile_step_start", "profile_step_end",
)
DROPPED_SECTIONS = ("checkpoint", "logging")  # their mhc_* keys stay (for the mHC run)
EVAL_INTERVAL = 10**9  # no evaluation inside the timed run
LOG_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+)")
MIN_WARMUP = 2  # Megatron's second log line averages the first two iterations (it resets after it)


def launch_world_size(cfg) -> int:
    """The smallest world size Megatron accepts for the launch: tensor x pipeline x context x the
    smallest data-parallel size whose tensor x context x data ranks split into expert x expert-tensor
    parallel groups (Megatron's check)."""
    tp = int(cfg.get("tensor_model_parallel_size", 1))
    pp = int(cfg.get("pipeline_model_parallel_size", 1))
    cp = int(cfg.get("context_parallel_size", 1))
    ep = int(cfg.get("expert_model_parallel_size", 1))
    etp = int(cfg.get("expert_tensor_parallel_size", tp))
    expert_group = ep * etp
    dp = expert_group // math.gcd(tp * cp, expert_group)
    return tp * pp * cp * dp


def _is_mhc_key(key: str) -> bool:
    return key in MHC_KEYS or key.startswith("mhc_")


def run_flags(cfg, mode: str, steps: int, warmup: int, overrides: dict | None = None) -> list[str]:
    """The launch's flags for one profile run of ``mode`` (``residual``: no expansion rate, no mhc_*
    flag), with the run length, logging, evaluation and mock data of the profile."""
    flags = dict(cfg.flags)
    flags.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for key in list(flags):
        dropped_section = cfg.sections.get(key) in DROPPED_SECTIONS and not key.startswith("mhc_")
        if key in RUN_KEYS or dropped_section or (mode == "residual" and _is_mhc_key(key)):
            del flags[key]
    if mode != "residual":
        flags.pop("residual_mode", None)
    from ..launch.config import LaunchConfig

    argv = LaunchConfig(path=cfg.path, flags=flags).argv()
    return ["--residual-mode", mode, *argv, "--train-iters", str(warmup + steps), "--log-interval", "1",
            "--eval-iters", "0", "--eval-interval", str(EVAL_INTERVAL), "--mock-data"]


def iteration_times(log: str) -> dict[int, float]:
    """Megatron's ``elapsed time per iteration (ms)`` per iteration, from a run's output."""
    return {int(m.group(1)): float(m.group(2)) for m in LOG_LINE.finditer(log)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProfileRunFailed(RuntimeError):
    """A profile run exited non-zero or printed no iteration time (the message names it, with its log tail)."""


@dataclass
class MultiProcessRun:
    mode: str
    command: list[str]
    returncode: int
    log: str
    times: dict[int, float] = field(default_factory=dict)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.splitlines()[-lines:])


def torchrun_command(nproc: int, entry: str | None, flags: list[str], port: int) -> list[str]:
    target = [entry] if entry else ["-m", ENTRY_MODULE]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(port), *target, *flags]


def run_one(mode: str, nproc: int, entry: str | None, flags: list[str], out_dir: str, timeout: int) -> MultiProcessRun:
    port = _free_port()
    cmd = torchrun_command(nproc, entry, flags, port)
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_DEVICE_MAX_CONNECTIONS="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        out = err.stdout or ""
        log = (out.decode() if isinstance(out, bytes) else out) + f"\n[mhc-megatron profile] timed out after {timeout} s"
        rc = -1
    with open(os.path.join(out_dir, f"{mode}.log"), "w") as f:
        f.write(log)
    return MultiProcessRun(mode, cmd, rc, log, iteration_times(log))


def _device(nproc: int, entry: str | None) -> str:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= nproc:
        return "cuda"
    if entry is None:
        raise ValueError(f"the launch needs {nproc} processes, one GPU each, and this machine has {gpus} GPU(s); "
                         "run the profile where the launch fits, or give --entry a script that runs it here "
                         "(such as tests/functional/launch_entry.py, Megatron on the CPU)")
    return "cpu"


def profile_multiprocess(path: str, *, modes: tuple[str, ...] | None = None, steps: int = 10, warmup: int = 3,
                         overrides: dict | None = None, entry: str | None = None, out_dir: str = "profile-out",
                         timeout: int = 1800) -> dict:
    """Run the launch at ``path`` once per mode (residual first) with torchrun and report the median
    iteration time of each, its tokens per second and the overhead against the residual run."""
    import dataclasses

    from ..launch.config import check_layout, load_launch_config

    cfg = load_launch_config(path)
    nproc = launch_world_size(cfg)
    mode = cfg.get("residual_mode", "residual")
    modes = tuple(modes) if modes else ("residual", mode)
    if modes[0] != "residual" or len(modes) < 2 or any(m not in ("hc", "mhc") for m in modes[1:]):
        raise ValueError(f"--config {path}: the profile compares hc or mhc against residual, got modes "
                         f"{','.join(modes)}" + (": set residual_mode: mhc" if mode == "residual" else ""))
    if steps < 1:
        raise ValueError("--steps must be at least 1")
    warmup = max(warmup, MIN_WARMUP)
    sized = dataclasses.replace(cfg, flags={**cfg.flags, **{k: v for k, v in (overrides or {}).items() if v is not None}},
                                cluster={"nodes": 1, "gpus_per_node": nproc})
    try:
        layout = check_layout(sized)
    except ValueError as err:
        raise ValueError(f"--config {path}: at the profile's {nproc} processes: {err}") from None
    if entry is not None and not os.path.isfile(entry):
        raise ValueError(f"--entry {entry}: no such file")
    device = _device(nproc, entry)
    os.makedirs(out_dir, exist_ok=True)
    seq = int(sized.get("seq_length"))
    gbs = int(sized.get("global_batch_size", int(sized.get("micro_batch_size", 1)) * layout.dp))
    results, base = [], None
    for m in modes:
        run = run_one(m, nproc, entry, run_flags(cfg, m, steps, warmup, overrides), out_dir, timeout)
        timed = [run.times[i] for i in sorted(run.times) if i > warmup]
        if run.returncode != 0 or not timed:
            why = f"exited with {run.returncode}" if run.returncode != 0 else "printed no iteration time after the warm-up"
            raise ProfileRunFailed(f"the {m} run {why}: {shlex.join(run.command)}\n(log: "
                               f"{os.path.join(out_dir, m + '.log')}; its last lines:)\n{run.tail()}")
        median = statistics.median(timed)
        base = median if m == "residual" else base
        results.append({
            "mode": m, "step_ms_median": round(median, 3), "tokens_per_s": round(gbs * seq / (median / 1000.0), 1),
            "overhead_percent": None if m == "residual" else round(100.0 * (median / base - 1.0), 2),
            "iteration_ms": [run.times[i] for i in sorted(run.times)], "timed_iterations": len(timed),
            "command": run.command, "log": os.path.join(out_dir, f"{m}.log"),
        })
    return {
        "kind": "multi-process", "launch_config": path, "device": device, "processes": nproc,
        "layout": {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "ep": layout.ep, "dp": layout.dp},
        "entry": entry or f"-m {ENTRY_MODULE} (mhc-pretrain-gpt)", "data": "mock data (--mock-data)",
        "steps": steps, "warmup": warmup, "global_batch_size": gbs, "seq_length": seq,
        "timing": "Megatron's 'elapsed time per iteration (ms)' of the last rank, median over the timed iterations",
        "results": results,
    }
