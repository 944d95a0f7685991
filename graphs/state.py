"""The recurrent memory state: a value that can be saved, loaded and passed back in.

    A        (L, B, K, d) fp32   associative matrices
    z        (L, B, K)    fp32   normalisers
    written  (L, B)       bool   whether any segment has written layer l of row b yet
    pending  Pending | None      the rows' unfinished last segments (exact resume, below)

The arrays are numpy on hosts and in state files; the torch model and runners hold torch tensors in
the same container (graphs.model converts).

Exact resume. A call whose row ends inside a segment (n_b not a multiple of T) leaves A/z/written as
the one call's final state (the partial segment wrote its memory, as the official implementation
does at the end of an input), and `pending` says how to continue that row exactly:

    pending.ids      (B, W) int64   each row's tokens of its unfinished segment, right-padded with 0
    pending.lengths  (B,)   int64   how many (0..T-1; 0 = the row ended on a segment boundary)
    pending.before   MemoryState    the state before that segment (after the row's last complete one)

The next call starts from `before` and prepends each row's pending tokens to its new ones, so the
unfinished segment is run again, now with its later tokens; only the new positions are returned.
The first call's logits were already final (causal attention; memory tokens come after the tokens of
a slot). runtimes/execute.py owns the mechanism.

State files (.npz, written atomically, read without pickle) carry `format_version` and the model id
(graphs/identity.py): state from another model is refused. Version 1 (no version field: no pending
segment, ids over the config and memory tokens only) cannot be continued exactly and is refused
with one line. Arrays of a state file:

    format_version ()  int64      STATE_FORMAT
    model_id       ()  str
    A, z, written                 as above
    pending_ids, pending_lengths, before/A, before/z, before/written     only when some row is pending
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

STATE_FORMAT = 2


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
class Pending:
    """Each row's unfinished last segment: what the next call needs to finish it exactly (host arrays)."""

    ids: np.ndarray  # (B, W) int64, row b's first lengths[b] places are its pending tokens
    lengths: np.ndarray  # (B,) int64, 0 .. T-1
    before: "MemoryState"  # the recurrent state before that segment (no pending of its own)

    def numpy(self) -> "Pending":
        return Pending(np.array(to_numpy(self.ids), dtype=np.int64), np.array(to_numpy(self.lengths), dtype=np.int64),
                       self.before.numpy())

    def check_fits(self, batch: int, segment_size: int, vocab_size: int) -> None:
        ids, lengths = to_numpy(self.ids), to_numpy(self.lengths)
        if ids.ndim != 2 or ids.shape[0] != batch or lengths.shape != (batch,):
            raise InputError(f"pending segment has ids {tuple(ids.shape)} and lengths {tuple(lengths.shape)}, "
                             f"this batch needs ({batch}, W) and ({batch},)")
        if ids.dtype.kind not in "iu" or lengths.dtype.kind not in "iu":
            raise InputError("pending segment ids and lengths must be integers")
        if lengths.size and (int(lengths.min()) < 0 or int(lengths.max()) >= segment_size
                             or int(lengths.max()) > ids.shape[1]):
            raise InputError(f"pending segment lengths must lie in [0, {min(segment_size - 1, ids.shape[1])}], "
                             f"got [{int(lengths.min())}, {int(lengths.max())}]")
        real = ids[np.arange(ids.shape[1])[None, :] < lengths[:, None]]
        if real.size and (int(real.min()) < 0 or int(real.max()) >= vocab_size):
            raise InputError(f"pending segment ids must lie in [0, {vocab_size})")
        if self.before.pending is not None:
            raise InputError("the state before a pending segment cannot itself hold a pending segment")


@dataclass
class MemoryState:
    A: Any  # (L, B, K, d) fp32, numpy or torch
    z: Any  # (L, B, K) fp32
    written: Any  # (L, B) bool
    pending: Pending | None = None  # the rows' unfinished segments (host arrays), None: every row complete

    TENSORS: ClassVar[tuple[str, ...]] = ("A", "z", "written")  # the recurrent tensors, (L, B, ...) each

    @classmethod
    def zeros(cls, n_layers: int, batch: int, d_key: int, d_model: int) -> "MemoryState":
        """An empty memory (numpy)."""
        return cls(A=np.zeros((n_layers, batch, d_key, d_model), dtype=np.float32),
                   z=np.zeros((n_layers, batch, d_key), dtype=np.float32),
                   written=np.zeros((n_layers, batch), dtype=bool))

    @property
    def batch(self) -> int:
        return self.A.shape[1]

    def tensors(self) -> dict[str, Any]:
        """The recurrent tensors by name (the graphs' `<name>_in` / `<name>_out`)."""
        return {name: getattr(self, name) for name in self.TENSORS}

    def numpy(self) -> "MemoryState":
        """A host copy with numpy arrays."""
        return MemoryState(to_numpy(self.A).copy(), to_numpy(self.z).copy(), to_numpy(self.written).copy(),
                           None if self.pending is None else self.pending.numpy())

    def without_pending(self) -> "MemoryState":
        return MemoryState(self.A, self.z, self.written)

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
        if self.pending is not None:
            self.pending.before.check_fits(n_layers, batch, d_key, d_model)


def save_state(path: str | Path, state: MemoryState, model_id: str) -> None:
    """Write a state file atomically (temp file, then rename)."""
    atomic_write_bytes(Path(path), state_bytes(state, model_id))


def state_bytes(state: MemoryState, model_id: str) -> bytes:
    """The .npz bytes of a state file (for writing several outputs together: graphs.atomic)."""
    arrays: dict[str, np.ndarray] = {"format_version": np.array(STATE_FORMAT, dtype=np.int64),
                                     "model_id": np.array(model_id)}
    arrays.update({name: to_numpy(t) for name, t in state.tensors().items()})
    p = state.pending
    if p is not None:
        arrays["pending_ids"] = np.asarray(to_numpy(p.ids), dtype=np.int64)
        arrays["pending_lengths"] = np.asarray(to_numpy(p.lengths), dtype=np.int64)
        arrays.update({f"before/{name}": to_numpy(t) for name, t in p.before.tensors().items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def load_state(path: str | Path, model_id: str) -> MemoryState:
    """Read a state file (numpy arrays); refuse a malformed file, another format version, or a file
    written by another model (the line names both model ids)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"state file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"state file {path} is not a valid ARMT state file ({exc.__class__.__name__})") from None
    if "format_version" not in arrays:
        if {"A", "z", "written", "model_id"} <= set(arrays):
            raise InputError(f"state file {path} has format version 1 (from an armt that neither kept unfinished "
                             f"segments nor identified models by every weight); this armt reads version "
                             f"{STATE_FORMAT}: run the input again to make a new state file")
        raise InputError(f"state file {path} is not a valid ARMT state file (no format_version)")
    try:
        version = int(arrays["format_version"])
    except (TypeError, ValueError):
        raise InputError(f"state file {path} is not a valid ARMT state file (format_version)") from None
    if version != STATE_FORMAT:
        raise InputError(f"state file {path} has format version {version}; this armt reads version {STATE_FORMAT}")
    missing = [k for k in ("model_id", *MemoryState.TENSORS) if k not in arrays]
    if missing:
        raise InputError(f"state file {path} is not a valid ARMT state file (lacks {', '.join(missing)})")
    if arrays["model_id"].dtype.kind != "U" or arrays["model_id"].ndim != 0:
        raise InputError(f"state file {path} is not a valid ARMT state file (model_id)")
    owner = str(arrays["model_id"])
    if owner != model_id:
        raise InputError(f"state file {path} was written by another model (model id {owner}); "
                         f"this model is {model_id}")
    pending = None
    keys = ("pending_ids", "pending_lengths", *(f"before/{n}" for n in MemoryState.TENSORS))
    present = [k for k in keys if k in arrays]
    if present:
        if len(present) != len(keys):
            raise InputError(f"state file {path} holds part of a pending segment (lacks "
                             f"{', '.join(k for k in keys if k not in arrays)})")
        before = MemoryState(arrays["before/A"], arrays["before/z"], _bool(arrays["before/written"], path))
        pending = Pending(arrays["pending_ids"], arrays["pending_lengths"], before)
    return MemoryState(A=arrays["A"], z=arrays["z"], written=_bool(arrays["written"], path), pending=pending)


def _bool(a: np.ndarray, path: Path) -> np.ndarray:
    if a.dtype.kind not in "bui":
        raise InputError(f"state file {path}: 'written' must be bool, got {a.dtype}")
    return a.astype(bool)
