#!/usr/bin/env bash
# Generation on ONNX Runtime CUDA (issue 11, the decode graphs): the official LLaMA and RMT GPT-2
# wrap_pos fixtures exported with --decode (fp32), then `generate` on the CUDA execution provider
# against the torch decoder on CUDA, frozen and recurrent: greedy tokens identical, scores <= 1e-5
# rel. Not a speed measurement (the ORT decoder keeps its KV cache on the host: every step copies
# it to and from the GPU). Run from the repository root (needs onnxruntime-gpu, no pip install):
#   PYTHONPATH=$PWD bash results/run_h200_generate_ort.sh
set -euo pipefail
OUT=${OUT:-/tmp/armt-generate-ort}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu: the same check on the CPU provider
python3 - "$OUT" "$DEVICE" <<'PY'
import copy, json, sys
from pathlib import Path
import numpy as np
from tests.test_generate import FIXTURES, official_model
from runtimes.generate import generate
from runtimes.ort_generate import open_decoder
from runtimes.validation import export_model
out_root, device = Path(sys.argv[1]), sys.argv[2]
worst, ok = 0.0, True
for name in ("llama", "rmt-gpt2-wrap-pos"):
    model = official_model(name)
    export_model(copy.deepcopy(model), out_root / name, precision="fp32", overwrite=True, decode=True)
    dec = open_decoder(out_root / name, "ort", device=device)
    T = model.cfg.armt.segment_size
    for case in ("multi", "boundary", "single"):
        ids = np.load(FIXTURES / name / f"generate_{case}.npz")["prompt_ids"]
        for policy in ("frozen", "recurrent"):
            n_new = 8 if policy == "frozen" else 2 * T + 2
            got = generate(dec, ids, max_new_tokens=n_new, policy=policy)
            want = generate(model, ids, max_new_tokens=n_new, policy=policy, device=device)
            err = float(np.abs(got.scores - want.scores).max() / np.abs(want.scores).max())
            same = bool((got.tokens == want.tokens).all())
            worst, ok = max(worst, err), ok and same and err <= 1e-5
            print(f"{name:18s} {case:9s} {policy:9s} tokens {'same' if same else 'DIFFER'}  scores rel {err:.1e}")
print(json.dumps({"device": device, "ort_fp32_worst_rel_vs_torch": worst, "all_tokens_identical_and_within_1e-5": ok}))
sys.exit(0 if ok else 1)
PY
