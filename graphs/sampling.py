"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling (numpy only).

Sampling runs on the host in float64 on the backend's fp32 logits, with one numpy Generator per
row seeded from (seed, row), so every backend draws the same tokens from the same logits, and a row
draws the same tokens whatever else is in its batch... as long as it sits at the same row index.
The order of the processors follows HF transformers: temperature, then top-k, then top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphs.errors import InputError, NonFiniteError


@dataclass(frozen=True)
class SamplingConfig:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int = 0

    def check(self) -> "SamplingConfig":
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise InputError(f"--temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"--top-k must be >= 0 (0: off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InputError(f"--top-p must lie in (0, 1], got {self.top_p}")
        if self.seed < 0:
            raise InputError(f"--seed must be >= 0, got {self.seed}")
        return self


class Sampler:
    """Picks one token per row from (B, V) logits."""

    def __init__(self, config: SamplingConfig, batch: int):
        self.config = config.check()
        self.rngs = [np.random.default_rng([config.seed, b]) for b in range(batch)]

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits (B, V) float32 -> tokens (B,) int64."""
        if not np.isfinite(logits).all():
            raise NonFiniteError("the logits hold NaN or Inf: no token can be chosen")
        if self.config.greedy:
            return logits.argmax(-1).astype(np.int64)
        return np.array([self._draw(row, self.rngs[b]) for b, row in enumerate(logits)], dtype=np.int64)

    def _draw(self, row: np.ndarray, rng: np.random.Generator) -> int:
        c = self.config
        x = row.astype(np.float64) / c.temperature  # (V,)
        order = np.argsort(-x, kind="stable")  # best first; ties by index
        keep = np.ones_like(x, dtype=bool)
        if c.top_k and c.top_k < x.size:
            keep[order[c.top_k:]] = False
        if c.top_p < 1.0:
            s = x[order]
            p = np.exp(s - s.max())
            p[~keep[order]] = 0.0
            p /= p.sum()
            before = np.cumsum(p) - p  # mass of the better tokens
            drop = before >= c.top_p  # keep the smallest prefix reaching top_p (the best always stays)
            keep[order[drop]] = False
        x = np.where(keep, x, -np.inf)
        p = np.exp(x - x.max())
        p /= p.sum()
        return int(min(np.searchsorted(np.cumsum(p), rng.random(), side="right"), x.size - 1))
