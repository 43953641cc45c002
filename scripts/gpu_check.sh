#!/usr/bin/env bash
# Absolute GPU figures: `prunevid bench speed --device cuda --profile` at LLaVA-OneVision-7B and
# Qwen2.5-VL-7B layer sizes (all 28 decoder layers, random weights), bf16, SDPA: the timed table,
# per method a profile of its prefill and decode step (kernels, syncs, device-host copies,
# GPU-busy and host-overhead ms), and every method at equal budgets of 25 / 15 / 10%. Each run's
# report is appended to docs/bench_speed.md (or $GPU_CHECK_OUT) under a heading naming the GPU,
# its JSON written beside it. 8 minutes on an H200 when each 7B model was built on the CPU (70 s
# each); it is now made and filled with random weights on the GPU.
# Without a CUDA GPU it says so in one line and exits 0.
# GPU_CHECK_DEVICE and GPU_CHECK_ARCHS change where and what it measures (the tests run it on the CPU,
# without the profile: it doubles a CPU run, and tests/test_bench_gpu_ready.py covers it);
# PYTHON is the interpreter with torch and prunevid's dependencies (default: `python` on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python="${PYTHON:-python}"
device="${GPU_CHECK_DEVICE:-cuda}"
out="${GPU_CHECK_OUT:-docs/bench_speed.md}"
if [[ "$device" == cuda* ]] && ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU on this machine; nothing measured, $out unchanged."
  exit 0
fi

gpu="$("$python" -c 'import sys, torch; d = torch.device(sys.argv[1]); print(torch.cuda.get_device_name(d) if d.type == "cuda" else "CPU")' "$device")"
profile="--profile"
[[ "$device" == cuda* ]] || profile=""
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
for arch in ${GPU_CHECK_ARCHS:-qwen2-7b qwen2.5-vl-7b}; do
  "$python" -m prunevid.cli bench speed --device "$device" --arch "$arch" --dtype bfloat16 \
    --video assets/bbb.mp4 --frames 16 --repeats 3 --new-tokens 32 --stage1-retention 0.4 --alpha 0.4 \
    --seed 0 --warmup-frames 2 --vision-frames 16 --retentions 0.25,0.15,0.1 $profile \
    --json "$(dirname "$out")/bench_speed_${arch}_bfloat16_${device%%:*}.json" --markdown "$report"
  { printf '\n## %s: %s, bfloat16, on %s (scripts/gpu_check.sh, %s)\n\n' "$gpu" "$arch" "$device" "$(date -u +%F)"
    cat "$report"; } >> "$out"
  echo "gpu_check: appended $arch on $device to $out"
done
