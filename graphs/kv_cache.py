"""The KV cache of generation: fixed-capacity per-layer key/value buffers plus a per-row length.

    k, v     (L, B, H_kv, capacity, head_dim)   the current segment's keys/values of every layer
    lengths  (B,) int64                         valid places of each row (0 .. capacity)

A step with n new places per row (`counts` (B,) <= n of them real) writes its keys/values at places
lengths[b] .. lengths[b] + n - 1 of row b and advances the row by counts[b]. Places at or beyond a
row's length are never visible to a real query (query j of row b sees keys 0 .. lengths[b] + j), so
what a padded query wrote there is overwritten before it is read. Rows therefore advance
independently: rows of different prompt lengths, rows that stopped, rows whose segment was just
completed (`reset`) share one buffer.

Why fixed capacity and not a growing past: every step has the same shapes (one engine profile, one
buffer set, no re-allocation), and the cache never outgrows a segment in the `recurrent` policy
(capacity = the segment plus its memory places). `frozen` needs the last prompt segment plus every
new token: capacity = that bound, chosen once per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from graphs.errors import InputError


@dataclass
class KvCache:
    k: Any  # (L, B, H_kv, capacity, hd), numpy or torch, the compute dtype
    v: Any  # (L, B, H_kv, capacity, hd)
    lengths: np.ndarray  # (B,) int64

    @property
    def capacity(self) -> int:
        return int(self.k.shape[3])

    def check_room(self, n: int) -> None:
        """Refuse a step of `n` places that would not fit (an internal bound: callers size the cache)."""
        need = int(self.lengths.max(initial=0)) + n
        if need > self.capacity:
            raise InputError(f"the KV cache holds {self.capacity} places, this step needs {need}")

    def advance(self, counts: np.ndarray) -> None:
        self.lengths = self.lengths + np.asarray(counts, dtype=np.int64)

    def reset(self, rows: np.ndarray) -> None:
        """Rows (B,) bool start a new segment: nothing cached."""
        self.lengths = np.where(rows, 0, self.lengths).astype(np.int64)

