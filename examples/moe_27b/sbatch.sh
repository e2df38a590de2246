#!/bin/bash
# The mHC paper's 27B MoE (n = 4) on 3 nodes x 8 GPUs: PP 3 with DualPipeV (6 stages of 5 layers),
# EP 8, DP 8. Submit from the repository root:
#   DATA_PATH=/data/my-corpus_text_document sbatch examples/moe_27b/sbatch.sh
# Everything about the model and the layout is in config.yaml; this file only launches it.
#SBATCH --job-name=mhc-27b
#SBATCH --nodes=3
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

CONFIG=${CONFIG:-examples/moe_27b/config.yaml}
DATA_PATH=${DATA_PATH:?set DATA_PATH to a Megatron indexed dataset prefix (path without .bin/.idx)}
TOKENIZER=${TOKENIZER:-deepseek-ai/DeepSeek-V3}
RUN_DIR=${RUN_DIR:-$PWD/runs/$SLURM_JOB_NAME}
CKPT_DIR=$RUN_DIR/checkpoints
mkdir -p "$CKPT_DIR" "$RUN_DIR/tensorboard" logs

# the repository's environment (./scripts/setup.sh builds it; GPU images add transformer-engine)
source .venv/bin/activate
mhc-megatron validate-config "$CONFIG"   # fails fast, before any node is busy, on a bad layout

# NCCL over InfiniBand; adapt the interface names to the cluster
export CUDA_DEVICE_MAX_CONNECTIONS=1      # Megatron's TP/SP communication overlap needs it
export NCCL_IB_DISABLE=0
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
export NCCL_NVLS_ENABLE=0
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NVTE_FWD_LAYERNORM_SM_MARGIN=16 NVTE_BWD_LAYERNORM_SM_MARGIN=16

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
mapfile -t MODEL_ARGS < <(mhc-megatron launch-args --lines "$CONFIG")

srun --kill-on-bad-exit=1 bash -c "torchrun \
    --nnodes $SLURM_NNODES --nproc-per-node 8 --node-rank \$SLURM_NODEID \
    --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT \
    \$(which mhc-pretrain-gpt) ${MODEL_ARGS[*]@Q} \
    --data-path $DATA_PATH --split 99,1,0 \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model $TOKENIZER \
    --save $CKPT_DIR --load $CKPT_DIR --save-interval 1000 --ckpt-format torch_dist \
    --eval-interval 1000 --eval-iters 10 \
    --tensorboard-dir $RUN_DIR/tensorboard"
