"""Realistic graph inputs for an export: the sample batch, and the sample-feeds file.

Export samples come from a real multi-segment run (runtimes/validation.py runs it through the one
schedule loop): the batch has a full row and a short row, so it exercises everything the memory
path has:

    row 0: | seg 0 full   | seg 1 full   | seg 2 short |   three segments, memory written each time
    row 1: | seg 0 padded |   (ended)    |   (ended)   |   padded slot, then write = False

The causal graph variants (`segment_causal`, ...) run on full slots only: their samples come from
`full_batch` (two rows of SEGMENTS full segments).

`sample_feeds.npz` stores one call per graph from inside such a run (non-zero state in every layer,
padding, mixed write/active flags) under "<role>/<input>", and the torch reference's outputs of that
call under "reference/<role>/<output>" (so `armt verify --per-graph` can check a backend on a host
without torch). bfloat16 arrays are stored as float32 (exact); readers cast back.

The graphs do not depend on the segment size (positions and masks are inputs), so samples use a
smaller width (default min(T, 32)) to keep CPU runs affordable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from graphs.config import ModelConfig
from graphs.dtypes import dtype_name, numpy_dtype

DEFAULT_MAX_WIDTH = 32
SEGMENTS = 3
REFERENCE = "reference/"


def sample_batch(cfg: ModelConfig, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """ids (2, N) int64 and a right-padded 0/1 mask: row 0 spans SEGMENTS segments (last one short),
    row 1 fills part of segment 0 only."""
    n = (SEGMENTS - 1) * width + max(1, width // 2)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.base.vocab_size, size=(2, n), dtype=np.int64)
    lengths = np.array([n, max(1, (2 * width) // 3)])
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.int64)
    return ids, mask


def full_batch(cfg: ModelConfig, width: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """ids (2, SEGMENTS * width) int64 and an all-ones mask: every slot of every call is full (no
    padding, no short last segment), the feeds a causal graph variant is validated on."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.base.vocab_size, size=(2, SEGMENTS * width), dtype=np.int64)
    return ids, np.ones_like(ids)


def sample_width(cfg: ModelConfig, max_width: int = DEFAULT_MAX_WIDTH) -> int:
    return max(2, min(cfg.armt.segment_size, max_width))


def _storable(a: np.ndarray) -> np.ndarray:
    """bf16 has no portable numpy dtype: stored as float32 (exact)."""
    a = np.asarray(a)
    return a.astype(np.float32) if dtype_name(a.dtype) == "bfloat16" else a


def save_samples(path: Path, feeds: dict[str, dict[str, np.ndarray]],
                 reference: dict[str, dict[str, np.ndarray]]) -> None:
    """`feeds`/`reference`: role -> name -> array (one call per graph)."""
    arrays = {f"{role}/{name}": _storable(v) for role, f in feeds.items() for name, v in f.items()}
    arrays.update({f"{REFERENCE}{role}/{name}": _storable(v) for role, f in reference.items() for name, v in f.items()})
    with open(path, "wb") as f:  # written inside the export's staging directory (atomic as a whole)
        np.savez(f, **arrays)


def load_samples(path: Path, role: str, dtypes: dict[str, str] | None = None, reference: bool = False
                 ) -> dict[str, np.ndarray]:
    """One graph's sample feeds (or, with `reference`, the torch reference's outputs for them).
    `dtypes` (name -> dtype name): cast bf16 arrays back from their stored float32."""
    prefix = f"{REFERENCE}{role}/" if reference else f"{role}/"
    with np.load(path, allow_pickle=False) as data:
        out = {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}
    for name, dtype in (dtypes or {}).items():
        if name in out and dtype == "bfloat16":
            out[name] = out[name].astype(numpy_dtype("bfloat16"))
    return out
