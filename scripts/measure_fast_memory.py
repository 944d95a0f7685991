"""Parity cost of the tensor-core memory read (graphs.memory.memory_read_fast) on the tests' models
(docs/performance.md, "Tensor-core memory read").

    PYTHONPATH=$PWD python scripts/measure_fast_memory.py [--seeds 3] [--inputs 2]

For tiny LLaMA (GQA, head_dim 16) and GPT-2 models (tests/helpers.py tiny_model: a well-conditioned
memory that matters) x weight seeds x input seeds, in fp16 and bf16: the max relative error against
the fp32 reference (graphs.model in fp32, sequential) of the plain half-precision reference, of the
same model with the fast read, and of the fast read with its fp32 products on TF32 operands
(truncated, as tests/test_fast_memory.py emulates tensor cores). Prints the worst per tensor kind and
the worst fast / plain ratio (tests/test_fast_memory.py bounds it by FAST_FACTOR = 4).

Nothing here is a test: it measures, once, on the machine it runs on.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from tests.helpers import rel_err, tiny_model
from tests.test_fast_memory import KINDS, WIDE, chain_inputs, run_chain

VARIANTS = ("plain", "fast", "fast+tf32")


def measure(seeds: int, inputs: int) -> dict:
    worst: dict = {}
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).split(".")[1]
        w = worst[name] = {v: {k: 0.0 for k in KINDS} for v in VARIANTS}
        w["ratio"] = {v: 0.0 for v in VARIANTS[1:]}
        for arch in ("llama", "gpt2"):
            for seed in range(seeds):
                m32 = tiny_model(arch, seed=seed, **(WIDE if arch == "llama" else {}))
                mh = copy.deepcopy(m32).cast(dtype)
                for input_seed in range(inputs):
                    ids, mask = chain_inputs(m32, input_seed)
                    ref = run_chain(m32, ids, mask)
                    outs = {"plain": run_chain(mh, ids, mask), "fast": run_chain(mh, ids, mask, fast=True),
                            "fast+tf32": run_chain(mh, ids, mask, fast=True, tf32=True)}
                    errs = {v: {k: rel_err(o[k], ref[k]) for k in KINDS} for v, o in outs.items()}
                    for v in VARIANTS:
                        for k in KINDS:
                            w[v][k] = max(w[v][k], errs[v][k])
                    for v in VARIANTS[1:]:
                        w["ratio"][v] = max(w["ratio"][v], *(errs[v][k] / errs["plain"][k] for k in KINDS))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--inputs", type=int, default=2)
    args = ap.parse_args()
    worst = measure(args.seeds, args.inputs)
    for dtype, w in worst.items():
        for v in VARIANTS:
            print(f"{dtype:9s} {v:10s} " + "  ".join(f"{k} {w[v][k]:.2e}" for k in KINDS))
        print(f"{dtype:9s} worst ratio to plain: " + "  ".join(f"{v} {r:.2f}" for v, r in w["ratio"].items()))
    print(json.dumps(worst))


if __name__ == "__main__":
    main()
