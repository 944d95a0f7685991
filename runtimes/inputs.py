"""The CLI's inputs: token ids, attention masks and state files, checked before anything runs (numpy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from graphs.arrays import load_npy
from graphs.errors import InputError
from graphs.state import MemoryState, RmtState, load_state


def load_ids(path: str | Path) -> np.ndarray:
    """(B, N) int64 token ids from an integer .npy (range against the vocabulary is checked by the run)."""
    ids = load_npy(path, "input ids")
    if ids.dtype.kind not in "iu":
        raise InputError(f"input ids {path} must be an integer array, got {ids.dtype}")
    if ids.ndim != 2:
        raise InputError(f"input ids {path} must be 2-D (batch, tokens), got shape {ids.shape}")
    if ids.dtype.kind == "u" and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
        raise InputError(f"input ids {path} hold values beyond int64")
    return ids.astype(np.int64)


def load_mask(path: str | Path, ids: np.ndarray) -> np.ndarray:
    """(B, N) 0/1 mask from an integer or bool .npy; right-padding is checked by the run."""
    mask = load_npy(path, "attention mask")
    if mask.dtype.kind not in "iub":
        raise InputError(f"attention mask {path} must hold 0/1 integers or bools, got {mask.dtype}")
    if tuple(mask.shape) != tuple(ids.shape):
        raise InputError(f"attention mask {path} has shape {mask.shape}, the input ids have {tuple(ids.shape)}")
    return mask.astype(np.int64)


def load_state_for(path: str | Path, model_id: str) -> MemoryState | RmtState:
    """A state file written for this model (same model id); its shapes are checked by the run."""
    state = load_state(path, model_id)
    if isinstance(state, MemoryState) and (state.A.dtype != np.float32 or state.z.dtype != np.float32):
        raise InputError(f"state file {path}: A and z must be float32, got {state.A.dtype} and {state.z.dtype}")
    return state
