#!/usr/bin/env bash
# One prepared benchmark for a GPU machine that has only torch (CUDA build) installed and no
# internet: random-weight TroL-1.8B and TroL-3.8B shapes in bf16 (SDPA, or flash-attn when it
# is installed), prefill MFU and captioning images/s at 64 new tokens for traversal
# off/prefill/full at batch 1, 16 and 64. Finishes within about 4 minutes on an H100/H200.
#
#     bash bench/gpu.sh                 # from anywhere; PYTHON=... to pick the interpreter
#     bash bench/gpu.sh --batches 1,16  # extra arguments go to python -m bench.gpu_bench
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu.sh: torch sees no CUDA device")'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "# uptime: $(uptime)"

# The budget leaves the last configurations out rather than overrunning 4 minutes.
timeout 250 "$PY" -m bench.gpu_bench --device cuda --budget-s 200 "$@"

# Where this project's own dependencies are installed too, measure the real trol/ model.
if "$PY" -c 'import transformers' 2>/dev/null; then
    timeout 120 "$PY" -m bench.cpu_efficiency --device cuda --size small --dtypes bfloat16
else
    echo "# transformers is not installed: trol/ itself was not measured on this GPU (torch-only shapes above)"
fi
