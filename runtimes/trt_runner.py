"""The TensorRT runner: one engine from the export directory, the mirror of the ONNX Runtime CUDA runner.

Same buffers (runtimes/buffers.py: runner-owned, ping-pong for outputs fed back as inputs), same
stream discipline (one torch CUDA stream; the loop's own torch work runs in `runner.stream()`).
Per call: pick the optimization profile that holds the input shapes, `set_input_shape` for every
input, `set_tensor_address` for every input and output, `execute_async_v3` on the stream. Where a
call's shapes and addresses repeat (every diagonal step after the first two has the same ones), the
call is captured once as a CUDA graph and replayed.

Engines come from `armt build` (manifest: graph -> engines, each with its builder `tensorrt` or
`tensorrt_rtx`); the runner imports whichever of the two modules the engine needs and is installed.

Limits: an engine executes only on a GPU its builder supports. TensorRT-RTX 1.7 engines do not run on
compute capability 9.0 (H100); no machine of this project can execute a TensorRT engine, so this
runner is exercised by tests marked `gpu`/`trt` that run where a supported GPU exists.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch

from exporter.manifest import EngineRecord, Manifest, TensorSpec
from graphs.errors import BackendUnavailable, ExportError, InputError
from runtimes.buffers import BufferSet
from runtimes.ort_runner import ExportRunner
from runtimes.torch_runner import check_device

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
    raise BackendUnavailable(f"graph {role} has engines built by {', '.join(builders)}, and none of those "
                             "modules is installed here")


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


class TrtRunner(ExportRunner):
    backend = "trt"

    def __init__(self, export: str | Path | Manifest, role: str, device: str = "cuda",
                 precision: str | None = None, verify_checksums: bool = True, cuda_graphs: bool = True):
        if torch.device(device).type != "cuda":
            raise InputError("the trt backend runs TensorRT engines on a CUDA GPU: use --device cuda")
        super().__init__(export, role, device, precision, verify_checksums)
        self.cuda_graphs = cuda_graphs
        self.engine_record = select_engine(self.graph.engines, role)
        self._runtime = self._engine = self._context = self._stream = self._buffers = None
        self._profiles: list[dict] = []
        self._seen: set = set()  # call keys run once: the second time they are captured
        self._graphs: dict = {}  # call key -> torch.cuda.CUDAGraph (None: not capturable)

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self.graph.inputs

    @property
    def output_specs(self) -> tuple[TensorSpec, ...]:
        return self.graph.outputs

    # ---------------------------------------------------------------- engine
    def _activate(self) -> None:
        trt = import_tensorrt(self.engine_record.builder)
        if not torch.cuda.is_available():
            rec = self.engine_record
            raise BackendUnavailable(f"TensorRT engines execute on a CUDA GPU and none is visible here "
                                     f"({rec.file} needs a GPU {rec.builder} supports)")
        self.device = check_device(str(self.device))
        path = self.manifest.path(self.engine_record.file)
        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        with torch.cuda.device(self.device):
            try:
                engine = runtime.deserialize_cuda_engine(path.read_bytes())
            except Exception as exc:  # TensorRT raises plain RuntimeError/TypeError
                engine, reason = None, str(exc).splitlines()[0]
            else:
                reason = "deserialize_cuda_engine returned None"
            if engine is None:
                cc = ".".join(map(str, torch.cuda.get_device_capability(self.device)))
                targets = list(self.engine_record.compute_capability) or "builder default"
                raise BackendUnavailable(f"{self.engine_record.builder} cannot load {path.name} on this GPU "
                                         f"(compute capability {cc}; engine targets {targets}): {reason}")
            context = engine.create_execution_context()
        if context is None:
            raise BackendUnavailable(f"TensorRT could not create an execution context for {path.name}")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        want = sorted(s.name for s in (*self.graph.inputs, *self.graph.outputs))
        if sorted(names) != want:
            raise ExportError(f"engine {path.name} has tensors {sorted(names)}, the {self.role} graph has {want}")
        self._runtime, self._engine, self._context = runtime, engine, context  # the runtime outlives the engine
        self._stream = torch.cuda.Stream(device=self.device)
        self._profiles = [{s.name: tuple(tuple(x) for x in engine.get_tensor_profile_shape(s.name, p))
                           for s in self.graph.inputs}
                          for p in range(engine.num_optimization_profiles)]
        self._buffers = BufferSet(self.graph.inputs, self.graph.outputs, self.device)

    def _deactivate(self) -> None:
        self.synchronize()
        self._graphs.clear()
        self._seen.clear()
        self._context = self._engine = self._runtime = self._buffers = self._stream = None

    # ---------------------------------------------------------------- one call
    def _infer(self, feeds: Mapping[str, torch.Tensor], dims: dict[str, int]) -> dict[str, torch.Tensor]:
        ctx = self._context
        self._wait_for_caller()
        with self.stream():
            inputs = self._buffers.bind_inputs(feeds)
            outputs = self._buffers.bind_outputs(dims, inputs)
        shapes = {n: tuple(t.shape) for n, t in inputs.items()}
        profile = pick_profile(self._profiles, shapes)
        if ctx.active_optimization_profile != profile:
            ctx.set_optimization_profile_async(profile, self._handle())
        for name, t in inputs.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise InputError(f"TensorRT refused shape {tuple(t.shape)} for input {name}")
            ctx.set_tensor_address(name, t.data_ptr())
        for name, t in outputs.items():
            got = tuple(ctx.get_tensor_shape(name))
            if got != tuple(t.shape):
                raise ExportError(f"engine output {name} has shape {got}, the graph contract says {tuple(t.shape)}")
            ctx.set_tensor_address(name, t.data_ptr())
        key = (profile, tuple(sorted((n, shapes[n], t.data_ptr()) for n, t in inputs.items())),
               tuple(sorted((n, t.data_ptr()) for n, t in outputs.items())))
        self._execute(key)
        return outputs

    def _execute(self, key) -> None:
        """execute_async_v3; a call whose key (profile, shapes, addresses) was seen before is captured
        once as a CUDA graph and replayed from then on."""
        ctx = self._context
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        if self.cuda_graphs and key in self._seen and key not in self._graphs:
            graph = self._capture()
            self._graphs[key] = graph
            if graph is not None:
                graph.replay()
                return
        self._seen.add(key)
        if not ctx.execute_async_v3(self._handle()):
            raise ExportError(f"TensorRT failed to execute engine {self.engine_record.file}")

    def _handle(self) -> int:
        """The CUDA stream handle TensorRT enqueues on (0 only in CPU-side unit tests with a fake context)."""
        return self._stream.cuda_stream if self._stream is not None else 0

    def _capture(self):
        ctx, stream = self._context, self._stream
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                ok = ctx.execute_async_v3(stream.cuda_stream)
            if not ok:
                raise RuntimeError("execute_async_v3 returned False during capture")
        except Exception as exc:  # not capturable (e.g. an engine with data-dependent shapes): run plainly
            log.debug("CUDA graph capture failed for %s: %s", self.name, exc)
            return None
        return graph
