"""Where the host time of an ONNX Runtime run goes: one `run_schedule` under cProfile.

    python -m armt.bench.ort_run_profile EXPORT_DIR [--tokens 131072] [--device cuda] [--top 30]

Opens the export's diagonal_step runner (CUDA graphs as the runner's default) and its lm_head,
runs the bench's job (batch 1, random ids, last logits) twice to warm up, then once under cProfile,
and prints the wall time, the number of steps and the functions with the most cumulative time.
The GPU time of one step is in `armt bench --steady-step`; the difference per step is host time
spent outside the kernels. A diagnostic for docs/performance.md, not part of `armt`.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir")
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    from exporter.manifest import load_manifest
    from runtimes.base import make_runner
    from runtimes.execute import run_schedule

    manifest = load_manifest(args.export_dir, verify_checksums=False)
    V = manifest.model_config().base.vocab_size
    ids = np.random.default_rng(0).integers(0, V, (1, args.tokens), dtype=np.int64)
    runner = make_runner("ort", args.export_dir, "diagonal_step", device=args.device).activate()
    head = runner.companion("lm_head").activate()
    for _ in range(2):
        run_schedule(runner, ids, collect=("last_logits",), head=head)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    r = run_schedule(runner, ids, collect=("last_logits",), head=head)
    prof.disable()
    wall = time.perf_counter() - t0
    steps = len(r.schedule.steps)
    print(f"run_schedule: {wall * 1e3:.1f} ms for {steps} steps ({wall * 1e3 / steps:.3f} ms per step); "
          f"cuda graphs: {runner.cuda_graph} ({runner.cuda_graph_reason or 'on'}); variants {runner.variant_calls}")
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.top)
    print(out.getvalue())
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
