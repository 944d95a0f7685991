"""The recurrent memory state: a value that can be saved, loaded and passed back in.

ARMT (MemoryState):
    A        (L, B, K, d) fp32   associative matrices
    z        (L, B, K)    fp32   normalisers
    written  (L, B)       bool   whether any segment has written layer l of row b yet
    pending  Pending | None      the rows' unfinished last segments (exact resume, below)

RMT (RmtState):
    memory   (B, M, d)    the compute dtype of the graphs (float32 in state files: exact)
    written  (B,)         bool   whether any segment has written row b's memory yet (if not, the next
                                 segment reads the model's learned initial memory, not `memory`)
    pending  Pending | None      as for the ARMT

The arrays are numpy on hosts and in state files; the torch model and runners hold torch tensors in
the same container (graphs.model and graphs.rmt convert). Each class names its recurrent tensors
and the graph inputs/outputs they feed and come back from (`INPUTS` / `OUTPUTS`, graphs/contracts.py),
its batch axis (`BATCH_AXIS`) and its layer axis (`LAYER_AXIS`, None for the RMT: its memory is the
output of the whole model); `empty_state` and `check_state` pick the class by the model's kind.

Exact resume (both kinds). A call whose row ends inside a segment (n_b not a multiple of T) leaves
the recurrent tensors as the one call's final state (the partial segment wrote its memory, as the
official implementation does at the end of an input), and `pending` says how to continue that row
exactly:

    pending.ids      (B, W) int64   each row's tokens of its unfinished segment, right-padded with 0
    pending.lengths  (B,)   int64   how many (0..T-1; 0 = the row ended on a segment boundary)
    pending.before   the state before that segment (after the row's last complete one), same class

The next call starts from `before` and prepends each row's pending tokens to its new ones, so the
unfinished segment is run again, now with its later tokens; only the new positions are returned.
The first call's logits were already final (causal attention; an ARMT's memory tokens come after the
tokens of a slot; an RMT's write block comes after them too). runtimes/execute.py owns the mechanism.

State files (.npz, written atomically, read without pickle) carry `format_version` and the model id
(graphs/identity.py): state from another model is refused. Version 1 (no version field: no pending
segment, ids over the config and memory tokens only) cannot be continued exactly and is refused
with one line. Arrays of a state file:

    format_version ()  int64      STATE_FORMAT
    model_id       ()  str
    kind           ()  str        "rmt" for an RMT (absent: an ARMT)
    A, z, written  or  memory, written                  the recurrent tensors as above (bf16 as float32)
    pending_ids, pending_lengths, before/<tensor> ...    only when some row is pending
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


class RecurrentState:
    """What the state of either kind provides (the dataclasses below add their tensors and `pending`).
    Nothing here knows a kind's shapes: code that moves states around (the schedule loop, state
    files, exact resume) goes through these."""

    kind: ClassVar[str]
    INPUTS: ClassVar[dict[str, str]]  # tensor name -> graph input it feeds
    OUTPUTS: ClassVar[dict[str, str]]  # tensor name -> graph output it is read back from
    BATCH_AXIS: ClassVar[int]  # the rows' axis of every tensor
    LAYER_AXIS: ClassVar[int | None]  # the layers' axis of every tensor; None: one state per segment
    pending: "Pending | None"

    @property
    def batch(self) -> int:
        return getattr(self, next(iter(self.INPUTS))).shape[self.BATCH_AXIS]

    def tensors(self) -> dict[str, Any]:
        """The recurrent tensors by name (the graphs' inputs `INPUTS[name]`, outputs `OUTPUTS[name]`)."""
        return {name: getattr(self, name) for name in self.INPUTS}

    def numpy(self):
        """A host copy with numpy arrays (bf16 tensors as float32), its pending segment included."""
        return type(self)(**{n: to_numpy(t).copy() for n, t in self.tensors().items()},
                          pending=None if self.pending is None else self.pending.numpy())

    def without_pending(self):
        return type(self)(**self.tensors())

    @classmethod
    def memory_tensors(cls) -> tuple[str, ...]:
        """The floating-point tensors (A, z of an ARMT; memory of an RMT): what can hold NaN/Inf."""
        return tuple(n for n in cls.INPUTS if n != "written")

    @classmethod
    def index(cls, rows: Any, layer: int | None = None) -> tuple:
        """The index of `rows` (int indices or a bool mask over the batch), and of layer `layer` where the
        state has a layer axis, into each of the tensors."""
        axes = [cls.BATCH_AXIS] + ([cls.LAYER_AXIS] if cls.LAYER_AXIS is not None else [])
        idx: list[Any] = [slice(None)] * (max(axes) + 1)
        idx[cls.BATCH_AXIS] = rows
        if cls.LAYER_AXIS is not None and layer is not None:
            idx[cls.LAYER_AXIS] = layer
        return tuple(idx)


@dataclass
class Pending:
    """Each row's unfinished last segment: what the next call needs to finish it exactly (host arrays)."""

    ids: np.ndarray  # (B, W) int64, row b's first lengths[b] places are its pending tokens
    lengths: np.ndarray  # (B,) int64, 0 .. T-1
    before: RecurrentState  # the recurrent state before that segment (same class, no pending of its own)

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
class MemoryState(RecurrentState):
    """An ARMT's memory: per layer, the associative matrix and normaliser of every row."""

    kind: ClassVar[str] = "armt"
    INPUTS: ClassVar[dict[str, str]] = {"A": "A_in", "z": "z_in", "written": "written_in"}
    OUTPUTS: ClassVar[dict[str, str]] = {"A": "A_out", "z": "z_out", "written": "written_out"}
    TENSORS: ClassVar[tuple[str, ...]] = ("A", "z", "written")  # the recurrent tensors, (L, B, ...) each
    BATCH_AXIS: ClassVar[int] = 1
    LAYER_AXIS: ClassVar[int | None] = 0
    A: Any  # (L, B, K, d) fp32, numpy or torch
    z: Any  # (L, B, K) fp32
    written: Any  # (L, B) bool
    pending: Pending | None = None  # the rows' unfinished segments (host arrays), None: every row complete

    @classmethod
    def zeros(cls, n_layers: int, batch: int, d_key: int, d_model: int) -> "MemoryState":
        """An empty memory (numpy)."""
        return cls(A=np.zeros((n_layers, batch, d_key, d_model), dtype=np.float32),
                   z=np.zeros((n_layers, batch, d_key), dtype=np.float32),
                   written=np.zeros((n_layers, batch), dtype=bool))

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


@dataclass
class RmtState(RecurrentState):
    """An RMT's memory: M vectors per row, carried from segment to segment (no layer axis: the next
    memory is the whole model's output at the write places)."""

    kind: ClassVar[str] = "rmt"
    INPUTS: ClassVar[dict[str, str]] = {"memory": "memory_in", "written": "written_in"}
    OUTPUTS: ClassVar[dict[str, str]] = {"memory": "memory_out", "written": "written_out"}
    TENSORS: ClassVar[tuple[str, ...]] = ("memory", "written")  # (B, ...) each
    BATCH_AXIS: ClassVar[int] = 0
    LAYER_AXIS: ClassVar[int | None] = None
    memory: Any  # (B, M, d) compute dtype (fp32, fp16 or bf16), numpy or torch
    written: Any  # (B,) bool
    pending: Pending | None = None  # the rows' unfinished segments (host arrays), None: every row complete

    @classmethod
    def zeros(cls, batch: int, num_mem_tokens: int, d_model: int, dtype: Any = np.float32) -> "RmtState":
        """A fresh memory (numpy): nothing written, so the first segment reads the learned memory."""
        return cls(memory=np.zeros((batch, num_mem_tokens, d_model), dtype=dtype),
                   written=np.zeros((batch,), dtype=bool))

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
        if self.pending is not None:
            self.pending.before.check_fits(batch, num_mem_tokens, d_model)


STATE_CLASSES: dict[str, type[RecurrentState]] = {"armt": MemoryState, "rmt": RmtState}


def empty_state(cfg, batch: int) -> MemoryState | RmtState:
    """The fresh state of a model config (graphs.config.ModelConfig) for `batch` rows (numpy)."""
    b, a = cfg.base, cfg.armt
    if cfg.kind == "rmt":
        return RmtState.zeros(batch, a.num_mem_tokens, b.d_model)
    return MemoryState.zeros(b.n_layers, batch, a.d_key, b.d_model)


def check_state(cfg, state: MemoryState | RmtState, batch: int) -> None:
    """Refuse a state of the other kind, or one whose shapes or dtypes do not fit the model and batch
    (its pending segment's state before included)."""
    want = STATE_CLASSES[cfg.kind]
    if not isinstance(state, want):
        raise InputError(f"the memory state is an {getattr(state, 'kind', type(state).__name__).upper()} state; "
                         f"this model is an {cfg.kind.upper()}")
    if state.pending is not None and not isinstance(state.pending.before, want):
        raise InputError(f"the state before the pending segment is not an {cfg.kind.upper()} state")
    b, a = cfg.base, cfg.armt
    if cfg.kind == "rmt":
        state.check_fits(batch, a.num_mem_tokens, b.d_model)
    else:
        state.check_fits(b.n_layers, batch, a.d_key, b.d_model)


def refuse_pending(state: RecurrentState | None) -> None:
    """The reference forwards (graphs.model, graphs.rmt) start at a segment boundary: refuse a state
    that holds unfinished segments with the line that says what continues it."""
    if state is not None and state.pending is not None:
        raise InputError("this state holds unfinished segments: continue it with runtimes.execute.run_schedule "
                         "or runtimes.torch_runner.run_torch (the reference forward starts at a segment boundary)")


def save_state(path: str | Path, state: RecurrentState, model_id: str) -> None:
    """Write a state file atomically (temp file, then rename)."""
    atomic_write_bytes(Path(path), state_bytes(state, model_id))


def _file_array(t: Any) -> np.ndarray:
    """A tensor as a state file stores it: as it is, bf16 as float32 (exact)."""
    a = to_numpy(t)
    return a.astype(np.float32) if dtype_name(a.dtype) == "bfloat16" else a


def state_bytes(state: RecurrentState, model_id: str) -> bytes:
    """The .npz bytes of a state file (for writing several outputs together: graphs.atomic)."""
    arrays: dict[str, np.ndarray] = {"format_version": np.array(STATE_FORMAT, dtype=np.int64),
                                     "model_id": np.array(model_id)}
    if state.kind != "armt":  # an ARMT's file has no kind field (absent: armt)
        arrays["kind"] = np.array(state.kind)
    arrays.update({name: _file_array(t) for name, t in state.tensors().items()})
    p = state.pending
    if p is not None:
        arrays["pending_ids"] = np.asarray(to_numpy(p.ids), dtype=np.int64)
        arrays["pending_lengths"] = np.asarray(to_numpy(p.lengths), dtype=np.int64)
        arrays.update({f"before/{name}": _file_array(t) for name, t in p.before.tensors().items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def load_state(path: str | Path, model_id: str) -> MemoryState | RmtState:
    """Read a state file (numpy arrays) of either kind; refuse a malformed file, another format
    version, or a file written by another model (the line names both model ids)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"state file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"state file {path} is not a valid ARMT state file ({exc.__class__.__name__})") from None
    if "format_version" not in arrays:
        if "model_id" in arrays and any(set(cls.INPUTS) <= set(arrays) for cls in STATE_CLASSES.values()):
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
    kind = arrays.get("kind", np.array("armt"))
    if kind.dtype.kind != "U" or kind.ndim != 0 or str(kind) not in STATE_CLASSES:
        raise InputError(f"state file {path} holds a state of unknown kind {str(kind)!r}")
    cls = STATE_CLASSES[str(kind)]
    missing = [k for k in ("model_id", *cls.INPUTS) if k not in arrays]
    if missing:
        raise InputError(f"state file {path} is not a valid ARMT state file (lacks {', '.join(missing)})")
    if arrays["model_id"].dtype.kind != "U" or arrays["model_id"].ndim != 0:
        raise InputError(f"state file {path} is not a valid ARMT state file (model_id)")
    owner = str(arrays["model_id"])
    if owner != model_id:
        raise InputError(f"state file {path} was written by another model (model id {owner}); "
                         f"this model is {model_id}")
    pending = None
    keys = ("pending_ids", "pending_lengths", *(f"before/{n}" for n in cls.INPUTS))
    present = [k for k in keys if k in arrays]
    if present:
        if len(present) != len(keys):
            raise InputError(f"state file {path} holds part of a pending segment (lacks "
                             f"{', '.join(k for k in keys if k not in arrays)})")
        before = _tensors(cls, {n: arrays[f"before/{n}"] for n in cls.INPUTS}, path)
        pending = Pending(arrays["pending_ids"], arrays["pending_lengths"], before)
    state = _tensors(cls, {n: arrays[n] for n in cls.INPUTS}, path)
    state.pending = pending
    return state


def _tensors(cls: type[RecurrentState], arrays: dict[str, np.ndarray], path: Path) -> RecurrentState:
    if arrays["written"].dtype.kind not in "bui":
        raise InputError(f"state file {path}: 'written' must be bool, got {arrays['written'].dtype}")
    return cls(**{**arrays, "written": arrays["written"].astype(bool)})
