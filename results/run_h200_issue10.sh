#!/usr/bin/env bash
# Issue 10 on the H200: the export on ONNX Runtime CUDA next to the torch fast executor, one job.
#
#   bash results/run_h200_issue10.sh fp16      (then bf16; one precision per call, < 9 minutes each)
#   ARMT_ORT_SHARED_WEIGHTS=0 TAG=_ownweights bash results/run_h200_issue10.sh fp16   (each ORT session its
#   own copy of the weights, as before runtimes/shared_weights.py; TAG keeps both runs' files)
#
# LLaMA-1B synthetic shape (segment 1024 + 128 memory tokens, d_mem 64), memory weights at std 1e-3
# (well conditioned), batch 1, diagonal schedule, 32,768 and 131,072 tokens, logits of the last
# position only on both backends (--logits last), median of 3 after a warm-up, peak memory per backend,
# one steady diagonal step alone (--steady-step: the ort row runs the export's diagonal_step_causal graph,
# full slots; the "ort-masked" row the masked graph on the same feeds), parity at 8,192 tokens (ORT fp16/bf16 and torch
# fp16/bf16 vs the fp32 reference: hidden, last logits, A, z), the issue's targets in the JSON.
# The export is made here without validation (the parity rows measure it on the device) and reused by
# a later call on the same machine. Needs onnxruntime-gpu 1.31.1 in /tmp/site
# (/work/shared/gpu/stage-wheels.sh); runs as `PYTHONPATH=/tmp/site:$PWD python3` from the repo root,
# no polygraphy, no TensorRT. Writes results/h200/issue10_$PREC.{json,log} (and copies them to $OUT
# when set, as the device tool's runs have it).
#
# CPU dry run of the same commands (tiny model): MODEL=tiny DEVICE=cpu bash results/run_h200_issue10.sh fp32
set -uo pipefail
PREC=${1:?usage: run_h200_issue10.sh fp16|bf16}
MODEL=${MODEL:-llama-1b}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-520}  # seconds for the whole job (the device tool allows 600 per command)
if [ "$MODEL" = tiny ]; then
  SHAPE="--segment-size 16 --memory-tokens 4 --d-mem 8"; LENGTHS=${LENGTHS:-64,96}; PARITY=${PARITY:-48}
else
  SHAPE="--segment-size 1024 --memory-tokens 128 --d-mem 64"; LENGTHS=${LENGTHS:-32768,131072}; PARITY=${PARITY:-8192}
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
mkdir -p results/h200
TAG=${TAG:-}  # a suffix of the result files (e.g. TAG=_cuda_graph EXTRA=--cuda-graph)
EXTRA=${EXTRA:-}  # more bench options
LOG=results/h200/issue10_$PREC$TAG.log
JSON=results/h200/issue10_$PREC$TAG.json
E=/tmp/armt-issue10-$MODEL-$PREC
if [ -f "$E/manifest.json" ]; then SRC="--export-dir $E"; else SRC="--export-to $E"; fi
{
  echo "# issue 10, $PREC, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), ARMT_ORT_SHARED_WEIGHTS=${ARMT_ORT_SHARED_WEIGHTS:-unset}"
  $PY -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers(), 'torch', torch.__version__)"
  [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
  CMD="$PY -m armt bench --synthetic $MODEL $SHAPE --device $DEVICE --precision $PREC --mem-std 0.001 \
--backends torch,ort --schedules diagonal --lengths $LENGTHS --logits last --warmup 1 --repeats 3 \
$SRC --steady-step --parity-length $PARITY --output $JSON $EXTRA"
  echo "\$ $CMD"
  timeout "$BUDGET" $CMD
  echo "exit $? after ${SECONDS} s"
} 2>&1 | tee "$LOG"
if [ -n "${OUT:-}" ]; then cp -f "$LOG" "$OUT/"; [ -f "$JSON" ] && cp -f "$JSON" "$OUT/"; fi
