"""Resident memory (and device memory on CUDA) and load time of an export's ONNX Runtime sessions with
and without the shared weight pool (runtimes/shared_weights.py, docs/runtimes.md "Shared weights").

    PYTHONPATH=$PWD python scripts/measure_shared_weights_rss.py --work /tmp/sw --precision fp32 \
        [--roles segment,diagonal_step]
    PYTHONPATH=/tmp/site:$PWD python3 scripts/measure_shared_weights_rss.py --export EXPORT_DIR \
        --device cuda --roles diagonal_step,lm_head        (an existing export, e.g. the issue-10 bench's)

Makes (once, in --work; or takes --export) an export of a synthetic LLaMA ARMT of a few hundred MB
(hidden 768, 8 layers, vocabulary 32,000, random weights; not validated), then, each in a fresh
process, opens one runner per --roles entry (a role twice: two runners of it, as the pinned-dims
sessions of CUDA graphs are; each with its `<role>_causal` twin where the export has one: fp16/bf16;
`lm_head`: the head of the other runners' calls, last logits) with ARMT_ORT_SHARED_WEIGHTS=0 and =1,
runs each step runner on a full and a padded batch (both variants; the weights' pages are touched),
and reports the process's VmRSS, RssAnon and RssFile (/proc/self/status) after loading and after the
calls, its peak (VmHWM), the load time (onnx imported first in both) and the pool's size; with
`--device cuda[:i]` also the device memory in use (nvidia-smi's memory.used of that GPU, MiB) before
the first session, after loading and after the calls. Nothing here is a test: it measures, once, on
the machine it runs on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(vocab_size=32000, hidden_size=768, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4,
             head_dim=64, intermediate_size=2048, tie_word_embeddings=False)


def status_mib() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = round(int(rest.split()[0]) / 1024, 1)  # kB -> MiB
    return out


def device_used_mib(device: str) -> float | None:
    """memory.used of the GPU (nvidia-smi), None on the CPU or without nvidia-smi."""
    if not device.startswith("cuda"):
        return None
    index = device.partition(":")[2] or "0"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", index],
                             check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return float(out.strip().splitlines()[0])


def make(export_dir: Path, precision: str) -> None:
    import torch
    from graphs.model import ArmtModel
    from graphs.synthetic import synthetic_config
    from runtimes.validation import export_model
    cfg = synthetic_config("tiny", segment_size=128, num_mem_tokens=16, d_mem=32, **SHAPE)
    with torch.no_grad():
        model = ArmtModel(cfg, init_std=0.02, mem_init_std=1e-3, seed=0).eval()
        export_model(model, export_dir, precision=precision, validate=False, decode=False)


def measure(export_dir: Path, roles: list[str], device: str) -> dict:
    import numpy as np
    from runtimes.execute import run_schedule
    import onnx  # noqa: F401  (the pool reads the graphs with it: imported once per process, ~0.5 s, not timed)
    from runtimes.ort_runner import OrtRunner
    before, gpu = status_mib(), {"before": device_used_mib(device)}
    t0 = time.perf_counter()
    runners = [OrtRunner(export_dir, role, device=device).activate() for role in roles]
    load_s = time.perf_counter() - t0
    loaded, gpu["loaded"] = status_mib(), device_used_mib(device)
    cfg = runners[0].manifest.model_config()
    ids = np.random.default_rng(0).integers(0, cfg.base.vocab_size, (1, 2 * cfg.armt.segment_size)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, -3:] = 0  # one padded call: the masked graphs run too
    head = next((r for r in runners if r.role == "lm_head"), None)  # an lm_head entry: the steps' logits
    for runner in runners:
        if runner.role == "lm_head":
            continue
        for m in (None, mask):
            run_schedule(runner, ids, m, collect=("last_logits",) if head else (), head=head)
    ran, gpu["after_calls"] = status_mib(), device_used_mib(device)
    # the dynamic sessions and (CUDA graphs) the pinned-dims ones: (role:variant[:dims], session)
    held = [(f"{r.role}:{v}", s) for r in runners for v, (s, _) in r._plain.items()]
    held += [(f"{r.role}:{k[0]}:{dict(k[1])}", s) for r in runners for k, (s, _) in r._shape_sessions.items()]
    pools = {id(p): p for p in (getattr(s, "_armt_weight_pool", None) for _, s in held) if p is not None}
    pool = next(iter(pools.values()), None)
    return {"sessions": len(held), "graphs": sorted(name for name, _ in held), "pools": len(pools),
            "load_s": round(load_s, 2), "before": before, "loaded": loaded, "after_calls": ran,
            "pool_mib": round(pool.nbytes / 2 ** 20, 1) if pool is not None else None,
            **({"device_used_mib": gpu} if device != "cpu" else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="where the synthetic export is made (once)")
    ap.add_argument("--export", type=Path, help="measure this export instead")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    ap.add_argument("--roles", default="segment,diagonal_step", help="one runner per entry (comma-separated)")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.roles.split(","), args.device)))
        return
    if args.export is None and args.work is None:
        ap.error("give --work (a synthetic export is made there) or --export")
    export_dir = args.export or args.work / f"export-{args.precision}"
    if args.export is None and not (export_dir / "manifest.json").is_file():
        make(export_dir, args.precision)
    weights = (export_dir / "weights.data").stat().st_size / 2 ** 20
    rows = {}
    for shared in ("0", "1"):
        env = dict(os.environ, ARMT_ORT_SHARED_WEIGHTS=shared)
        got = subprocess.run([sys.executable, __file__, "--roles", args.roles, "--device", args.device,
                              "--measure", str(export_dir)],
                             env=env, capture_output=True, text=True)
        if got.returncode:
            sys.exit(f"measuring with ARMT_ORT_SHARED_WEIGHTS={shared} failed:\n{got.stderr[-2000:]}")
        rows["shared" if shared == "1" else "own copies"] = json.loads(got.stdout.strip().splitlines()[-1])
    print(json.dumps({"export": str(export_dir), "device": args.device, "roles": args.roles,
                      "weights_mib": round(weights, 1), **rows}, indent=1))


if __name__ == "__main__":
    main()
