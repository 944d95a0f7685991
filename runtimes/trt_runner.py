"""The TensorRT runner: one engine from the export directory, the mirror of the ONNX Runtime runner.

No torch: device memory, copies and the stream come from Polygraphy's CUDA wrapper (polygraphy.cuda,
ctypes over libcudart; installed with the [trt] extra), CUDA-graph capture from the same library.
Same buffers as the ORT runner (runtimes/buffers.py: runner-owned, per shape, ping-pong for outputs
fed back as inputs). Per call: pick the optimization profile that holds the input shapes,
`set_input_shape` for every input, `set_tensor_address` for every input and output,
`execute_async_v3` on the runner's stream, then synchronize the stream (a staging buffer is never
rewritten while a call still reads it). CUDA graphs (`cuda_graph`, default on): the call key of
runtimes/cuda_graphs.py (profile, shapes and addresses of every bound buffer; the ONNX Runtime
runner's ids) runs plainly the first time, is captured on its second call (`execute_async_v3` inside
cudaStreamBeginCapture .. EndCapture, relaxed mode) and replayed with cudaGraphLaunch from then on;
a capture that fails turns graphs off for the runner with one warning (plain `execute_async_v3`).

Graph variants: where the export holds the role's causal variant with an engine this host can load,
both engines are deserialized (one execution context each, same buffers) and each call runs the one
Runner.pick_variant names (causal on full slots); the variant is part of the call key.

Engines come from `armt build` (manifest: graph -> engines, each with its builder `tensorrt` or
`tensorrt_rtx`); the runner imports whichever of the two modules the engine needs and is installed.

Limits: an engine executes only on a GPU its builder supports. TensorRT-RTX 1.7 engines do not run on
compute capability 9.0 (H100, H200); no machine of this project can execute a TensorRT engine, so the
device path here is exercised by tests marked `gpu`/`trt` that run where a supported GPU exists; the
call orchestration is tested on the CPU with a stand-in execution context and host storage.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from exporter.manifest import EngineRecord, Manifest
from graphs.contracts import CAUSAL, CAUSAL_OF, contract as contract_of
from graphs.errors import BackendUnavailable, ExportError, InputError
from runtimes.base import Runner, parse_device
from runtimes.buffers import Buffer, BufferSet, HostStorage
from runtimes.cuda_graphs import SKIP, GraphIds, call_key, resolve_cuda_graph
from runtimes.loaders import EngineBytesLoader, open_export

log = logging.getLogger("armt.trt")

TRT_MODULES = ("tensorrt", "tensorrt_rtx")


def import_tensorrt(module: str):
    """Import `tensorrt` or `tensorrt_rtx`, or raise BackendUnavailable."""
    if module not in TRT_MODULES:
        raise ExportError(f"unknown TensorRT builder {module!r} (expected one of {TRT_MODULES})")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = "pip install 'armt-deploy[trt]'" if module == "tensorrt_rtx" else "install TensorRT"
        raise BackendUnavailable(f"the engine was built by {module}, which is not importable here ({exc}); "
                                 f"{hint}") from None


def select_engine(engines: Sequence[EngineRecord], role: str, importable=None) -> EngineRecord:
    """The first engine whose builder module imports here (`importable(module) -> bool`)."""
    if not engines:
        raise ExportError(f"the export has no TensorRT engine for graph {role}: run `armt build EXPORT_DIR`")
    importable = importable or _importable
    for engine in engines:
        if importable(engine.builder):
            return engine
    builders = sorted({e.builder for e in engines})
    hint = "pip install 'armt-deploy[trt]'" if "tensorrt_rtx" in builders else "install TensorRT"
    raise BackendUnavailable(f"graph {role} has engines built by {', '.join(builders)}, and none of those "
                             f"modules is installed here ({hint})")


def _importable(module: str) -> bool:
    try:
        import_tensorrt(module)
        return True
    except (BackendUnavailable, ExportError):
        return False


def pick_profile(profiles: Sequence[Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]],
                 shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Index of the first optimization profile whose (min, opt, max) ranges hold every input shape."""
    for index, ranges in enumerate(profiles):
        if all(name not in ranges or _within(shape, ranges[name]) for name, shape in shapes.items()):
            return index
    described = "; ".join(f"{n}: {tuple(s)}" for n, s in shapes.items() if any(n in p for p in profiles))
    raise InputError(f"input shapes ({described}) lie outside every optimization profile of the engine "
                     "(rebuild it with `armt build` for these batch sizes and lengths)")


def _within(shape: tuple[int, ...], rng) -> bool:
    lo, _, hi = rng
    return len(shape) == len(lo) and all(a <= s <= b for s, a, b in zip(shape, lo, hi))


def _cuda():
    try:
        from polygraphy import cuda
    except ImportError as exc:
        raise BackendUnavailable(f"the trt backend needs polygraphy's CUDA wrapper ({exc}); "
                                 "pip install 'armt-deploy[trt]'") from None
    return cuda


def cuda_device_count() -> int:
    """GPUs the CUDA runtime sees (0 without libcudart or a driver)."""
    try:
        lib = _cuda().wrapper()
        count = ctypes.c_int(0)
        return count.value if lib.handle.cudaGetDeviceCount(ctypes.byref(count)) == 0 else 0
    except Exception:  # noqa: BLE001 - no CUDA runtime library, no driver: no GPU
        return 0


class CudaStorage:
    """Raw device memory through polygraphy.cuda (the Storage of runtimes/buffers.py); copies on `stream`."""

    def __init__(self, stream_ptr: int):
        self.cuda = _cuda()
        self.lib = self.cuda.wrapper()
        self.stream = stream_ptr
        self.blocks: list[int] = []

    def alloc(self, nbytes: int) -> tuple[int, int]:
        ptr = self.lib.malloc(max(nbytes, 1))
        self.blocks.append(ptr)
        return ptr, max(nbytes, 1)

    def ptr(self, block) -> int:
        return block[0]

    def write(self, block, data: np.ndarray) -> None:
        self.lib.memcpy(block[0], data.ctypes.data, data.nbytes, self.cuda.MemcpyKind.HostToDevice, self.stream)

    def read(self, block) -> np.ndarray:
        host = np.empty(block[1], dtype=np.uint8)
        self.lib.memcpy(host.ctypes.data, block[0], block[1], self.cuda.MemcpyKind.DeviceToHost, self.stream)
        self.lib.stream_synchronize(self.stream)
        return host

    def free(self) -> None:
        for ptr in self.blocks:
            self.lib.free(ptr)
        self.blocks.clear()


class CudaGraph:
    """One captured stream's work (cudaStreamBeginCapture .. cudaGraphInstantiate), replayed by launch()."""

    def __init__(self, lib, stream: int, work):
        self.h, self.stream = lib.handle, stream
        self.graph, self.exec = ctypes.c_void_p(), ctypes.c_void_p()
        check = lib.check
        check(self.h.cudaStreamBeginCapture(ctypes.c_void_p(stream), ctypes.c_int(2)))  # relaxed mode
        ok = False
        try:
            ok = work()
        finally:
            check(self.h.cudaStreamEndCapture(ctypes.c_void_p(stream), ctypes.byref(self.graph)))
        if not ok:
            raise RuntimeError("execute_async_v3 returned False during capture")
        check(self.h.cudaGraphInstantiate(ctypes.byref(self.exec), self.graph, ctypes.c_ulonglong(0)))

    def launch(self) -> None:
        if self.h.cudaGraphLaunch(self.exec, ctypes.c_void_p(self.stream)) != 0:
            raise ExportError("cudaGraphLaunch failed for a captured TensorRT call")


class TrtRunner(Runner):
    backend = "trt"
    _causal: tuple | None = None  # (engine, context, profiles, runtime) of the causal variant, once active

    def __init__(self, export: str | Path | Manifest, role: str, device: str = "cuda",
                 precision: str | None = None, verify_checksums: bool = True, cuda_graph: bool | None = None,
                 causal: bool = True):
        """`cuda_graph`: capture repeated calls as CUDA graphs and replay them (default on). `causal`:
        run the causal variant's engine (`<role>_causal`, where the export has one with an engine
        this host can load) on calls whose active slots are full; False: always the masked engine."""
        if parse_device(device).type != "cuda":
            raise InputError("the trt backend runs TensorRT engines on a CUDA GPU: use --device cuda")
        self.manifest = open_export(export, precision, verify_checksums)
        graph = self.manifest.graph(role)
        c = contract_of(self.manifest.model_config(), role, self.manifest.precision)
        c.check_io(graph.inputs, graph.outputs, f"export {self.manifest.root}")
        super().__init__(c, device, self.manifest.model_id)
        self._cuda_graph_option = resolve_cuda_graph(cuda_graph, "cuda")
        self.graphs = GraphIds(enabled=self._cuda_graph_option)
        self.engine_record = select_engine(graph.engines, role)
        self.loader = EngineBytesLoader(self.manifest.path(self.engine_record.file))
        self._causal_option = causal
        self.causal_record = self._causal_engine(role) if causal else None
        self.has_causal = self.causal_record is not None
        self._runtime = self._engine = self._context = self._stream = self._buffers = self._storage = None
        self._profiles: list[dict] = []
        self._causal = None
        self._graphs: dict[int, CudaGraph] = {}  # graph id -> captured call

    def _causal_engine(self, role: str) -> EngineRecord | None:
        """The causal variant's engine record, or None (no causal graph, no engine of it, none loadable here)."""
        twin = CAUSAL_OF.get(role)
        if twin not in self.manifest.graphs:
            return None
        g = self.manifest.graph(twin)
        self.contract.check_io(g.inputs, g.outputs, f"export {self.manifest.root} ({twin})")
        try:
            return select_engine(g.engines, twin)
        except (ExportError, BackendUnavailable) as exc:
            log.info("%s: every call runs the masked engine (%s)", role, exc)
            return None

    def companion(self, role: str) -> "TrtRunner":
        """The export's `role` engine on the same GPU (the lm_head engine when logits are asked for)."""
        return TrtRunner(self.manifest, role, device=str(self.device), cuda_graph=self._cuda_graph_option,
                         causal=self._causal_option)

    # ---------------------------------------------------------------- engine
    def _activate(self) -> None:
        trt = import_tensorrt(self.engine_record.builder)
        cuda = _cuda()
        rec = self.engine_record
        if cuda_device_count() <= self.device.id:
            raise BackendUnavailable(f"TensorRT engines execute on a CUDA GPU and none is visible here "
                                     f"({rec.file} needs a GPU {rec.builder} supports)")
        lib = cuda.wrapper()
        lib.check(lib.handle.cudaSetDevice(ctypes.c_int(self.device.id)))
        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        engine, context, profiles = self._load(runtime, rec, self.loader)
        self._runtime, self._engine, self._context = runtime, engine, context  # the runtime outlives the engine
        self._profiles = profiles
        if self.causal_record is not None:  # built by the same builder module or another importable one
            crt = runtime if self.causal_record.builder == rec.builder else \
                import_tensorrt(self.causal_record.builder).Runtime(trt.Logger(trt.Logger.ERROR))
            self._causal = (*self._load(crt, self.causal_record,
                                        EngineBytesLoader(self.manifest.path(self.causal_record.file))), crt)
        self._stream = cuda.Stream()
        self._storage = CudaStorage(self._stream.ptr)
        self._buffers = BufferSet(self.contract, self._storage)

    def _load(self, runtime, rec: EngineRecord, loader: EngineBytesLoader) -> tuple[Any, Any, list[dict]]:
        """(engine, execution context, per-profile input ranges) of one engine file."""
        path = loader.path
        try:
            engine = runtime.deserialize_cuda_engine(loader())
        except Exception as exc:  # TensorRT raises plain RuntimeError/TypeError
            engine, reason = None, str(exc).splitlines()[0]
        else:
            reason = "deserialize_cuda_engine returned None"
        if engine is None:
            raise BackendUnavailable(f"{rec.builder} cannot load {path.name} on this GPU (engine targets "
                                     f"{list(rec.compute_capability) or 'builder default'}): {reason}")
        context = engine.create_execution_context()
        if context is None:
            raise BackendUnavailable(f"TensorRT could not create an execution context for {path.name}")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        want = sorted((*self.contract.input_names, *self.contract.output_names))
        if sorted(names) != want:
            raise ExportError(f"engine {path.name} has tensors {sorted(names)}, the {self.role} graph has {want}")
        profiles = [{s.name: tuple(tuple(x) for x in engine.get_tensor_profile_shape(s.name, p))
                     for s in self.contract.inputs}
                    for p in range(engine.num_optimization_profiles)]
        return engine, context, profiles

    def _deactivate(self) -> None:
        self.synchronize()
        self._graphs.clear()
        self.graphs.clear()
        if isinstance(self._storage, CudaStorage):
            self._storage.free()
        if self._stream is not None and hasattr(self._stream, "free"):
            self._stream.free()
        self._context = self._engine = self._runtime = self._buffers = self._stream = self._storage = None
        self._causal = None

    def use_host_storage(self) -> None:
        """Host buffers instead of device memory: for the CPU tests with a stand-in execution context."""
        self._storage = HostStorage()
        self._buffers = BufferSet(self.contract, self._storage)

    def owns(self, value: Any) -> bool:
        return self._buffers is not None and self._buffers.owns(value)

    def to_numpy(self, value: Buffer) -> np.ndarray:
        return self._buffers.read(value)

    def upload(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Buffer]:
        """Copy host arrays into this runner's staging buffers of those inputs and return the device
        handles (as OrtRunner.upload): fed to `infer` later (of this runner or another engine on the
        same GPU), they are bound as they are (a decoder's memory and KV cache)."""
        if self._buffers is None:
            raise ExportError(f"runner {self.name} is not active: call activate() first")
        bound = self._buffers.upload(feeds, self.role)
        self.synchronize()  # the host arrays may be freed when this returns
        return bound

    def synchronize(self) -> None:
        if self._stream is not None and hasattr(self._stream, "synchronize"):
            self._stream.synchronize()

    # ---------------------------------------------------------------- one call
    def _infer(self, feeds: Mapping[str, Any], dims: dict[str, int]) -> dict[str, Buffer]:
        variant = self.pick_variant(feeds if self._causal is not None else {})  # {}: masked
        ctx, profiles = (self._causal[1], self._causal[2]) if variant == CAUSAL else (self._context, self._profiles)
        inputs = self._buffers.bind_inputs(feeds)
        outputs = self._buffers.bind_outputs(dims, inputs)
        shapes = {n: b.shape for n, b in inputs.items()}
        profile = pick_profile(profiles, shapes)
        if ctx.active_optimization_profile != profile:
            ctx.set_optimization_profile_async(profile, self._handle())
        for name, buf in inputs.items():
            if not ctx.set_input_shape(name, buf.shape):
                raise InputError(f"TensorRT refused shape {buf.shape} for input {name}")
            ctx.set_tensor_address(name, buf.ptr)
        for name, buf in outputs.items():
            got = tuple(ctx.get_tensor_shape(name))
            if got != buf.shape:
                raise ExportError(f"engine output {name} has shape {got}, the graph contract says {buf.shape}")
            ctx.set_tensor_address(name, buf.ptr)
        key = call_key(inputs, outputs, profile, variant)
        self._execute(key, self.graphs.id_for(key), ctx)
        self.synchronize()
        return outputs

    @property
    def cuda_graph(self) -> bool:
        return self.graphs.enabled

    def _execute(self, key: tuple, gid: int, ctx) -> None:
        """execute_async_v3 the first time a call key is seen; its second call is captured as a CUDA
        graph, which is launched then and replayed from then on."""
        graph = self._graphs.get(gid) if gid != SKIP else None
        if graph is not None:
            graph.launch()
            return
        if gid != SKIP and self.graphs.runs(key) >= 2:
            graph = self._capture(ctx)
            if graph is not None:
                self._graphs[gid] = graph
                graph.launch()
                return
        if not ctx.execute_async_v3(self._handle()):
            rec = self.causal_record if ctx is not self._context else self.engine_record
            raise ExportError(f"TensorRT failed to execute engine {rec.file}")

    def _handle(self) -> int:
        """The CUDA stream handle TensorRT enqueues on (0 only in CPU-side unit tests with a fake context)."""
        return self._stream.ptr if self._stream is not None else 0

    def _capture(self, ctx) -> CudaGraph | None:
        try:
            return CudaGraph(self._storage.lib, self._handle(), lambda: ctx.execute_async_v3(self._handle()))
        except Exception as exc:  # not capturable (e.g. an engine with data-dependent shapes): run plainly
            if self.graphs.disable(f"capture failed: {exc}"):
                log.warning("%s: CUDA graphs off, every call runs plainly (capture failed: %s)", self.name, exc)
            return None
