#!/usr/bin/env bash
# Absolute GPU figures: `prunevid bench speed` at LLaVA-OneVision-7B and Qwen2.5-VL-7B layer sizes
# (all 28 decoder layers, random weights), bf16, SDPA, on CUDA; each run's table is appended to
# docs/bench_speed.md (or $GPU_CHECK_OUT) and its JSON written beside it. About 5 minutes on one
# H100/H200 (the 7B models are built on the CPU first: ~30 GB of host memory each, in fp32).
# Without a CUDA GPU it says so in one line and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU on this machine; nothing measured, docs/bench_speed.md unchanged."
  exit 0
fi

out="${GPU_CHECK_OUT:-docs/bench_speed.md}"
for arch in qwen2-7b qwen2.5-vl-7b; do
  python scripts/gpu_bench.py --append "$out" -- \
    --arch "$arch" --dtype bfloat16 --video assets/bbb.mp4 --frames 16 --repeats 3 --new-tokens 32 \
    --stage1-retention 0.4 --alpha 0.4 --seed 0 --warmup-frames 2 --vision-frames 16 \
    --json "docs/bench_speed_${arch}_bfloat16_cuda.json"
done
