#!/usr/bin/env bash
# Issue 11 on the H200 in one command (< 9 minutes): the CUDA tests of the torch decoders, then
# `armt bench --generate` with ort (device-resident decoder), torch-graph and HF generate side by side:
#   1. 1,024-token prompt, batch 1 and 8, 256 new tokens (decode tokens/s; the bench exports its
#      model first: diagonal_step + lm_head + decode graphs, bf16);
#   2. 131,072-token prompt, batch 1 (prefill vs `armt bench`'s diagonal time; HF skipped).
#
#   bash results/run_h200_generate_all.sh        (GPU; onnxruntime-gpu in /tmp/site; writes results/h200/,
#                                                 copies to $OUT when set)
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
mkdir -p results/h200
LOG=results/h200/generate_all.log
E=/tmp/armt-generate-all-bf16
COMMON="--generate --synthetic llama-1b --device cuda --precision bf16 --mem-std 0.001 --new-tokens 256 --warmup 1 --repeats 2"
{
  echo "# generate, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_graph_decode.py tests/test_generate_prefill.py -k cuda 2>&1 | tail -5
  echo "tests: exit $? after ${SECONDS} s"
  if [ -f "$E/manifest.json" ]; then SRC="--export-dir $E"; else SRC="--export-to $E"; fi
  CMD="$PY -m armt bench $COMMON --lengths 1024 --batch-sizes 1,8 --backends ort,torch-graph,hf $SRC --output results/h200/generate_bf16_1024.json"
  echo "\$ $CMD"; timeout 240 $CMD; echo "bench 1024: exit $? after ${SECONDS} s"
  CMD="$PY -m armt bench $COMMON --lengths 131072 --batch-sizes 1 --backends ort,torch-graph --export-dir $E --output results/h200/generate_bf16_131072.json"
  echo "\$ $CMD"; timeout $((${BUDGET:-560} - SECONDS)) $CMD; echo "bench 131072: exit $? after ${SECONDS} s"
} 2>&1 | tee "$LOG"
if [ -n "${OUT:-}" ]; then cp -f "$LOG" results/h200/generate_bf16_*.json "$OUT/" 2>/dev/null; fi
