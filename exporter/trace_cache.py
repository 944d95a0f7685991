"""Trace cache: a second export of a same-shaped model skips torch.export (issue 12).

What is cached: the graph torch.onnx's dynamo exporter translated (torch.export capture, aten
decompositions, FX -> ONNX) BEFORE the onnxscript optimizer, without the weights. Those two steps
are ~85% of a tiny export's trace time; the optimizer (which folds weight slices into new
initializers, so its output depends on the weights) and everything after it run on every export, on
the model's own tensors. A hit therefore gives the same graph and weight bytes as a fresh trace
(tests/test_trace_cache.py checks it byte for byte).

Key (sha256 of a canonical JSON): the model kind, its HF config and ARMT/RMT config, the role,
precision, opset, whether attention is fused and whether the memory read is the tensor-core one
(the cell's `fast_memory`), every parameter's and buffer's name, shape and
dtype in the cell, the torch/onnx/onnxscript/onnx_ir/numpy/Python versions, and the content and location
of the code that decides the graph (graphs/*.py, exporter/trace.py, this module; the location
because the graphs' node metadata records source paths). Any change of these is another key.

Where: $ARMT_TRACE_CACHE_DIR, else $ARMT_CACHE/traces, else $XDG_CACHE_HOME/armt/traces, else
~/.cache/armt/traces (the checksum cache's directory, exporter/checksums.py), one file per key, written atomically
(graphs.atomic), at most MAX_ENTRIES (least recently used dropped). An entry is never trusted
blindly: a wrong magic, sha256, key or parse, or a cell tensor of another shape/dtype than recorded,
is a miss with a warning (the fresh trace then replaces the entry). `ARMT_TRACE_CACHE=0` or
`armt export --no-trace-cache` turns it off.

Entry file: b"ARMT-TRACE-1\\n" + sha256 hex of the payload + b"\\n" + payload, the payload an ONNX
ModelProto whose weight initializers hold no data (they are re-bound by name to the cell's tensors on
load) and whose metadata_props carry the key, the list of re-bound names and the graph's name-authority
state (the optimizer names what it adds from its counters: restored, the names are the fresh ones).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import torch

from exporter.decompositions import full_decompositions_forced

log = logging.getLogger("armt.export")

MAGIC = b"ARMT-TRACE-1\n"
SUFFIX = ".trace"
MAX_ENTRIES = 256
KEY_PROP = "armt.trace_cache.key"
BOUND_PROP = "armt.trace_cache.bound"  # JSON {name: [onnx dtype name, shape]} of the re-bound initializers
NAMES_PROP = "armt.trace_cache.names"  # JSON: the graph's name-authority state (see _names_state)
ENV_SWITCH = "ARMT_TRACE_CACHE"
DIR_ENV = "ARMT_TRACE_CACHE_DIR"
_ROOT = Path(__file__).resolve().parent.parent  # the project root (graphs/, exporter/)


def enabled() -> bool:
    """The default of `armt export`: on unless ARMT_TRACE_CACHE is 0/off/false/no."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def cache_root() -> Path:
    """$ARMT_TRACE_CACHE_DIR, else the traces/ folder of the checksum cache's directory."""
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV])
    from exporter.checksums import cache_dir
    return cache_dir() / "traces"


TRACE_SOURCES = ("trace.py", "trace_cache.py", "layered.py", "decompositions.py")  # the exporter files that shape a traced graph


@functools.lru_cache(maxsize=4)
def source_digest(root: Path = _ROOT) -> str:
    """sha256 over the path and bytes of every source file that shapes a traced graph (under `root`,
    the project's checkout)."""
    files = sorted((root / "graphs").glob("*.py")) + [root / "exporter" / f for f in TRACE_SOURCES]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnx_ir
    import onnxscript
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnx_ir": onnx_ir.__version__, "numpy": numpy.__version__, "python": sys.version.split()[0]}


def cell_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the cell (non-persistent ones too) by its dotted name: the names
    torch.onnx gives the graph's weight initializers."""
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return tensors


def trace_key(model, role: str, precision: str, opset: int, fused: bool, module: torch.nn.Module) -> str:
    cfg = model.cfg
    spec = {"format": MAGIC.decode().strip(), "kind": cfg.kind, "config": cfg.base.hf_config,
            "armt_config": cfg.armt.to_dict(), "role": role, "precision": precision, "opset": opset,
            "fused": fused, "fast_memory": bool(getattr(module, "fast_memory", False)),
            "full_decompositions": full_decompositions_forced(), "versions": _versions(), "source": source_digest(),
            "tensors": [[n, list(t.shape), str(t.dtype)] for n, t in cell_tensors(module).items()]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


class TraceCache:
    """Pre-optimizer ONNX IR graphs by trace_key, under `root`."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_root()

    def path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def load(self, key: str, module: torch.nn.Module):
        """The cached onnx_ir Model of `key` with its weights bound to `module`'s tensors (sharing
        their memory, as a fresh trace's do), or None (no entry, or an unusable one: warned)."""
        path = self.path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("trace cache entry %s cannot be read (%s); tracing afresh", path, exc.strerror)
            return None
        try:
            model = _decode(blob, key, module)
        except _Unusable as exc:
            log.warning("trace cache entry %s is unusable (%s); tracing afresh", path, exc)
            return None
        try:
            os.utime(path)  # recently used (pruning drops the oldest)
        except OSError:
            pass
        log.info("trace cache hit: %s", path.name)
        return model

    def save(self, key: str, model, module: torch.nn.Module) -> None:
        """Store `model` (the pre-optimizer IR of a fresh trace; left as it was) under `key`. A failure
        to write is a warning: the export goes on without the cache."""
        from graphs.atomic import atomic_write_bytes
        from graphs.errors import OutputError
        try:
            blob = _encode(model, key, module)
        except _Unusable as exc:
            log.info("trace cache: %s graph not stored (%s)", key[:12], exc)
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path(key), blob)
        except (OSError, OutputError) as exc:
            log.warning("trace cache: cannot write %s (%s)", self.path(key), exc)
            return
        self.prune()

    def prune(self, keep: int = MAX_ENTRIES) -> None:
        try:
            entries = sorted(self.root.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
            for old in entries[keep:]:
                old.unlink(missing_ok=True)
        except OSError as exc:  # another process pruned at the same time
            log.debug("trace cache prune: %s", exc)


class _Unusable(Exception):
    """A cache entry that cannot be used (the reason is the message)."""


class WeightMismatch(Exception):
    """An initializer left out by `serialize_unbound` that `bind_weights` cannot re-bind (`name`)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def frame(magic: bytes, payload: bytes) -> bytes:
    """`payload` behind `magic` and its sha256 (hex, one line)."""
    return magic + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def unframe(magic: bytes, blob: bytes) -> bytes:
    """The payload of `frame(magic, ...)`; ValueError("header") for another or a short blob,
    ValueError("sha256") for a damaged one."""
    if not blob.startswith(magic) or len(blob) < len(magic) + 65:
        raise ValueError("header")
    digest, payload = blob[len(magic):len(magic) + 64], blob[len(magic) + 65:]
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise ValueError("sha256")
    return payload


def serialize_unbound(model, names, props: dict[str, str] | None = None) -> bytes:
    """The serialized onnx_ir `model` without the data of its initializers `names` (a zero-length
    placeholder each, their dtype and shape in the metadata entry BOUND_PROP, for `bind_weights`)
    and with `props` in its metadata; `model` itself is as it was afterwards."""
    import numpy as np
    import onnx_ir as ir
    held: dict = {}
    bound: dict[str, list] = {}
    for name in names:
        value = model.graph.initializers[name]
        held[name] = value.const_value
        bound[name] = [value.const_value.dtype.name, list(value.const_value.shape)]
        value.const_value = ir.Tensor(np.zeros(0, dtype=np.uint8), name=name)  # placeholder, no data
    added = {**(props or {}), BOUND_PROP: json.dumps(bound, sort_keys=True)}
    model.metadata_props.update(added)
    try:
        return ir.serde.serialize_model(model).SerializeToString()
    finally:
        for k in added:
            del model.metadata_props[k]
        for name, tensor in held.items():
            model.graph.initializers[name].const_value = tensor


def bind_weights(model, bound: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Bind the initializers `bound` ({name: [dtype name, shape]}, from serialize_unbound) of a
    deserialized `model` to `tensors` (sharing their memory, as a fresh trace binds them).
    WeightMismatch for one that is missing or of another dtype/shape."""
    import onnx_ir as ir
    from torch.onnx._internal.exporter._core import TorchTensor  # what a fresh trace binds
    for name, (dtype, shape) in bound.items():
        value = model.graph.initializers.get(name)
        t = tensors.get(name)
        if value is None or t is None:
            raise WeightMismatch(name, f"initializer {name} is not in the graph or the cell")
        tensor = TorchTensor(t.detach(), name=name)
        if tensor.dtype.name != dtype or list(t.shape) != shape:
            raise WeightMismatch(name, f"{name} is {tensor.dtype.name} {list(t.shape)} in the cell, "
                                       f"{dtype} {shape} in the entry")
        value.const_value = tensor
        value.dtype = tensor.dtype
        value.shape = ir.Shape(list(t.shape))


def _encode(model, key: str, module: torch.nn.Module) -> bytes:
    """The entry bytes of `model`: weight initializers (the cell's tensors) without data."""
    if len(model.functions):
        raise _Unusable("the graph has local functions")
    names = _names_state(model.graph)
    tensors = cell_tensors(module)
    weights = [name for name, value in model.graph.initializers.items()
               if name in tensors and value.const_value is not None]
    payload = serialize_unbound(model, weights, {KEY_PROP: key, NAMES_PROP: json.dumps(names)})
    return frame(MAGIC, payload)


def _decode(blob: bytes, key: str, module: torch.nn.Module):
    import onnx
    import onnx_ir as ir
    try:
        payload = unframe(MAGIC, blob)
    except ValueError as exc:
        raise _Unusable("not a trace cache entry" if str(exc) == "header"
                        else "sha256 mismatch: the file is damaged") from None
    try:
        proto = onnx.ModelProto.FromString(payload)
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # protobuf/onnx_ir raise several types on damaged input
        raise _Unusable(f"does not parse: {exc.__class__.__name__}") from None
    props = model.metadata_props
    if props.get(KEY_PROP) != key:
        raise _Unusable("recorded key differs")
    try:
        bound = json.loads(props.pop(BOUND_PROP))
        names = json.loads(props.pop(NAMES_PROP))
    except (KeyError, ValueError):
        raise _Unusable("no list of weight initializers or names") from None
    del props[KEY_PROP]
    _restore_names(model.graph, names)
    try:
        bind_weights(model, bound, cell_tensors(module))
    except WeightMismatch as exc:
        raise _Unusable(str(exc)) from None
    return model


def _names_state(graph) -> dict:
    """The graph's onnx_ir name authority (counters and names taken): the optimizer names the values
    and nodes it adds from it ("val_<n>", "node_<op>_<n>"), so a graph from the cache must continue
    the counters where the fresh trace left them to get the same names."""
    auth = getattr(graph, "_name_authority", None)
    try:
        return {"value_counter": auth._value_counter, "node_counter": auth._node_counter,
                "value_names": sorted(auth._value_names), "node_names": sorted(auth._node_names)}
    except AttributeError:  # another onnx_ir layout: the key has its version, so just do not cache
        raise _Unusable("unknown onnx_ir name authority") from None


def _restore_names(graph, state: dict) -> None:
    auth = getattr(graph, "_name_authority", None)
    if auth is None or not hasattr(auth, "_value_names"):
        raise _Unusable("unknown onnx_ir name authority")
    try:
        auth._value_counter, auth._node_counter = int(state["value_counter"]), int(state["node_counter"])
        auth._value_names, auth._node_names = set(state["value_names"]), set(state["node_names"])
    except (KeyError, TypeError, ValueError):
        raise _Unusable("malformed name state") from None
