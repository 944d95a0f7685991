"""One steady diagonal step timed alone: every layer active on a full slot (the call a long run
repeats S - L + 1 times), for the torch fast executor and the export's diagonal_step graph on ONNX
Runtime, on the same shapes.

    torch: FastArmt's step over layers 0..L-1 with the entering slot embedded (its CUDA graph on CUDA)
    ort:   OrtRunner.infer on the steady feeds, the previous call's hidden_out / A_out / z_out /
           written_out passed back as its buffers (as the schedule loop does: two ping-pong parities,
           each its own CUDA graph), so no large host copy is made per call

Both are timed as wall time over `calls` consecutive steps, synchronized before and after (an ort
call returns after its work; torch steps are queued asynchronously and the wait is at the end), and
the per-step median of `repeats` such blocks is reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np
import torch

from armt.bench.timing import sync


def steady_feeds(cfg, batch: int = 1) -> dict[str, np.ndarray]:
    """Host feeds of one steady diagonal step: all layers active, every row writing, full slots, a
    non-zero memory state (fp32 floats; ort_step casts each to its graph input's dtype)."""
    L, T, M = cfg.base.n_layers, cfg.armt.segment_size, cfg.armt.num_mem_tokens
    d, K, V = cfg.base.d_model, cfg.armt.d_key, cfg.base.vocab_size
    rng = np.random.default_rng(0)
    P = T + M
    pos = np.arange(P, dtype=np.int64)  # tokens 0..T-1, then the memory tokens T..T+M-1
    return {
        "input_ids": rng.integers(0, V, (batch, T), dtype=np.int64),
        "hidden_in": (rng.standard_normal((L, batch, P, d)) * 0.5).astype(np.float32),
        "positions": np.broadcast_to(pos, (L, batch, P)).copy(),
        "key_valid": np.ones((L, batch, P), dtype=bool),
        "active": np.ones(L, dtype=bool),
        "write": np.ones((L, batch), dtype=bool),
        "A_in": (rng.random((L, batch, K, d)) * 1e-2).astype(np.float32),
        "z_in": (rng.random((L, batch, K)) + 1.0).astype(np.float32),
        "written_in": np.ones((L, batch), dtype=bool),
    }


def ort_step(runner, batch: int = 1) -> Callable[[], None]:
    """One steady step on an active diagonal_step OrtRunner; the carried outputs are fed back."""
    from graphs.dtypes import numpy_dtype
    feeds = {k: v.astype(numpy_dtype(runner.contract.input(k).dtype), copy=False)  # hidden_in: compute dtype
             for k, v in steady_feeds(runner.cfg, batch).items()}
    fresh = {k: v for k, v in feeds.items() if k not in runner.contract.recurrent.values()}
    carried = {k: v for k, v in feeds.items() if k in runner.contract.recurrent.values()}

    def step() -> None:
        out = runner.infer({**fresh, **carried})
        for o, i in runner.contract.recurrent.items():
            carried[i] = out[o]
    return step


def torch_step(fast, batch: int = 1) -> Callable[[], None]:
    """One steady step of the fast executor (its buffers of `batch` rows, state zeroed once)."""
    return fast.steady_step(batch)


def time_step(step: Callable[[], None], device: torch.device, warmup: int = 3, calls: int = 20,
              repeats: int = 3) -> dict:
    """{"step_ms": median per-step wall time, "times_ms": each block's per-step time}."""
    for _ in range(warmup):
        step()
    sync(device)
    blocks = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        sync(device)
        blocks.append((time.perf_counter() - t0) * 1e3 / calls)
    return {"step_ms": statistics.median(blocks), "times_ms": blocks, "calls": calls}
