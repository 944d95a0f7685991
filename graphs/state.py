"""The recurrent memory state: a value that can be saved, loaded and passed back in.

ARMT (MemoryState):
    A        (L, B, K, d) fp32   associative matrices
    z        (L, B, K)    fp32   normalisers
    written  (L, B)       bool   whether any segment has written layer l of row b yet

RMT (RmtState):
    memory   (B, M, d)    the compute dtype of the graphs (float32 in state files: exact)
    written  (B,)         bool   whether any segment has written row b's memory yet (if not, the next
                                 segment reads the model's learned initial memory, not `memory`)

The arrays are numpy on hosts and in state files; the torch model and runners hold torch tensors in
the same container (graphs.model converts). A state file (.npz) also carries the model's id, so
state from another model is refused; an RMT file also says "kind": "rmt". `INPUTS` / `OUTPUTS` of
each class name the graph inputs a state feeds and the outputs it is read back from
(graphs/contracts.py); `empty_state` and `check_state` pick the class by the model's kind.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

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
    kind: ClassVar[str] = "armt"
    INPUTS: ClassVar[dict[str, str]] = {"A": "A_in", "z": "z_in", "written": "written_in"}
    OUTPUTS: ClassVar[dict[str, str]] = {"A": "A_out", "z": "z_out", "written": "written_out"}
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


@dataclass
class RmtState:
    """An RMT's memory: M vectors per row, carried from segment to segment."""

    kind: ClassVar[str] = "rmt"
    INPUTS: ClassVar[dict[str, str]] = {"memory": "memory_in", "written": "written_in"}
    OUTPUTS: ClassVar[dict[str, str]] = {"memory": "memory_out", "written": "written_out"}
    memory: Any  # (B, M, d) compute dtype (fp32, fp16 or bf16), numpy or torch
    written: Any  # (B,) bool

    @classmethod
    def zeros(cls, batch: int, num_mem_tokens: int, d_model: int, dtype: Any = np.float32) -> "RmtState":
        """A fresh memory (numpy): nothing written, so the first segment reads the learned memory."""
        return cls(memory=np.zeros((batch, num_mem_tokens, d_model), dtype=dtype),
                   written=np.zeros((batch,), dtype=bool))

    @property
    def batch(self) -> int:
        return self.memory.shape[0]

    def numpy(self) -> "RmtState":
        """A host copy with numpy arrays (bf16 tensors as float32)."""
        return RmtState(to_numpy(self.memory).copy(), to_numpy(self.written).copy())

    def check_fits(self, batch: int, num_mem_tokens: int, d_model: int) -> None:
        want = {"memory": (batch, num_mem_tokens, d_model), "written": (batch,)}
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise InputError(f"RMT memory state {name} has shape {got}, this model and batch need {shape}")
        if dtype_name(self.memory.dtype) not in ("float32", "float16", "bfloat16"):
            raise InputError(f"RMT memory state 'memory' must be floating point, got {dtype_name(self.memory.dtype)}")
        if dtype_name(self.written.dtype) != "bool":
            raise InputError(f"RMT memory state 'written' must be bool, got {dtype_name(self.written.dtype)}")
        if not _all_finite(self.memory):
            raise InputError("RMT memory state holds NaN or Inf")


STATE_CLASSES = {"armt": MemoryState, "rmt": RmtState}


def empty_state(cfg, batch: int) -> MemoryState | RmtState:
    """The fresh state of a model config (graphs.config.ModelConfig) for `batch` rows (numpy)."""
    b, a = cfg.base, cfg.armt
    if cfg.kind == "rmt":
        return RmtState.zeros(batch, a.num_mem_tokens, b.d_model)
    return MemoryState.zeros(b.n_layers, batch, a.d_key, b.d_model)


def check_state(cfg, state: MemoryState | RmtState, batch: int) -> None:
    """Refuse a state of the other kind, or one whose shapes or dtypes do not fit the model and batch."""
    want = STATE_CLASSES[cfg.kind]
    if not isinstance(state, want):
        raise InputError(f"the memory state is an {getattr(state, 'kind', type(state).__name__).upper()} state; "
                         f"this model is an {cfg.kind.upper()}")
    b, a = cfg.base, cfg.armt
    if cfg.kind == "rmt":
        state.check_fits(batch, a.num_mem_tokens, b.d_model)
    else:
        state.check_fits(b.n_layers, batch, a.d_key, b.d_model)


def save_state(path: str | Path, state: MemoryState | RmtState, model_id: str) -> None:
    """Write a state file atomically (temp file, then rename). Floats are stored as they are, bf16 as
    float32 (exact); an RMT state also records its kind."""
    path = Path(path)
    buf = io.BytesIO()
    arrays = {name: to_numpy(getattr(state, name)) for name in type(state).INPUTS}
    arrays = {k: v.astype(np.float32) if dtype_name(v.dtype) == "bfloat16" else v for k, v in arrays.items()}
    if state.kind != "armt":  # ARMT files keep the format they had before the kind existed
        arrays["kind"] = np.array(state.kind)
    np.savez(buf, **arrays, model_id=np.array(model_id))
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: str | Path, model_id: str) -> MemoryState | RmtState:
    """Read a state file (numpy arrays); refuse a malformed file or one written by another model."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"state file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            kind = str(data["kind"]) if "kind" in data.files else "armt"
            if kind not in STATE_CLASSES:
                raise InputError(f"state file {path} holds a state of unknown kind {kind!r}")
            cls = STATE_CLASSES[kind]
            arrays = {k: data[k] for k in (*cls.INPUTS, "model_id")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"state file {path} is not a valid ARMT state file ({exc.__class__.__name__})") from None
    if str(arrays["model_id"]) != model_id:
        raise InputError(f"state file {path} was written by another model ({arrays['model_id']} != {model_id})")
    arrays["written"] = arrays["written"].astype(bool)
    return cls(**{k: arrays[k] for k in cls.INPUTS})
