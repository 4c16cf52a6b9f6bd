#!/usr/bin/env bash
# The GPU benchmark set, as one command on a lent accelerator, each part under its own time limit
# so that one that hangs or fails leaves the others' results: issue 23's end-to-end comparison and
# the Phase 1 / Phase 6 benchmarks, issue 20's curvature units with a whole-model GPT-2-small
# Lanczos, the device-to-host copy routes, and kept token factors formed on the device (reads) and
# read by one QK-OV ordered pair (qkovpair), Phase 5's Grams on kept factors and its host tests
# (conflicts); e2e32 also sets each phase against its matrix-product floor (work_floors.py); compare
# runs the method comparison on GPT-2 small with its gradients held and, given less memory, formed
# in column slices before K-FAC (each stretch's peak: the passes' working memory); headgroups times a
# Llama-7B-shaped QK-OV heatmap whose tiles are cut into groups of heads, staged on the device or
# read from the host by every group. Logs and JSON go to $OUT (default ./gpu-out).
# Usage: bash benchmarks/gpu.sh [PART[:SECONDS] ...]   (default: every part with its default limit)
# Parts: hostcopy phase1 phase6 curvature e2e e2e32 reads qkovpair conflicts compare headgroups
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
declare -A LIMIT=([hostcopy]=40 [phase1]=70 [phase6]=90 [curvature]=120 [e2e]=230 [e2e32]=260 [reads]=40 [qkovpair]=120 [conflicts]=150 [compare]=240 [headgroups]=150)
run_part() {  # run_part NAME SECONDS
  local name=$1 limit=$2 t0
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s)"
  case $name in
    hostcopy) timeout "$limit" python3 benchmarks/host_copy.py ;;
    phase1) timeout "$limit" python3 benchmarks/phase1.py --batch 16 --batches 5 --skip-memory --json "$OUT/phase1.json" ;;
    phase6) timeout "$limit" python3 benchmarks/phase6.py --config gpt2-small --memory-budget 24e9 --split-k 32 \
              --pallas-split-k 8,32 --layer-chunk 12 --loop-samples 2 --repeats 2 ;;
    curvature) timeout "$limit" python3 benchmarks/curvature.py --rounds 3 --batch 16 --lanczos-shape 12,768,12,50257 \
              --factor-precision highest,bfloat16_3x,tensorfloat32 --json "$OUT/curvature.json" ;;
    e2e) timeout "$limit" python3 benchmarks/end_to_end.py --shape small --samples 64 --torch-device cuda --json "$OUT/e2e.json" ;;
    e2e32) timeout "$limit" python3 benchmarks/end_to_end.py --shape small --samples 32 --torch-device cuda --keep \
              --json "$OUT/e2e32.json"
           work=$(ls -td /tmp/fisherjax-e2e-*/ 2>/dev/null | head -n 1)  # the run's kept working directory
           if [ -n "$work" ] && [ -f "$work/results-1.json" ]; then
             cp "$work/results-1.json" "$OUT/e2e32-results.json"
             timeout 120 python3 benchmarks/work_floors.py --model "$work/gpt2-small" --results "$work/results-1.json" --seq-len 128
           fi ;;
    reads) timeout "$limit" python3 benchmarks/factored_reads.py --part reads --samples 64 --rounds 3 ;;
    qkovpair) timeout "$limit" python3 benchmarks/factored_reads.py --part qkov --samples 64 --rounds 2 ;;
    conflicts) timeout "$limit" bash -c 'python3 benchmarks/conflict_grams.py --samples 128 --rounds 2 && python3 benchmarks/conflict_tests.py --samples 256' ;;
    headgroups) timeout "$limit" python3 benchmarks/head_groups.py --samples 512 --layers 2 --rounds 2 ;;
    compare) timeout "$limit" bash -c 'python3 benchmarks/compare_memory.py --shape small && python3 benchmarks/compare_memory.py --shape small --slices 4' ;;
    *) echo "unknown part $name"; return ;;
  esac > "$OUT/$name.log" 2>&1
  echo "=== $name: rc=$? in $(( $(date +%s) - t0 ))s"; tail -n 30 "$OUT/$name.log"
}
nvidia-smi -L; python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(hostcopy phase1 phase6 curvature e2e)
for p in "${parts[@]}"; do run_part "${p%%:*}" "$([[ $p == *:* ]] && echo "${p##*:}" || echo "${LIMIT[${p%%:*}]}")"; done
