#!/usr/bin/env bash
# The first run on a machine with one CUDA GPU, in one command (within 8 minutes): the kernel
# tests on CUDA and the stream-ordering test, bench kernels against torch.compile and
# Liger-Kernel, and the overhead profile of a small GPT; writes one Markdown report under
# docs/benchmarks/. --dry-run lists the steps without running them (no GPU needed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m mhc_megatron.bench.gpu_check "$@"
