#!/usr/bin/env bash
# Issue 11 on the H200: generation on ONNX Runtime CUDA with the device-resident decoder
# (runtimes/ort_generate.py: KV cache and memory in IO-bound OrtValues, only ids/positions/lengths in
# and the logits out per token). One command, < 9 minutes (timeouts 120 + 300 + 110 s; a bench cut
# short keeps its rows in its JSON):
#   PYTHONPATH=$PWD bash results/run_h200_generate_ort.sh            (GPU: needs onnxruntime-gpu in /tmp/site,
#                                                                      /work/shared/gpu/stage-wheels.sh; no install)
#   bash results/run_h200_generate_ort.sh --dry-run                  (a CPU: the same steps on the tiny model)
# $OUT (default results/h200; dry run /tmp/armt-generate-ort-dry) receives generate_ort.log and the two JSONs.
# 0. Parity on CUDA: the official LLaMA and RMT GPT-2 wrap_pos fixtures (fp32, exported without
#    validation, only the prefill's step graph and the decode graphs), the ORT CUDA decoder against
#    the torch decoder on CUDA, frozen and recurrent (several memory writes), plain and with CUDA
#    graphs: greedy tokens identical, scores <= 1e-5 rel.
# 1. `armt bench --generate`, LLaMA-1B shape, bf16 (memory weights std 1e-3), 1,024-token prompt,
#    batch 1 and 8, 256 new tokens, frozen policy, greedy: ort, torch-graph and HF generate side by side.
#    --export-to exports only what the timed job runs (diagonal_step + decode, and lm_head: no segment
#    graph, no memory write; the full export on the H200 traced 147 s of segment graph, 89 s of decode
#    graph, then the memory write).
#    Targets in the JSON: ORT >= 500 tokens/s at batch 1 and >= 3x HF.
# 2. The ort rows again with ONNX Runtime CUDA graphs (--cuda-graph: opt-in, docs/runtimes.md), on the
#    same export; each row's "cuda_graph" says whether they ran (a refused capture falls back, logged).
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
DRY=$([ "${1:-}" = "--dry-run" ] && echo 1 || true)
OUT=${OUT:-$([ -n "$DRY" ] && echo /tmp/armt-generate-ort-dry || echo results/h200)}; mkdir -p "$OUT"
PY=${PY:-python3}
LOG="$OUT/generate_ort.log"; : > "$LOG"
if [ -n "$DRY" ]; then
    DEVICE=cpu; CG=""; EXPORT=/tmp/armt-generate-ort-tiny
    MODEL=(--synthetic tiny --precision fp32 --segment-size 16 --memory-tokens 4 --d-mem 8 --lengths 40)
    RUNS=(--new-tokens 8 --warmup 0 --repeats 1)
    NAME=dry_run
else
    DEVICE=cuda; CG="--cuda-graph"; EXPORT=/tmp/armt-generate-ort-bf16
    MODEL=(--synthetic llama-1b --precision bf16 --mem-std 0.001 --lengths 1024)
    RUNS=(--new-tokens 256 --warmup 1 --repeats 3)
    NAME=h200_bf16
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv >> "$LOG" 2>&1
fi
$PY -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers(), 'torch', torch.__version__)" 2>&1 | tee -a "$LOG"
git log -1 --format='tree: %H %s' 2>/dev/null | tee -a "$LOG"
# 0. parity of the ORT decoder on the device (plain and CUDA graphs) against the torch decoder there
timeout 120 $PY - "$DEVICE" <<'PY' 2>&1 | grep -v torchvision | tee -a "$LOG"
import copy, json, sys, tempfile
from pathlib import Path
import numpy as np
from graphs.contracts import decode_roles_of, role_for
from tests.test_generate import FIXTURES, official_model
from runtimes.generate import generate
from runtimes.decoders import open_decoder
from runtimes.validation import export_model
device = sys.argv[1]
root = Path(tempfile.mkdtemp(prefix="armt-generate-ort-"))
worst, ok = 0.0, True
for name in ("llama", "rmt-gpt2-wrap-pos"):
    model = official_model(name)
    prefill = role_for(model.cfg, "diagonal" if model.cfg.kind == "armt" else "sequential")  # generate's default
    export_model(copy.deepcopy(model), root / name, precision="fp32", validate=False,
                 only=(prefill, *decode_roles_of(model.cfg)))
    T = model.cfg.armt.segment_size
    for graphs in ((False, True) if device == "cuda" else (False,)):
        dec = open_decoder(root / name, "ort", device=device, cuda_graph=graphs or None)
        for case in ("multi", "boundary", "single"):
            ids = np.load(FIXTURES / name / f"generate_{case}.npz")["prompt_ids"]
            for policy in ("frozen", "recurrent"):
                n_new = 8 if policy == "frozen" else 2 * T + 2
                got = generate(dec, ids, max_new_tokens=n_new, policy=policy)
                want = generate(model, ids, max_new_tokens=n_new, policy=policy, device=device)
                err = float(np.abs(got.scores - want.scores).max() / np.abs(want.scores).max())
                same = bool((got.tokens == want.tokens).all())
                worst, ok = max(worst, err), ok and same and err <= 1e-5
                print(f"{name:18s} cuda_graph {str(dec.cuda_graph):5s} {case:9s} {policy:9s} "
                      f"tokens {'same' if same else 'DIFFER'}  scores rel {err:.1e}")
        dec.close()
print(json.dumps({"device": device, "ort_fp32_worst_rel_vs_torch": worst, "all_tokens_identical_and_within_1e-5": ok}))
PY
# 1. decode speed: ort next to torch-graph and HF generate (exports the bench's model first, unless an
#    earlier run of this script left it in $EXPORT)
if [ -f "$EXPORT/manifest.json" ]; then SRC="--export-dir $EXPORT"; else SRC="--export-to $EXPORT"; fi
timeout 300 $PY -m armt bench --generate --device "$DEVICE" "${MODEL[@]}" --batch-sizes 1,8 "${RUNS[@]}" \
    --backends ort,torch-graph,hf $SRC \
    --output "$OUT/generate_${NAME}_ort.json" 2>&1 | tee -a "$LOG"
# 2. the ort rows with CUDA graphs (dry run: plainly, on the same export through --export-dir)
timeout 110 $PY -m armt bench --generate --device "$DEVICE" "${MODEL[@]}" --batch-sizes 1,8 "${RUNS[@]}" \
    --backends ort $CG --export-dir "$EXPORT" \
    --output "$OUT/generate_${NAME}_ort_cuda_graph.json" 2>&1 | tee -a "$LOG"
