#!/bin/bash
# The mHC paper's 27B MoE (n = 4) on 3 nodes x 8 GPUs: PP 3 with DualPipeV (6 stages of 5 layers),
# EP 8, DP 8. Submit from the repository root:
#   DATA_PATH=/data/my-corpus_text_document sbatch examples/moe_27b/sbatch.sh
# Print the per-node command without launching anything (needs the environment only):
#   DATA_PATH=... bash examples/moe_27b/sbatch.sh --dry-run
# Everything about the model and the layout is in config.yaml; this file only launches it.
# The log goes to the submission directory (Slurm does not create directories for --output).
#SBATCH --job-name=mhc-27b
#SBATCH --nodes=3
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

DRY_RUN=0
case "${1:-}" in
    "") ;;
    --dry-run) DRY_RUN=1 ;;
    *) echo "sbatch.sh: error: unknown argument '$1' (the only option is --dry-run)" >&2; exit 2 ;;
esac

CONFIG=${CONFIG:-examples/moe_27b/config.yaml}
DATA_PATH=${DATA_PATH:?set DATA_PATH to a Megatron indexed dataset prefix (path without .bin/.idx)}
TOKENIZER=${TOKENIZER:-deepseek-ai/DeepSeek-V3}
JOB_NAME=${SLURM_JOB_NAME:-mhc-27b}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
RUN_DIR=${RUN_DIR:-$PWD/runs/$JOB_NAME}
CKPT_DIR=$RUN_DIR/checkpoints
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

# the repository's environment (./scripts/setup.sh builds it; GPU nodes also need
# `pip install -e .[gpu]`, transformer-engine: mhc-pretrain-gpt refuses to start without it)
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    source .venv/bin/activate
fi
# fails fast, before any node is busy, on a bad config (--dry-run: launch-args below checks the
# layout and every value; validate-config also builds the model on the meta device, about a minute)
[ "$DRY_RUN" = 1 ] || mhc-megatron validate-config "$CONFIG" > /dev/null

# NCCL over InfiniBand; adapt the interface names to the cluster
export CUDA_DEVICE_MAX_CONNECTIONS=1      # Megatron's TP/SP communication overlap needs it
export NCCL_IB_DISABLE=0
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
export NCCL_NVLS_ENABLE=0
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NVTE_FWD_LAYERNORM_SM_MARGIN=16 NVTE_BWD_LAYERNORM_SM_MARGIN=16

if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads all: no SIGPIPE under pipefail
elif [ "$DRY_RUN" = 1 ]; then
    MASTER_ADDR=${MASTER_ADDR:-localhost}
else
    echo "sbatch.sh: error: SLURM_JOB_NODELIST is not set: submit with sbatch (or try --dry-run)" >&2; exit 2
fi
MASTER_PORT=${MASTER_PORT:-29500}
mapfile -t MODEL_ARGS < <(mhc-megatron launch-args --lines "$CONFIG")

# One array per node command; every element stays one argument, spaces included.
TRAIN_ARGS=(
    "${MODEL_ARGS[@]}"
    --data-path "$DATA_PATH" --split 99,1,0
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER"
    --save "$CKPT_DIR" --load "$CKPT_DIR" --save-interval 1000 --ckpt-format torch_dist
    --eval-interval 1000 --eval-iters 10
    --tensorboard-dir "$RUN_DIR/tensorboard"
)
# The node rank is only known on the node: srun's task expands $SLURM_NODEID there.
NODE_CMD="torchrun --nnodes $NNODES --nproc-per-node $GPUS_PER_NODE --node-rank \$SLURM_NODEID \
--rdzv-backend c10d --rdzv-endpoint ${MASTER_ADDR}:${MASTER_PORT} $(printf '%q' "$(command -v mhc-pretrain-gpt)") \
$(printf '%q ' "${TRAIN_ARGS[@]}")"

if [ "$DRY_RUN" = 1 ]; then
    echo "per-node command (run by: srun --kill-on-bad-exit=1 bash -c '...'):"
    echo "$NODE_CMD"
    exit 0
fi
mkdir -p "$CKPT_DIR" "$RUN_DIR/tensorboard"
srun --kill-on-bad-exit=1 bash -c "$NODE_CMD"
