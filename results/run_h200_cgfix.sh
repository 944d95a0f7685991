#!/usr/bin/env bash
# Locate the ONNX Runtime CUDA-graph NaN of results/h200/issue10_fp16_unfused.json on the H200 (one job,
# < 9 minutes with the export, < 3 minutes when /tmp/armt-issue10-llama-1b-fp16 is already there).
#
#   bash results/run_h200_cgfix.sh
#
# Same model and run as the NaN (LLaMA-1B synthetic fp16, segment 1024 + 128 memory, d_mem 64,
# mem-std 1e-3, ORT diagonal, 32,768 tokens = 32 segments over 16 layers, last logits, warm-up 1 +
# 3 repeats), three ways:
#   pinned   --no-cuda-graph with ARMT_ORT_PIN_DIMS=1: the pinned-dims sessions CUDA graphs run on,
#            without capture. NaN here = the pinning (ORT's optimizations of static shapes), not capture.
#   graphs   --cuda-graph: the NaN run again (is it reproducible?)
#   checked  --cuda-graph with ARMT_CHECK_CUDA_GRAPHS=all: every replay is compared with a plain run of
#            the same call on the same session; the log names each graph id / output that differs
#            ("replay differs from a plain run") and inputs a replay wrote ("input written").
# The known-good plain run is results/h200/issue10_fp16_unfused_no_cuda_graph.json.
# Needs onnxruntime-gpu in /tmp/site (/work/shared/gpu/stage-wheels.sh). Writes
# results/h200/cgfix_{pinned,graphs,checked}.json and results/h200/cgfix.log (copied to $OUT when set).
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-540}
mkdir -p results/h200
LOG=results/h200/cgfix.log
E=/tmp/armt-issue10-llama-1b-fp16
BASE="-m armt bench --synthetic llama-1b --segment-size 1024 --memory-tokens 128 --d-mem 64 --device cuda \
--precision fp16 --mem-std 0.001 --backends ort --schedules diagonal --lengths ${LENGTHS:-32768} --logits last \
--warmup 1 --repeats 3"
{
  echo "# cgfix, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  $PY -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
  if [ -f "$E/manifest.json" ]; then SRC="--export-dir $E"; else SRC="--export-to $E"; fi
  for variant in pinned graphs checked; do
    case $variant in
      pinned) ENVS="ARMT_ORT_PIN_DIMS=1"; FLAG=--no-cuda-graph ;;
      graphs) ENVS=""; FLAG=--cuda-graph ;;
      checked) ENVS="ARMT_CHECK_CUDA_GRAPHS=all"; FLAG=--cuda-graph ;;
    esac
    left=$((BUDGET - SECONDS)); [ "$left" -lt 30 ] && { echo "budget spent before $variant"; break; }
    echo "\$ $ENVS $PY $BASE $SRC $FLAG --output results/h200/cgfix_$variant.json"
    env $ENVS timeout "$left" $PY $BASE $SRC $FLAG --output results/h200/cgfix_$variant.json
    echo "$variant: exit $? after ${SECONDS} s"
    SRC="--export-dir $E"
  done
} 2>&1 | tee "$LOG"
if [ -n "${OUT:-}" ]; then cp -f "$LOG" results/h200/cgfix_*.json "$OUT/" 2>/dev/null; fi
