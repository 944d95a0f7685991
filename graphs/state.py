"""The recurrent memory state: a value that can be saved, loaded and passed back in.

    A        (L, B, K, d) fp32   associative matrices
    z        (L, B, K)    fp32   normalisers
    written  (L, B)       bool   whether any segment has written layer l of row b yet

The arrays are numpy on hosts and in state files; the torch model and runners hold torch tensors in
the same container (graphs.model converts). A state file (.npz) also carries the model's id, so
state from another model is refused.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphs.atomic import atomic_write_bytes
from graphs.dtypes import dtype_name
from graphs.errors import InputError


def to_numpy(x: Any) -> np.ndarray:
    """A host numpy array of a numpy array or a torch tensor (bf16 tensors as float32)."""
    if hasattr(x, "detach"):
        x = x.detach()
        if dtype_name(x.dtype) == "bfloat16":
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def _all_finite(x: Any) -> bool:
    if hasattr(x, "isfinite") and not isinstance(x, np.ndarray):  # a torch tensor: check where it lives
        return bool(x.isfinite().all())
    return bool(np.isfinite(x).all())


@dataclass
class MemoryState:
    A: Any  # (L, B, K, d) fp32, numpy or torch
    z: Any  # (L, B, K) fp32
    written: Any  # (L, B) bool

    @classmethod
    def zeros(cls, n_layers: int, batch: int, d_key: int, d_model: int) -> "MemoryState":
        """An empty memory (numpy)."""
        return cls(A=np.zeros((n_layers, batch, d_key, d_model), dtype=np.float32),
                   z=np.zeros((n_layers, batch, d_key), dtype=np.float32),
                   written=np.zeros((n_layers, batch), dtype=bool))

    @property
    def batch(self) -> int:
        return self.A.shape[1]

    def numpy(self) -> "MemoryState":
        """A host copy with numpy arrays."""
        return MemoryState(to_numpy(self.A).copy(), to_numpy(self.z).copy(), to_numpy(self.written).copy())

    def check_fits(self, n_layers: int, batch: int, d_key: int, d_model: int) -> None:
        want = {"A": (n_layers, batch, d_key, d_model), "z": (n_layers, batch, d_key),
                "written": (n_layers, batch)}
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise InputError(f"memory state {name} has shape {got}, this model and batch need {shape}")
        if dtype_name(self.A.dtype) != "float32" or dtype_name(self.z.dtype) != "float32":
            raise InputError("memory state A and z must be float32")
        if dtype_name(self.written.dtype) != "bool":
            raise InputError(f"memory state 'written' must be bool, got {dtype_name(self.written.dtype)}")
        if not (_all_finite(self.A) and _all_finite(self.z)):
            raise InputError("memory state holds NaN or Inf")


def save_state(path: str | Path, state: MemoryState, model_id: str) -> None:
    """Write a state file atomically (temp file, then rename)."""
    path = Path(path)
    buf = io.BytesIO()
    np.savez(buf, A=to_numpy(state.A), z=to_numpy(state.z), written=to_numpy(state.written),
             model_id=np.array(model_id))
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: str | Path, model_id: str) -> MemoryState:
    """Read a state file (numpy arrays); refuse a malformed file or one written by another model."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"state file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("A", "z", "written", "model_id")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"state file {path} is not a valid ARMT state file ({exc.__class__.__name__})") from None
    if str(arrays["model_id"]) != model_id:
        raise InputError(f"state file {path} was written by another model ({arrays['model_id']} != {model_id})")
    return MemoryState(A=arrays["A"], z=arrays["z"], written=arrays["written"].astype(bool))
