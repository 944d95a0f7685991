# Issue 11's generation targets on the H200 (run from the repo root on the GPU machine; $OUT = result folder):
#   decode, batch 1: fastest backend >= 800 tokens/s, ORT CUDA >= 500, both >= 3x HF transformers' generate;
#   prefill of a 131,072-token prompt within 10% of `armt bench`'s diagonal time of the same ids.
# Two `armt bench --generate` runs, every backend side by side in each: LLaMA-1B shape, bf16, random weights
# (memory weights std 1e-3: finite and well conditioned at 128 segments), 256 new tokens, frozen memory
# policy, greedy. Decode targets: the 1,024-token prompt at batch 1 and 8 with HF's generate (run 1);
# prefill target: the 131,072-token prompt at batch 1 (run 2; HF's full-attention prefill there is not
# the comparison). Each JSON's "targets" says met / MISSED / not measured.
# The ort backend exports the model first (--export-to; a few minutes of CPU tracing) and needs
# onnxruntime-gpu in /tmp/site (/work/shared/gpu/stage-wheels.sh). No polygraphy, no install.
# Expected wall time: < 9 minutes (each step has its own timeout: 60 + 330 + 130 s).
# torch-graph: the one-token decode step as a CUDA graph (runtimes/graph_decode.py), the path to 800 tokens/s.
# Dry run on a CPU (same command, tiny model): bash results/run_h200_generate.sh --dry-run
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=${PY:-python3}
if [ "$1" = "--dry-run" ]; then
    exec $PY -m armt bench --generate --synthetic tiny --device cpu --precision fp32 --segment-size 16 \
        --memory-tokens 4 --d-mem 8 --lengths 40,200 --batch-sizes 1,8 --new-tokens 8 --backends torch,torch-graph,hf,ort \
        --max-hf 4096 --warmup 0 --repeats 1 --export-to "$OUT/armt-generate-tiny" --output "$OUT/generate_dry_run.json"
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > "$OUT/generate.log" 2>&1
$PY -c "import torch, transformers, onnxruntime as o; print(torch.__version__, transformers.__version__, o.__version__, o.get_available_providers())" 2>&1 | tee -a "$OUT/generate.log"
# the CUDA-graph decode step against the eager one on the GPU (tiny model)
timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_graph_decode.py -k cuda_graph 2>&1 | tail -3 | tee -a "$OUT/generate.log"
# 1. decode: 1,024-token prompt, batch 1 and 8, 256 new tokens, every backend and HF side by side (exports first for ort)
timeout 330 $PY -m armt bench --generate --synthetic llama-1b --device cuda --precision bf16 --mem-std 0.001 \
    --lengths 1024 --batch-sizes 1,8 --new-tokens 256 --backends torch,torch-graph,hf,ort \
    --warmup 1 --repeats 3 --export-to /tmp/armt-generate-bf16 \
    --output "$OUT/generate_h200_bf16_decode.json" 2>&1 | tee -a "$OUT/generate.log"
# 2. prefill: a 131,072-token prompt, batch 1, next to `armt bench`'s diagonal time of the same ids (torch rows)
timeout 130 $PY -m armt bench --generate --synthetic llama-1b --device cuda --precision bf16 --mem-std 0.001 \
    --lengths 131072 --batch-sizes 1 --new-tokens 256 --backends torch,torch-graph,ort \
    --warmup 1 --repeats 3 --export-dir /tmp/armt-generate-bf16 \
    --output "$OUT/generate_h200_bf16_prefill.json" 2>&1 | tee -a "$OUT/generate.log"
