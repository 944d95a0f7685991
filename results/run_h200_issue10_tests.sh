#!/usr/bin/env bash
# Issue 10's GPU tests on the H200 (real CUDA-graph capture in ONNX Runtime, with cgfix's many-segment
# graphs-vs-pinned-vs-dynamic test, test_ort_cuda_graphs_many_segments_last_logits; TensorRT tests skip there:
# no TensorRT engine runs on Hopper). From the repo root; onnxruntime-gpu in /tmp/site; writes
# results/h200/issue10_gpu_tests.log (and copies it to $OUT when set).
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p results/h200
LOG=results/h200/issue10_gpu_tests.log
{
  echo "# issue 10 GPU tests, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  timeout 500 ${PYTHON:-python3} -m pytest -q -p no:cacheprovider -rs -m gpu tests/test_cuda_graphs.py \
    tests/test_runtime_ort.py -k "cuda or graphs" -o log_cli=true --log-cli-level=INFO
  echo "exit $?"
} 2>&1 | tee "$LOG"
if [ -n "${OUT:-}" ]; then cp -f "$LOG" "$OUT/"; fi
