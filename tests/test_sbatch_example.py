"""examples/moe_27b/sbatch.sh run with stub Slurm and torchrun binaries: the per-node command it
prints (--dry-run) and the arguments torchrun really receives, a data path with a space included."""

import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "moe_27b", "sbatch.sh")
BIN = os.path.dirname(sys.executable)  # the environment's mhc-megatron and mhc-pretrain-gpt
DATA = "/data/my corpus/text_document"

STUBS = {
    "scontrol": 'echo node-a; echo node-b; echo node-c\n',
    # srun runs the node command once, as node 1 would
    "srun": 'echo "srun $1" > "$STUB_LOG/srun"; shift; SLURM_NODEID=1 "$@"\n',
    "torchrun": 'printf "%s\\n" "$@" > "$STUB_LOG/torchrun"\n',
    # validate-config builds the 27B model on the meta device (a minute; tests/test_launch_config.py)
    "mhc-megatron": '[ "$1" = validate-config ] && { echo "$@" > "$STUB_LOG/validate"; exit 0; }\n'
                    'exec "$REAL_BIN/mhc-megatron" "$@"\n',
}


def _run(tmp_path, *args, **env):
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        (stubs / name).write_text("#!/bin/bash\n" + body)
        (stubs / name).chmod(0o755)
    full_env = {
        "PATH": f"{stubs}:{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "VIRTUAL_ENV": os.path.dirname(BIN),
        "STUB_LOG": str(tmp_path), "REAL_BIN": BIN, "DATA_PATH": DATA, "RUN_DIR": str(tmp_path / "run dir"),
        "SLURM_JOB_NAME": "mhc-27b", "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_NODELIST": "node-[a-c]",
        "PYTHONWARNINGS": "ignore", **env,
    }
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=300)


def _model_args():
    out = subprocess.run([sys.executable, "-m", "mhc_megatron.cli", "launch-args", "--lines",
                          os.path.join(ROOT, "examples", "moe_27b", "config.yaml")],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_the_output_file_needs_no_directory():
    lines = [line for line in open(SCRIPT) if line.startswith("#SBATCH --output=")]
    assert lines == ["#SBATCH --output=%x-%j.out\n"]  # Slurm does not create directories


def test_dry_run_prints_the_per_node_command(tmp_path):
    out = _run(tmp_path, "--dry-run")
    assert out.returncode == 0, out.stderr
    command = out.stdout.splitlines()[-1]
    words = shlex.split(command)
    assert words[:9] == ["torchrun", "--nnodes", "3", "--nproc-per-node", "8", "--node-rank", "$SLURM_NODEID",
                         "--rdzv-backend", "c10d"]
    assert words[10] == "node-a:29500"
    assert words[11] == os.path.join(BIN, "mhc-pretrain-gpt")
    rest = words[12:]
    assert rest[:len(_model_args())] == _model_args()
    assert rest[rest.index("--data-path") + 1] == DATA
    assert rest[rest.index("--save") + 1] == str(tmp_path / "run dir" / "checkpoints")
    assert not (tmp_path / "srun").exists() and not (tmp_path / "run dir").exists()  # nothing launched


def test_torchrun_receives_each_argument_whole(tmp_path):
    out = _run(tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "validate").read_text() == "validate-config examples/moe_27b/config.yaml\n"
    assert (tmp_path / "srun").read_text() == "srun --kill-on-bad-exit=1\n"
    argv = (tmp_path / "torchrun").read_text().splitlines()
    assert argv[argv.index("--node-rank") + 1] == "1"  # expanded on the node, not at submission
    assert argv[argv.index("--data-path") + 1] == DATA
    assert argv[argv.index("--tensorboard-dir") + 1] == str(tmp_path / "run dir" / "tensorboard")
    assert argv[argv.index("--moe-layer-freq") + 1] == "([0]+[1]*29)"
    assert (tmp_path / "run dir" / "checkpoints").is_dir()


@pytest.mark.parametrize("args,env,message", [
    (["--dryrun"], {}, "unknown argument '--dryrun'"),
    ([], {"SLURM_JOB_NODELIST": ""}, "SLURM_JOB_NODELIST is not set"),
    (["--dry-run"], {"DATA_PATH": ""}, "set DATA_PATH"),
])
def test_refusals(tmp_path, args, env, message):
    out = _run(tmp_path, *args, **env)
    assert out.returncode != 0 and message in out.stderr, out.stderr
