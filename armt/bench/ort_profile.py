"""Where an ONNX Runtime diagonal step spends its time: per-op-type totals from ORT's own profiler.

    python -m armt.bench.ort_profile EXPORT_DIR [--device cuda] [--runs 3] [--out DIR]

Opens the export's diagonal_step graph in a profiling session (its own session: the runner's
sessions do not profile), feeds one steady-state step (every layer active, every row writing,
full-width slots, a non-zero memory state) and sums the node times by op type. A diagnostic for
docs/performance.md, not part of `armt`.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np


def steady_feeds(manifest, dtype) -> dict[str, np.ndarray]:
    cfg = manifest.model_config()
    L, T, M = cfg.base.n_layers, cfg.armt.segment_size, cfg.armt.num_mem_tokens
    d, K, V = cfg.base.d_model, cfg.armt.d_key, cfg.base.vocab_size
    rng = np.random.default_rng(0)
    P = T + M
    pos = np.concatenate([np.arange(T), np.arange(T, T + M)])
    return {
        "input_ids": rng.integers(0, V, (1, T), dtype=np.int64),
        "hidden_in": (rng.standard_normal((L, 1, P, d)) * 0.5).astype(dtype),
        "positions": np.broadcast_to(pos, (L, 1, P)).astype(np.int64).copy(),
        "key_valid": np.ones((L, 1, P), dtype=bool),
        "active": np.ones(L, dtype=bool),
        "write": np.ones((L, 1), dtype=bool),
        "A_in": (rng.random((L, 1, K, d)) * 1e-2).astype(np.float32),
        "z_in": (rng.random((L, 1, K)) + 1.0).astype(np.float32),
        "written_in": np.ones((L, 1), dtype=bool),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    import onnxruntime as ort

    Path(args.out).mkdir(parents=True, exist_ok=True)

    from exporter.manifest import load_manifest
    manifest = load_manifest(args.export_dir, verify_checksums=False)
    dtype = {"fp32": np.float32, "fp16": np.float16, "bf16": np.float32}[manifest.precision]
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(args.out) / "ort_step_profile")
    opts.log_severity_level = 3
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(manifest.graph_path("diagonal_step")), sess_options=opts, providers=providers)
    feeds = steady_feeds(manifest, dtype)
    for _ in range(args.runs + 1):  # the first run includes the kernels' set-up
        sess.run(None, feeds)
    raw = Path(sess.end_profiling())
    trace = json.loads(raw.read_text())
    raw.unlink()
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    nodes = [e for e in trace if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    # drop the warm-up run's nodes
    first_end = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    nodes = [e for e in nodes if e["ts"] >= first_end]
    by_op: dict[str, float] = collections.defaultdict(float)
    for e in nodes:
        by_op[e["args"].get("op_name", "?")] += e["dur"] / args.runs
    total = sum(by_op.values())
    step_us = [r["dur"] for r in runs[1:]]
    result = {"device": args.device, "precision": manifest.precision, "model_run_us": step_us,
              "node_total_us": total, "by_op_us": dict(sorted(by_op.items(), key=lambda kv: -kv[1]))}
    print(f"diagonal step: model_run {np.median(step_us) / 1e3:.2f} ms (incl. host copies of the feeds), "
          f"node time {total / 1e3:.2f} ms")
    for op, us in list(result["by_op_us"].items())[:15]:
        print(f"{us:10.0f} us  {100 * us / total:5.1f}%  {op}")
    (Path(args.out) / "ort_step_profile.json").write_text(json.dumps(result, indent=1))




def gpu_kernels(export_dir: str, runs: int = 3) -> list[tuple[str, float]]:
    """GPU time per kernel (us per step) of C's OrtRunner (CUDA, IO binding) on one steady step,
    seen through torch's CUPTI profiler (ORT's own profiler reports host-side launch times on CUDA)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from exporter.manifest import load_manifest
    from runtimes.base import make_runner
    manifest = load_manifest(export_dir, verify_checksums=False)
    dtype = {"fp32": np.float32, "fp16": np.float16, "bf16": np.float32}[manifest.precision]
    runner = make_runner("ort", export_dir, "diagonal_step", device="cuda").activate()
    feeds = steady_feeds(manifest, dtype)  # host arrays: the runner binds them (H2D copies show as memcpy rows)
    if manifest.precision == "bf16":
        import ml_dtypes
        feeds["hidden_in"] = feeds["hidden_in"].astype(ml_dtypes.bfloat16)
    for _ in range(2):
        runner.infer(feeds)
    runner.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            runner.infer(feeds)
        runner.synchronize()
    rows = sorted(((e.key, e.device_time_total / runs) for e in prof.key_averages()), key=lambda kv: -kv[1])
    return rows


def main_gpu() -> None:
    import sys
    rows = gpu_kernels(sys.argv[2])
    total = sum(us for _, us in rows)
    print(f"ORT diagonal step, GPU kernel time {total / 1e3:.2f} ms per step (CUPTI)")
    for name, us in rows[:45]:
        print(f"{us:9.0f} us  {100 * us / total:5.1f}%  {name[:100]}")


if __name__ == "__main__":
    import sys
    main_gpu() if sys.argv[1:2] == ["--cupti"] else main()
