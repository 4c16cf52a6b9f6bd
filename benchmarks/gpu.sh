#!/usr/bin/env bash
# The GPU benchmark set, as one command on a lent accelerator (each part under its own time limit,
# so one that hangs or fails leaves the others' results): issue 23's end-to-end comparison and the
# Phase 1 / Phase 6 benchmarks, and issue 20's curvature units with a whole-model GPT-2-small
# Lanczos. Logs and JSON go to $OUT (default ./gpu-out). Usage: bash benchmarks/gpu.sh [SECONDS_SCALE]
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
scale=${1:-1}
part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$(( $2 * scale )); shift 2
  local t0=$(date +%s)
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "=== $name: rc=$rc in $(( $(date +%s) - t0 ))s"; tail -n 40 "$OUT/$name.log"
}
nvidia-smi -L; python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
part e2e 230 python3 benchmarks/end_to_end.py --shape small --samples 64 --torch-device cuda --json "$OUT/e2e.json"
part phase1 70 python3 benchmarks/phase1.py --batch 16 --batches 5 --skip-memory --json "$OUT/phase1.json"
part curvature 120 python3 benchmarks/curvature.py --rounds 3 --batch 16 --lanczos-shape 12,768,12,50257 --json "$OUT/curvature.json"
part phase6 90 python3 benchmarks/phase6.py --config gpt2-small --memory-budget 24e9 --split-k 32 --pallas-split-k 8,32 \
  --layer-chunk 12 --loop-samples 2 --repeats 2 --end-to-end gpt2-small
