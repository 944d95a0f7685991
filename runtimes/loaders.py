"""Loaders: what a runner loads, apart from the runner (Polygraphy's `SessionFromOnnx` /
`EngineFromBytes` are the model). A loader is a callable that makes the backend object; runners call
it in `activate()`. The only place that creates ONNX Runtime sessions and reads their errors.

    open_export(dir)                  -> Manifest (checked; checksums unless told otherwise)
    OrtSessionLoader(path, device)()  -> onnxruntime.InferenceSession
    EngineBytesLoader(path)()         -> serialized TensorRT engine (bytes)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from exporter.manifest import Manifest, load_manifest
from graphs.errors import BackendUnavailable, ExportError, InputError
from runtimes.base import Device, parse_device
from runtimes.ort_import import import_onnxruntime

log = logging.getLogger("armt.run")
_POOL_FAILED: set[tuple[str, str]] = set()  # (export dir, device) whose pool could not be made (warned once)


def open_export(export: str | Path | Manifest, precision: str | None = None,
                verify_checksums: bool | str = True) -> Manifest:
    """The export's manifest (checksums verified unless told otherwise: exporter/checksums.py, True is
    "cached"); refuse a precision mismatch."""
    manifest = export if isinstance(export, Manifest) else load_manifest(export, verify_checksums=verify_checksums)
    if precision is not None and precision != manifest.precision:
        raise InputError(f"export {manifest.root} holds {manifest.precision} graphs, not {precision} "
                         f"(export again with --precision {precision})")
    return manifest


def load_export_tokenizer(export: str | Path | Manifest):
    """The tokenizer an export carries: the files its manifest lists (checksummed; files added to the
    directory afterwards are not looked at). None: InputError, the one line `--prompt` users see."""
    from graphs.tokenizer import load_tokenizer
    manifest = open_export(export)
    return load_tokenizer(manifest.root, list(manifest.tokenizer))


class NotRunnable(BackendUnavailable):
    """ONNX Runtime has no kernel for some node of the graph on this provider (e.g. bf16 on the CPU)."""


class CaptureRefused(BackendUnavailable):
    """ONNX Runtime refused CUDA-graph capture for a session (a node not on the CUDA execution provider,
    Memcpy nodes for shape computations on the CPU, control flow): the runner falls back to plain runs."""


def capture_refused(exc: Exception) -> bool:
    """Is this ONNX Runtime error its refusal of graph capture ("This session cannot use the graph
    capture feature as requested by the user as ...")?"""
    return "graph capture feature" in str(exc).lower() or "cuda graph feature" in str(exc).lower()


def raise_if_not_runnable(exc: Exception, what: str) -> None:
    """Turn ONNX Runtime's "no kernel" errors into NotRunnable (a limit of the provider, not a broken graph)."""
    text = str(exc)
    if "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text:
        first = text.splitlines()[0] if text else exc.__class__.__name__
        start = first.find("Could not")
        raise NotRunnable(f"ONNX Runtime cannot run {what}: {first[start:] if start >= 0 else first}"[:300]) from None


@dataclass
class OrtSessionLoader:
    """An ONNX Runtime session of one .onnx file on the CPU or CUDA execution provider.

    CPU: weight prepacking off (it would copy every weight once more). CUDA: TF32 off (fp32 products at
    full precision: the fp32 parity promise) unless `tf32` (the export's Manifest.tf32: fp16/bf16
    graphs with tensor-core memory math, whose only fp32 products are the memory's, meant to run as
    TF32; the CUDA-graph sessions get the same option); `cuda_graph=True` asks the CUDA provider to capture CUDA graphs (run options then pick
    the graph by `gpu_graph_id`). `fixed_dims` pins the graph's symbolic dims ("batch", "width", ...)
    with ONNX Runtime's free-dimension overrides: shape arithmetic then folds to constants at load
    (no Shape nodes left for the CPU, which would make the CUDA provider refuse capture).
    `shared_weights` (None: ARMT_ORT_SHARED_WEIGHTS, default on): the graph's external initializers come
    from the export's WeightPool on this device (runtimes/shared_weights.py: one copy for every session
    of the export); a session that fails to load with them is reopened without (one warning)."""

    path: Path
    device: Device = field(default_factory=lambda: Device("cpu"))
    threads: int | None = None
    cuda_graph: bool = False
    fixed_dims: dict[str, int] | None = None  # symbolic dims pinned (free-dimension overrides)
    tf32: bool = False  # CUDA: fp32 MatMuls as TF32 (Manifest.tf32; never for fp32 graphs)
    shared_weights: bool | None = None  # the export's one copy of the weights (None: the environment, default on)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.device = parse_device(self.device)

    def providers(self, ort) -> list:
        if self.device.type != "cuda":
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu "
                                     f"matching the CUDA version; available: {ort.get_available_providers()})")
        options = {"device_id": str(self.device.id), "use_tf32": "1" if self.tf32 else "0"}
        if self.cuda_graph:
            options["enable_cuda_graph"] = "1"
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]

    def __call__(self):
        ort = import_onnxruntime()
        pool, values = self._shared_values()
        if not values:
            return self._open(ort, {})
        try:
            session = self._open(ort, values)
        except BackendUnavailable:  # no kernel, capture refused, no CUDA: not the pool's doing
            raise
        except ExportError as exc:
            session = self._open(ort, {})  # an error here is the graph's own
            if not pool.refused:
                pool.refused = True
                log.warning("%s: ONNX Runtime refused the shared weights (%s); its sessions load their own "
                            "copy", self.path.name, exc)
            return session
        session._armt_weight_pool = pool  # the pool (device copy, map) lives as long as its last session
        return session

    def _shared_values(self) -> tuple:
        """(pool, {initializer name: OrtValue}) for this graph, or (None, {}) when off or not possible."""
        from runtimes.shared_weights import pool_for, sharing_enabled
        if not sharing_enabled(self.shared_weights):
            return None, {}
        key = (str(self.path.resolve().parent), str(self.device))
        try:
            ort = import_onnxruntime()
            pool = pool_for(self.path, self.device)
            probe = [(p[0], {k: v for k, v in p[1].items() if k != "enable_cuda_graph"}) if isinstance(p, tuple) else p
                     for p in self.providers(ort)]  # the probe runs plainly (no IO binding to capture)
            if not pool.check_used(ort, probe):
                if key not in _POOL_FAILED:
                    _POOL_FAILED.add(key)
                    log.warning("%s: ONNX Runtime on %s does not compute with caller-owned initializers made "
                                "as the pool makes them; each session loads its own copy", self.path.name, self.device)
                return None, {}
            return pool, pool.initializers_for(self.path)
        except BackendUnavailable:
            raise
        except Exception as exc:  # an unreadable graph or map, a device copy that failed: the session's own copy
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            if isinstance(exc, (OSError, ValueError)) or type(exc).__name__ == "DecodeError":
                # a missing, truncated or corrupt file: the session's own load reports it (one line)
                log.info("%s: no shared weights (%s)", self.path.name, why)
            elif key not in _POOL_FAILED:
                _POOL_FAILED.add(key)
                log.warning("%s: no shared weights (%s); each session loads its own copy", self.path.name, why)
            return None, {}

    def _open(self, ort, initializers: dict):
        """The session, with `initializers` (name -> OrtValue) as caller-owned initializers."""
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        if self.device.type == "cpu":
            options.add_session_config_entry("session.disable_prepacking", "1")
        for name, value in (self.fixed_dims or {}).items():
            options.add_free_dimension_override_by_name(name, int(value))
        try:
            for name, value in initializers.items():
                options.add_initializer(name, value)
            session = ort.InferenceSession(str(self.path), sess_options=options, providers=self.providers(ort))
        except BackendUnavailable:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            if self.cuda_graph and capture_refused(exc):
                raise CaptureRefused(str(exc).splitlines()[0][:300] if str(exc) else exc.__class__.__name__) from None
            raise_if_not_runnable(exc, f"{self.path.name} on {self.device.type}")
            first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise ExportError(f"onnxruntime cannot load {self.path}: {first}") from None
        if self.device.type == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendUnavailable(f"onnxruntime did not enable CUDA for {self.path.name} "
                                     f"(providers: {session.get_providers()})")
        return session


@dataclass
class EngineBytesLoader:
    """A serialized TensorRT engine from a file."""

    path: Path

    def __call__(self) -> bytes:
        try:
            return Path(self.path).read_bytes()
        except OSError as exc:
            raise ExportError(f"cannot read engine {self.path}: {exc.strerror}") from None
