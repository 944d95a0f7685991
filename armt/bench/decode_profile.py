"""Where a batch-1 decode token's time goes (a diagnostic for docs/generation.md, not part of `armt`).

    python -m armt.bench.decode_profile [--preset llama-1b] [--device cuda] [--precision bf16]
        [--prompt 1024] [--tokens 64] [--out DIR]

Three views of the same decoder (runtimes/graph_decode.GraphDecoder on a synthetic model, frozen
memory policy, greedy):
  1. wall time per token of `runtimes.generate.generate` (the loop a user runs), with scores and
     without (scores=False: the greedy token picked on the device);
  2. wall time per token of the decoder's `step` alone, and of the captured step's replay alone
     (device time of one token, synchronized), so host overhead = (1) - (2);
  3. torch.profiler's kernel table of one eager decode step (what the CUDA graph replays).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m armt.bench.decode_profile")
    p.add_argument("--preset", default="llama-1b")
    p.add_argument("--layers", type=int)
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out")
    a = p.parse_args(argv)
    from exporter.synthetic_model import synthetic_model
    from graphs.sampling import SamplingConfig
    from runtimes.generate import generate
    from runtimes.graph_decode import GraphDecoder

    over = {"num_hidden_layers": a.layers} if a.layers else {}
    model = synthetic_model(a.preset, **over)
    dev = torch.device(a.device)
    dec = GraphDecoder(model, device=a.device, precision=a.precision)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.cfg.base.vocab_size, (1, a.prompt)).astype(np.int64)
    report: dict = {"preset": a.preset, "precision": a.precision, "prompt": a.prompt, "tokens": a.tokens}

    def run(scores: bool = True):
        ticks = []
        with torch.no_grad():
            generate(dec, ids, None, max_new_tokens=a.tokens, policy="frozen", scores=scores,
                     sampling=SamplingConfig(greedy=True), on_token=lambda *_: ticks.append(time.perf_counter()))
        return np.diff(ticks)

    run()  # warm-up (captures the step's graph)
    per_tok = run()
    report["generate_ms_per_token"] = float(np.median(per_tok) * 1e3)
    print(f"generate loop: {report['generate_ms_per_token']:.3f} ms/token "
          f"({1e3 / report['generate_ms_per_token']:.0f} tokens/s)", flush=True)
    # scores=False: the greedy token picked in the step (step_greedy), only the ids come back
    report["generate_no_scores_ms_per_token"] = float(np.median(run(scores=False)) * 1e3)
    print(f"generate loop, scores=False: {report['generate_no_scores_ms_per_token']:.3f} ms/token "
          f"({1e3 / report['generate_no_scores_ms_per_token']:.0f} tokens/s)", flush=True)

    # the decoder's step alone (host copies, replay, logits back)
    one = np.zeros((1, 1), dtype=np.int64)
    cnt = np.ones(1, dtype=np.int64)
    with torch.no_grad():
        times = []
        for _ in range(a.tokens // 2):
            if dec.cache.capacity - int(dec.cache.lengths.max()) < 2:
                break
            _sync(dev)
            t0 = time.perf_counter()
            dec.step(one, cnt)
            _sync(dev)
            times.append(time.perf_counter() - t0)
        report["step_ms"] = float(np.median(times) * 1e3) if times else None
        print(f"decoder.step: {report['step_ms']} ms", flush=True)
        if getattr(dec, "_graph", None) is not None:
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(20):
                dec._graph.replay()
            _sync(dev)
            report["replay_ms"] = (time.perf_counter() - t0) / 20 * 1e3
            print(f"graph replay alone: {report['replay_ms']:.3f} ms", flush=True)
        # eager step under the profiler
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        dec._compute()
        _sync(dev)
        with profile(activities=acts) as prof:
            for _ in range(3):
                dec._compute()
            _sync(dev)
        key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=40)
        print(table, flush=True)
        events = [e for e in prof.key_averages()]
        dev_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) / 3
        report["eager_step_device_us"] = dev_us
        report["eager_step_kernels"] = sum(e.count for e in events if (getattr(e, "self_device_time_total", 0) or 0) > 0) / 3
        print(f"eager step: device time {dev_us:.0f} us, ~{report['eager_step_kernels']:.0f} kernels", flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "decode_profile.json").write_text(json.dumps(report, indent=1))
        Path(a.out, "decode_profile_table.txt").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
