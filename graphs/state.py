"""The recurrent memory state: a value that can be saved, loaded and passed back in.

    A        (L, B, K, d) fp32   associative matrices
    z        (L, B, K)    fp32   normalisers
    written  (L, B)       bool   whether any segment has written layer l of row b yet

A state file (.npz) also carries the model's id, so state from another model is refused.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from graphs.atomic import atomic_write_bytes
from graphs.errors import InputError


@dataclass
class MemoryState:
    A: torch.Tensor  # (L, B, K, d) fp32
    z: torch.Tensor  # (L, B, K) fp32
    written: torch.Tensor  # (L, B) bool

    @classmethod
    def zeros(cls, n_layers: int, batch: int, d_key: int, d_model: int,
              device: torch.device | str = "cpu") -> "MemoryState":
        return cls(
            A=torch.zeros(n_layers, batch, d_key, d_model, device=device),
            z=torch.zeros(n_layers, batch, d_key, device=device),
            written=torch.zeros(n_layers, batch, dtype=torch.bool, device=device),
        )

    @property
    def batch(self) -> int:
        return self.A.shape[1]

    def to(self, device: torch.device | str) -> "MemoryState":
        return MemoryState(self.A.to(device), self.z.to(device), self.written.to(device))

    def check_fits(self, n_layers: int, batch: int, d_key: int, d_model: int) -> None:
        want = {"A": (n_layers, batch, d_key, d_model), "z": (n_layers, batch, d_key),
                "written": (n_layers, batch)}
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise InputError(f"memory state {name} has shape {got}, this model and batch need {shape}")
        if self.A.dtype != torch.float32 or self.z.dtype != torch.float32:
            raise InputError("memory state A and z must be float32")
        if not (torch.isfinite(self.A).all() and torch.isfinite(self.z).all()):
            raise InputError("memory state holds NaN or Inf")


def save_state(path: str | Path, state: MemoryState, model_id: str) -> None:
    """Write a state file atomically (temp file, then rename)."""
    path = Path(path)
    buf = io.BytesIO()
    np.savez(buf, A=state.A.detach().cpu().numpy(), z=state.z.detach().cpu().numpy(),
             written=state.written.detach().cpu().numpy(), model_id=np.array(model_id))
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: str | Path, model_id: str) -> MemoryState:
    """Read a state file; refuse a malformed file or one written by another model."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"state file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("A", "z", "written", "model_id")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise InputError(f"state file {path} is not a valid ARMT state file ({exc.__class__.__name__})") from None
    if str(arrays["model_id"]) != model_id:
        raise InputError(f"state file {path} was written by another model ({arrays['model_id']} != {model_id})")
    return MemoryState(A=torch.from_numpy(arrays["A"]), z=torch.from_numpy(arrays["z"]),
                       written=torch.from_numpy(arrays["written"]).to(torch.bool))
