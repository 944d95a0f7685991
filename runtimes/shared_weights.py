"""One copy of an export's weights for all of its ONNX Runtime sessions on one device (issue 10).

Every graph of an export references the same external-data file (`weights.data`, exporter/weights.py),
but an ONNX Runtime session loads its own copy of every initializer: the masked step graph and its
causal twin, the companion runners (segment, diagonal_step, lm_head), the pinned-shape sessions of
CUDA graphs and the decoder's sessions each held the weights once more (an fp16 LLaMA-1B run peaked
at 12 GiB on the H200 with 2.5 GB of weights). A `WeightPool` holds one OrtValue per external
initializer of an export on one device and `OrtSessionLoader` hands the ones its graph references
to ONNX Runtime (`SessionOptions.add_initializer`: the session uses a caller-owned value in place,
without a copy, where it lives on the device the session plans that initializer on).

    pool_for(graph_path, device)   -> WeightPool (one per export directory and device, shared while alive)
    pool.initializers_for(path)    -> {initializer name: OrtValue} for that graph's external tensors

Values: the external-data file is memory-mapped once (np.memmap, read-only). CPU: each OrtValue wraps
its slice of the map without a copy (`ortvalue_from_numpy`; bf16 as its uint16 bits with ONNX type
16). CUDA (and the CPU with ARMT_ORT_SHARED_WEIGHTS=copy, which runs that path on the CPU): one device
tensor per initializer (`ortvalue_from_shape_and_type` + `update_inplace`), which owns its buffer and
so is refused by `add_initializer` ("must be owned by the user"); the session gets a DLPack view of
it (`OrtValue.from_dlpack`: same memory, not owned; the view keeps the owner alive).

Identity: a tensor is keyed by (file, offset, length, ONNX type, shape), not by name: two graphs that
name the same bytes differently share one value. Initializers held inline in the .onnx (small
constants) are left to the session, and so are external ones that only constant nodes read
(`run_time_inputs`: ONNX Runtime folds those at load into tensors of its own, e.g. the `segment`
graph's per-layer Slices of a weight stack; pooling them would keep an unused copy alive). A pool is reused only while every file it mapped keeps its
(inode, size, mtime): an export rewritten in place gets a new pool for new sessions.

Lifetime: a session holds its pool (attribute `_armt_weight_pool`), the registry only a weak reference:
the pool (the device copy, the map) goes with the last session that uses it.

Fallbacks (never a silent wrong result): ONNX Runtime uses its own copy, with a warning in its log,
for an initializer planned on another device than the value's (e.g. a CUDA session's CPU node);
before a pool's first use on a device, a one-node probe session checks that ONNX Runtime computes
with a value made as the pool makes them (`probe_sharing`; no: no pool on that device, one warning,
rather than the pool's copy plus each session's own); a session that fails to load with the pool's
values is reopened without them (runtimes/loaders.py, one warning per export and device). Off: ARMT_ORT_SHARED_WEIGHTS=0 or OrtRunner(shared_weights=False).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.base import Device, parse_device

log = logging.getLogger("armt.ort")

ENV = "ARMT_ORT_SHARED_WEIGHTS"  # "0"/"off": every session loads its own copy; "copy": device path on the CPU
BF16 = 16  # ONNX TensorProto.BFLOAT16 (numpy has none: stored as uint16 bits)
# ONNX element type -> the numpy dtype its bytes are read as (bf16: its bits)
STORAGE_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
                  9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64, BF16: np.uint16}


def env_mode() -> str:
    """"off", "on" or "copy" (ARMT_ORT_SHARED_WEIGHTS; unset: on)."""
    v = os.environ.get(ENV, "").strip().lower()
    if v in ("0", "no", "off", "false"):
        return "off"
    return "copy" if v == "copy" else "on"


def sharing_enabled(option: bool | None) -> bool:
    """An explicit option wins; None: the environment (default on)."""
    return env_mode() != "off" if option is None else bool(option)


@dataclass(frozen=True)
class ExternalTensor:
    """One initializer of a graph whose bytes live in an external-data file."""

    name: str
    file: Path  # resolved
    offset: int
    length: int
    onnx_type: int
    shape: tuple[int, ...]

    @property
    def key(self) -> tuple:
        return (str(self.file), self.offset, self.length, self.onnx_type, self.shape)


def run_time_inputs(graph) -> set[str]:
    """Names of the graph's initializers that some node reads at run time: a node with at least one
    input that is not a constant (a graph input or computed from one). Constants: initializers (not
    also graph inputs), Constant nodes' outputs, and the outputs of nodes whose every input is constant,
    in the graph's (topological) order. An initializer read only by such constant nodes is folded by
    ONNX Runtime at load (e.g. the sequential `segment` graph's per-layer `Slice`s of a weight stack):
    the session holds the folded result, never the initializer, so a pooled copy of it would be dead
    weight (on CUDA, device memory for nothing)."""
    inputs = {i.name for i in graph.input}
    const = {t.name for t in graph.initializer if t.name not in inputs}
    const.add("")  # an omitted optional input
    out: set[str] = set()
    for node in graph.node:
        has_subgraph = any(a.type in (5, 10) for a in node.attribute)  # GRAPH, GRAPHS
        if node.op_type == "Constant" and not has_subgraph:
            const.update(node.output)
        elif not has_subgraph and all(i in const for i in node.input):
            const.update(node.output)
        else:
            out.update(i for i in node.input if i)
    return out


def external_tensors(graph_path: Path, run_time_only: bool = True) -> list[ExternalTensor]:
    """The main graph's initializers with external data (the .onnx read without its weights); tensors
    whose recorded length does not match their dtype and shape, or of a dtype not in STORAGE_DTYPES,
    and (`run_time_only`) those only constant nodes read (run_time_inputs) are left out (the session
    loads those itself)."""
    import onnx
    model = onnx.load(str(graph_path), load_external_data=False)
    used = run_time_inputs(model.graph) if run_time_only else None
    out = []
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL or t.data_type not in STORAGE_DTYPES:
            continue
        if used is not None and t.name not in used:
            continue
        info = {e.key: e.value for e in t.external_data}
        if "location" not in info:
            continue
        shape = tuple(int(d) for d in t.dims)
        itemsize = np.dtype(STORAGE_DTYPES[t.data_type]).itemsize
        want = int(np.prod(shape, dtype=np.int64)) * itemsize
        length = int(info.get("length", want))
        if length != want or want == 0:
            continue
        file = (graph_path.parent / info["location"]).resolve()
        out.append(ExternalTensor(t.name, file, int(info.get("offset", 0)), length, t.data_type, shape))
    return out


def _signature(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def dlpack_view(ort, owner):
    """An OrtValue on `owner`'s memory that does not own it (DLPack; the view keeps `owner` alive).
    onnxruntime 1.32 takes the OrtValue itself (`__dlpack__`); older builds a capsule, with or without
    the `is_bool_tensor` flag. None of these: the AttributeError/TypeError reaches the loader, whose
    sessions then load their own copies (one warning)."""
    if hasattr(owner, "__dlpack__") and hasattr(ort.OrtValue, "from_dlpack"):
        return ort.OrtValue.from_dlpack(owner)
    from onnxruntime.capi import _pybind_state as C
    capsule = owner._ortvalue.to_dlpack()
    try:
        return ort.OrtValue(C.OrtValue.from_dlpack(capsule, False))
    except TypeError:  # the one-argument signature
        return ort.OrtValue(C.OrtValue.from_dlpack(owner._ortvalue.to_dlpack()))


def make_value(ort, host: np.ndarray, onnx_type: int, device: Device, copy: bool) -> tuple[Any, Any]:
    """(value handed to sessions, its owner) of a host array (its storage dtype; bf16 as uint16 bits):
    a view of the array on the CPU (no copy), or (`copy`) a tensor on `device` holding its bytes and a
    DLPack view of it (`add_initializer` refuses a value that owns its buffer)."""
    if not copy:
        if onnx_type == BF16:
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(host, BF16), None
        return ort.OrtValue.ortvalue_from_numpy(host), None
    owner = ort.OrtValue.ortvalue_from_shape_and_type(list(host.shape), onnx_type, device.type, device.id)
    owner.update_inplace(np.ascontiguousarray(host))  # host -> device, once
    return dlpack_view(ort, owner), owner


_PROBED: dict[tuple, bool] = {}  # (device, copy, providers) -> did the probe session use the value?


def probe_sharing(ort, device: Device, copy: bool, providers: list, make=make_value) -> bool:
    """Does ONNX Runtime compute with a caller-owned value made this way, on these providers? ONNX
    Runtime silently (but for its own log) loads its own copy of an initializer whose value's device
    differs from the planned one, and the pool would then be one copy more, not one copy in all.
    A one-node session (y = x + W, W inline zeros, the value [1, 2]) answers; once per process and
    key. An error counts as no."""
    from onnx import TensorProto, helper, numpy_helper
    key = (str(device), bool(copy), repr(providers))
    if key in _PROBED:
        return _PROBED[key]
    g = helper.make_graph([helper.make_node("Add", ["x", "W"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                          [numpy_helper.from_array(np.zeros(2, np.float32), "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 8)
    want = np.array([1.0, 2.0], np.float32)
    try:
        value, owner = make(ort, want.copy(), TensorProto.FLOAT, device, copy)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_initializer("W", value)
        session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=providers)
        got = session.run(None, {"x": np.zeros(2, np.float32)})[0]
        ok = bool(np.array_equal(got, want))
        del session, value, owner
    except Exception as exc:  # noqa: BLE001 (any failure: no sharing on this device)
        log.info("shared-weights probe on %s failed: %s", device, exc)
        ok = False
    _PROBED[key] = ok
    return ok


class WeightPool:
    """The OrtValues of one export's external initializers on one device (made on first use)."""

    def __init__(self, root: Path, device: Device, copy: bool):
        self.root, self.device, self.copy = root, device, copy
        self._maps: dict[Path, tuple[np.memmap, tuple]] = {}  # file -> (read-only map, its signature)
        self._graphs: dict[Path, tuple[tuple, list[ExternalTensor]]] = {}  # graph -> (signature, tensors)
        self._values: dict[tuple, tuple[Any, Any]] = {}  # tensor key -> (value given to sessions, its owner)
        self._lock = threading.Lock()
        self.nbytes = 0  # bytes of the values made (device memory for a copy pool)
        self.refused = False  # a session failed to load with this pool's values (logged once)

    def current(self) -> bool:
        """Do the files it mapped still have the identity they had (not rewritten since)?"""
        try:
            return all(_signature(f) == sig for f, (_, sig) in self._maps.items())
        except OSError:
            return False

    def _map(self, file: Path) -> np.memmap:
        got = self._maps.get(file)
        if got is None:
            got = self._maps[file] = (np.memmap(file, dtype=np.uint8, mode="r"), _signature(file))
        return got[0]

    def _tensors(self, graph_path: Path) -> list[ExternalTensor]:
        sig = _signature(graph_path)
        got = self._graphs.get(graph_path)
        if got is None or got[0] != sig:
            got = self._graphs[graph_path] = (sig, external_tensors(graph_path))
        return got[1]

    def _make(self, t: ExternalTensor) -> tuple[Any, Any]:
        """(value, owner) for one tensor: a view of the map (CPU) or a device copy and its DLPack view."""
        from runtimes.ort_import import import_onnxruntime
        ort = import_onnxruntime()
        mm = self._map(t.file)
        if t.offset + t.length > mm.size:
            raise ValueError(f"{t.name}: bytes {t.offset}..{t.offset + t.length} past the end of {t.file.name}")
        host = mm[t.offset:t.offset + t.length].view(STORAGE_DTYPES[t.onnx_type]).reshape(t.shape)  # no copy
        return make_value(ort, host, t.onnx_type, self.device, self.copy)

    def check_used(self, ort, providers: list) -> bool:
        """Does a session on these providers compute with values made as this pool makes them (probe_sharing)?"""
        return probe_sharing(ort, self.device, self.copy, providers)

    def initializers_for(self, graph_path: str | Path) -> dict[str, Any]:
        """{name: OrtValue} of the graph's external initializers (made now where not yet made)."""
        graph_path = Path(graph_path).resolve()
        with self._lock:
            out = {}
            for t in self._tensors(graph_path):
                got = self._values.get(t.key)
                if got is None:
                    got = self._values[t.key] = self._make(t)
                    self.nbytes += t.length
                out[t.name] = got[0]
            return out

    @property
    def count(self) -> int:
        return len(self._values)


_POOLS: dict[tuple, "weakref.ref[WeightPool]"] = {}
_POOLS_LOCK = threading.Lock()


def pool_for(graph_path: str | Path, device: str | Device = "cpu", copy: bool | None = None) -> WeightPool:
    """The live pool of the graph's export directory on `device` (a new one if none is alive or its files
    changed). `copy`: device copies even on the CPU (None: CUDA, or ARMT_ORT_SHARED_WEIGHTS=copy)."""
    dev = parse_device(device)
    if copy is None:
        copy = dev.type != "cpu" or env_mode() == "copy"
    root = Path(graph_path).resolve().parent
    key = (str(root), str(dev), bool(copy))
    with _POOLS_LOCK:
        ref = _POOLS.get(key)
        pool = ref() if ref is not None else None
        if pool is None or not pool.current():
            pool = WeightPool(root, dev, bool(copy))
            _POOLS[key] = weakref.ref(pool)
        for k in [k for k, r in _POOLS.items() if r() is None]:
            del _POOLS[k]
        return pool


def live_pools() -> list[WeightPool]:
    """The pools some session still holds (tests, diagnostics)."""
    with _POOLS_LOCK:
        return [p for p in (r() for r in _POOLS.values()) if p is not None]
