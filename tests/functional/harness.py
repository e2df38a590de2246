"""Launch ``mhc-pretrain-gpt`` the way a user does (torchrun, gloo on the CPU through the test shim)
and read Megatron's own log lines back."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ENTRY = os.path.join(HERE, "launch_entry.py")

# A tiny GPT on mock data. Fusions that need CUDA kernels are off; everything else is Megatron's
# default. Dropout is off so that runs of different layouts draw no different masks.
TINY_GPT = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
    "--micro-batch-size 2 --global-batch-size 8 --train-iters 8 --lr 1e-3 --lr-decay-style constant "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 128 --make-vocab-size-divisible-by 32 --transformer-impl local "
    "--normalization RMSNorm --no-gradient-accumulation-fusion --no-persist-layer-norm "
    "--no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion --no-rope-fusion "
    "--num-workers 0 --eval-interval 1000 --eval-iters 1 --log-interval 1 --seed 1234 "
    "--hidden-dropout 0 --attention-dropout 0 --use-cpu-initialization"
).split()



@dataclass
class Run:
    """One launch. ``losses`` are the per-iteration ``lm loss`` values Megatron writes to TensorBoard
    (float32, exact). Its stdout line is not used for them: ``training_log`` does not reset its
    accumulators after a run's first logged iteration, so the second line of every launch shows
    the mean of its first two iterations."""

    argv: list[str]
    returncode: int
    log: str
    scalars: dict[str, dict[int, float]] = field(default_factory=dict)  # tag -> iteration -> value

    @property
    def losses(self) -> dict[int, float]:
        return self.scalars.get("lm loss", {})

    def curve(self) -> list[float]:
        return [self.losses[k] for k in sorted(self.losses)]

    def check(self) -> "Run":
        if self.returncode != 0:
            raise AssertionError(f"launch failed (rc {self.returncode}): {' '.join(self.argv)}\n{self.tail()}")
        if not self.losses:
            raise AssertionError(f"no 'lm loss' line in the log of {' '.join(self.argv)}\n{self.tail()}")
        return self

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_scalars(tensorboard_dir: str) -> dict[str, dict[int, float]]:
    """Every scalar of the TensorBoard event files under ``tensorboard_dir``: tag -> step -> value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for root, _, files in os.walk(tensorboard_dir):
        if not any(f.startswith("events.") for f in files):
            continue
        acc = EventAccumulator(root, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def launch(argv: list[str], nproc: int = 1, *, tensorboard_dir: str, timeout: int = 600, env: dict | None = None,
           cwd: str | None = None) -> Run:
    """Run ``mhc-pretrain-gpt argv`` in ``nproc`` processes (torchrun) writing TensorBoard events to
    ``tensorboard_dir``; ``argv[0] == '--no-mhc-hooks'`` runs the plain-Megatron reference entry instead."""
    argv = [*argv, "--tensorboard-dir", tensorboard_dir]
    port = free_port()
    if nproc == 1:
        cmd = [sys.executable, ENTRY, *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(port), ENTRY, *argv]
    # one thread per process: the CI machine has 2 cores for up to 4 ranks
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", MHC_TEST_PORT=str(port), OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1",
                    PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        log = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        log += f"\n[harness] timed out after {timeout} s"
        rc = -1
    return Run(argv, rc, log, read_scalars(tensorboard_dir) if os.path.isdir(tensorboard_dir) else {})
