#!/usr/bin/env bash
# Every GPU check in one command, each step bounded in time, for a short lease on a GPU
# machine: the GPU tests (kernels and quantized matmul run natively; they get the longest bound,
# as every kernel compiles cold for every shape), then the kernel, KV-cache and compression
# benchmarks, the Hugging Face model on Llama-3-8B shapes (optrun kernels vs Liger vs compile vs
# eager per operation, training tokens/s, int8/int4 weight-only decode, the KV cache at equal
# memory), then a GPU-sized OptimizationRun. Logs and CSVs go to OUTDIR. The bounds add up to
# 570 s: one call of a 15-minute device lease, with room for the machine to start. A machine
# with several GPUs adds the two-rank NCCL run (tests/gpu/test_distributed_gpu.py, 60 s) and the
# scaling benchmark (120 s): 750 s, more than one 600 s call; OUTDIR keeps each step's log.
#
#   bash benchmarks/gpu.sh [OUTDIR]          (PYTHON=... picks the interpreter)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/machine.txt"
step() { # NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit}s)" >&2
  local started=$SECONDS
  timeout -k 5 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$out/$name.log"
  echo "$name: exit $rc in $((SECONDS - started))s" | tee -a "$out/summary.txt"
}
step gpu-tests 160 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/gpu --ignore tests/gpu/test_distributed_gpu.py
step kernels 110 "$py" benchmarks/kernels.py --csv "$out/kernels.csv"
step hf-model 120 "$py" benchmarks/hf_model.py --csv "$out/hf_model.csv" --compile-timeout 20
step kvcache 45 "$py" benchmarks/kvcache.py --no-csv
step compression 45 "$py" benchmarks/compression.py --sections codecs,matmul,weights
step gpu-run 90 "$py" -m optrun.cli run examples/gpu-small.yaml --output "$out/gpu-small" --quiet
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$gpus" -gt 1 ]; then # two ranks on two GPUs end in a decision; scaling, 1 GPU against all (NCCL, DDP)
  step distributed-test 60 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_distributed_gpu.py
  step distributed 120 "$py" benchmarks/distributed.py --device cuda --model small-lm --ranks 1 "$gpus" \
    --per-rank-batch 16 --csv "$out/distributed.csv"
fi
cat "$out/summary.txt"
