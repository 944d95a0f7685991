#!/usr/bin/env bash
# Generation on the H200, issue 11 (run from the repo root on the GPU machine; $OUT = result folder):
#   PYTHONPATH=$PWD bash results/run_h200_generate.sh          (dry run on a CPU: ... --dry-run)
# 0. Parity on CUDA (torch decoder): the official generate fixtures on --device cuda, fp32 (greedy tokens
#    identical, scores <= 1e-5 rel vs the official CPU scores) and bf16/fp16 (finite, scores vs torch at
#    that precision on the same device); then the CUDA-graph decode step against the eager one.
# 1.-2. The speed targets:
#   decode, batch 1: fastest backend >= 800 tokens/s, ORT CUDA >= 500, both >= 3x HF transformers' generate;
#   prefill of a 131,072-token prompt within 10% of `armt bench`'s diagonal time of the same ids.
# Two `armt bench --generate` runs, every backend side by side in each: LLaMA-1B shape, bf16, random weights
# (memory weights std 1e-3: finite and well conditioned at 128 segments), 256 new tokens, frozen memory
# policy, greedy. Decode targets: the 1,024-token prompt at batch 1 and 8 with HF's generate (run 1);
# prefill target: the 131,072-token prompt at batch 1 (run 2; HF's full-attention prefill there is not
# the comparison). Each JSON's "targets" says met / MISSED / not measured.
# The ort backend exports the model first (--export-to; a few minutes of CPU tracing) and needs
# onnxruntime-gpu in /tmp/site (/work/shared/gpu/stage-wheels.sh). No polygraphy, no install.
# Wall time < 9 minutes: each step has its own timeout (90 + 60 + 290 + 110 s); a bench cut short keeps its rows.
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
# 0. the official generate fixtures on CUDA (fp32 vs official; fp16/bf16 recurrent vs armt run)
timeout 90 $PY - <<'PY' 2>&1 | tee -a "$OUT/generate.log"
import json, sys
from pathlib import Path
import numpy as np
from tests.test_generate import official_model, NAMES, CASES
from runtimes.generate import generate
from runtimes.torch_runner import run_torch
worst, ok = 0.0, True
for name in NAMES:
    model = official_model(name)
    for case in CASES:
        ref = np.load(Path("tests/fixtures/official") / name / f"generate_{case}.npz")
        out = generate(model, ref["prompt_ids"], max_new_tokens=8, device="cuda")
        err = float(np.abs(out.scores - ref["scores"]).max() / np.abs(ref["scores"]).max())
        same = bool((out.tokens == ref["tokens"]).all())
        worst, ok = max(worst, err), ok and same and err <= 1e-5
        print(f"{name:20s} {case:9s} tokens {'same' if same else 'DIFFER'}  scores rel {err:.1e}")
    for precision in ("fp16", "bf16"):
        ids = np.load(Path("tests/fixtures/official") / name / "input_ids.npy")
        out = generate(model, ids, max_new_tokens=8, policy="recurrent", device="cuda", precision=precision)
        full = np.concatenate([ids, out.tokens], 1)
        ref = run_torch(model, full, schedule="sequential", device="cuda", precision=precision).logits[:, ids.shape[1] - 1:-1]
        print(f"{name:20s} {precision} recurrent vs run: rel {np.abs(out.scores - ref).max() / np.abs(ref).max():.1e}"
              f" finite {bool(np.isfinite(out.scores).all())}")
print(json.dumps({"fp32_worst_rel_vs_official": worst, "fp32_all_tokens_identical_and_within_1e-5": ok}))
sys.exit(0 if ok else 1)
PY
# the CUDA-graph decode step against the eager one, the decoder's FastArmt prefill (CUDA graphs) against
# the reference cells, on the GPU (tiny model)
timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_graph_decode.py tests/test_generate_prefill.py -k cuda 2>&1 | tail -3 | tee -a "$OUT/generate.log"
# 1. decode: 1,024-token prompt, batch 1 and 8, 256 new tokens, every backend and HF side by side (exports first for ort)
timeout 290 $PY -m armt bench --generate --synthetic llama-1b --device cuda --precision bf16 --mem-std 0.001 \
    --lengths 1024 --batch-sizes 1,8 --new-tokens 256 --backends torch,torch-graph,hf,ort \
    --warmup 1 --repeats 3 --export-to /tmp/armt-generate-bf16 \
    --output "$OUT/generate_h200_bf16_decode.json" 2>&1 | tee -a "$OUT/generate.log"
# 2. prefill: a 131,072-token prompt, batch 1, next to `armt bench`'s diagonal time of the same ids (torch rows)
timeout 110 $PY -m armt bench --generate --synthetic llama-1b --device cuda --precision bf16 --mem-std 0.001 \
    --lengths 131072 --batch-sizes 1 --new-tokens 256 --backends torch,torch-graph,ort \
    --warmup 1 --repeats 3 --export-dir /tmp/armt-generate-bf16 \
    --output "$OUT/generate_h200_bf16_prefill.json" 2>&1 | tee -a "$OUT/generate.log"
