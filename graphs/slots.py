"""The slot of one segment (what the layers see) and the small helpers both slot layouts share.

graphs/segments.py lays out an ARMT's slots ([tokens | padding | memory]) and dispatches by kind;
graphs/rmt_segments.py lays out an RMT's ([memory | tokens | padding | memory]). Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Slot:
    """One segment of a batch, laid out for the layers."""

    index: int  # segment number s within this call
    ids: np.ndarray  # (B, width) int64, padding places hold token 0
    positions: np.ndarray  # (B, width + M) int64 (an RMT's slot: (B, width + 2M), graphs/rmt_segments.py)
    key_valid: np.ndarray  # (B, width + M) bool
    counts: np.ndarray  # (B,) int64: real tokens of each row in this segment
    start: int  # offset of the segment's first token in the call's input

    @property
    def write(self) -> np.ndarray:
        """(B,) bool: rows that hold tokens here and so write their memory."""
        return self.counts > 0


def host_array(x) -> np.ndarray:
    """A host numpy array of a numpy array or a torch tensor (no torch import needed)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def segment_count(lengths: np.ndarray, segment_size: int) -> int:
    """Number of segments needed for the longest row."""
    longest = int(lengths.max()) if lengths.size else 0
    return -(-longest // segment_size)
