"""`armt verify --per-graph`: each graph on its own, across backends, with Polygraphy's comparator.

    sample feeds (export dir: one realistic call per graph, non-zero memory state from a real run)
        -> Comparator.run([recorded torch reference, ONNX Runtime, TensorRT])
        -> Comparator.compare_accuracy(simple compare func: atol = bound x max|reference|, rtol = 0)

The reference is the torch cell's output for those feeds, recorded at export time in the same file
(exporter/samples.py), replayed by a tiny Polygraphy runner: this check needs no torch, so a
deployment host with only onnxruntime(-gpu) can run it. ONNX Runtime and TensorRT are Polygraphy's
own runners (OnnxrtRunner on the .onnx file, TrtRunner on the engine), so this check does not go
through runtimes/ort_runner.py or trt_runner.py at all.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict

import numpy as np

from exporter.bounds import bound_for, compare
from exporter.samples import load_samples
from graphs.contracts import contract
from graphs.dtypes import numpy_dtype
from graphs.errors import BackendUnavailable, ExportError
from runtimes.verify import Report, Row

log = logging.getLogger("armt.verify")


def load_sample_feeds(manifest) -> dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """role -> (feeds, recorded reference outputs) from the export's sample feeds."""
    if not manifest.samples:
        raise ExportError(f"export {manifest.root} has no sample feeds (export it again)")
    path = manifest.path(manifest.samples)
    out = {}
    for role in manifest.graphs:
        g = manifest.graph(role)
        try:
            feeds = load_samples(path, role, {t.name: t.dtype for t in g.inputs})
            ref = load_samples(path, role, reference=True)
        except (OSError, ValueError) as exc:
            raise ExportError(f"{path} is not a readable .npz ({exc})") from None
        if set(feeds) != {t.name for t in g.inputs}:
            raise ExportError(f"export {manifest.root}: sample feeds of graph {role} do not match its inputs")
        if set(ref) != {t.name for t in g.outputs}:
            raise ExportError(f"export {manifest.root}: sample feeds lack the reference outputs of graph {role} "
                              "(made by an older armt: export again)")
        out[role] = (feeds, ref)
    return out


def _polygraphy():
    try:
        from polygraphy import comparator as pc
        from polygraphy.backend.base import BaseRunner
    except ImportError as exc:
        raise BackendUnavailable(f"--per-graph needs polygraphy ({exc}); pip install polygraphy") from None
    return pc, BaseRunner


def _recorded_runner(BaseRunner, specs, outputs: dict[str, np.ndarray], name: str):
    """A Polygraphy runner that answers the sample feed with the outputs recorded for it."""

    class RecordedRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name)

        def activate_impl(self):
            pass

        def get_input_metadata_impl(self):
            from polygraphy.common import TensorMetadata
            meta = TensorMetadata()
            for spec in specs:
                meta.add(spec.name, numpy_dtype(spec.dtype), [None if isinstance(d, str) else d for d in spec.shape])
            return meta

        def infer_impl(self, feed_dict):
            self.inference_time = 0.0
            return OrderedDict((k, v) for k, v in outputs.items())

        def deactivate_impl(self):
            pass

    return RecordedRunner()


def _ort_runner(manifest, role, device):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    return OnnxrtRunner(SessionFromOnnx(str(manifest.graph_path(role)), providers=providers), name="ort")


def _trt_runner(manifest, role):
    from runtimes.trt_runner import cuda_device_count, select_engine
    engine = select_engine(manifest.graph(role).engines, role)
    if cuda_device_count() == 0:
        raise BackendUnavailable("TensorRT engines need a CUDA GPU; none is visible here")
    import polygraphy.config
    if engine.builder == "tensorrt_rtx":
        polygraphy.config.USE_TENSORRT_RTX = True  # read by polygraphy.backend.trt when it picks its module
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    return TrtRunner(EngineFromBytes(BytesFromPath(str(manifest.path(engine.file)))), name="trt")


def compare_graphs(manifest, backends: list[str], device: str = "cpu", bounds: dict | None = None) -> Report:
    """Each graph's outputs on its sample feed: every backend against the recorded torch reference
    (under the bounds table, or `bounds` {kind: Bound} where given: exporter.bounds.given_bounds)."""
    pc, BaseRunner = _polygraphy()
    Comparator = pc.Comparator
    simple = getattr(pc, "SimpleCompareFunc", None) or pc.CompareFunc.simple  # the class from Polygraphy 0.50 on
    samples = load_sample_feeds(manifest)
    report = Report(str(manifest.root), manifest.precision)
    cfg = manifest.model_config()
    for role in manifest.graphs:
        if role not in samples:
            raise ExportError(f"export {manifest.root}: sample feeds lack graph {role}")
        feeds, recorded = samples[role]
        c = contract(cfg, role, manifest.precision)
        ref = _recorded_runner(BaseRunner, c.inputs, recorded, "torch (recorded at export)")
        runners = [ref]
        for backend in backends:
            try:
                runners.append(_ort_runner(manifest, role, device) if backend == "ort" else _trt_runner(manifest, role))
            except BackendUnavailable as exc:
                report.rows.append(Row(backend, f"graph {role}", "samples", "*", status="not run", note=str(exc)))
        with _quiet_polygraphy():
            try:
                results = Comparator.run(runners, data_loader=[feeds])
            except Exception as exc:  # Polygraphy reports runner failures as its own exceptions
                text = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
                raise ExportError(f"polygraphy could not run graph {role}: {text}") from None
        ref_iter = results[0][1][0]
        def bound_of(name):
            kind = c.kind(name)
            return bounds[kind] if bounds and kind in bounds else bound_for(manifest.precision, kind)
        atol = {name: bound_of(name).atol + bound_of(name).rel * (
                    float(np.abs(ref_iter[name].astype(np.float64)).max()) if ref_iter[name].size else 0.0)
                for name in c.output_names}
        for name, iters in list(results)[1:]:
            with _quiet_polygraphy():
                verdict = Comparator.compare_accuracy(
                    _pair(results, 0, name), compare_func=simple(atol=atol, rtol=0.0, check_error_stat="max"))
            per_output = _verdicts(verdict)  # output -> Polygraphy passed it on every sample
            for out_name in c.output_names:
                cmp = compare(out_name, c.kind(out_name), manifest.precision, iters[0][out_name], ref_iter[out_name],
                              bounds=bounds)
                polygraphy_ok = per_output.get(out_name, False)
                ok = cmp.ok and polygraphy_ok
                report.rows.append(Row(name, f"graph {role}", "samples (1)", out_name, cmp, 0,
                                       "ok" if ok else "FAIL", "" if polygraphy_ok else "polygraphy: mismatch"))
    return report


def _verdicts(accuracy) -> dict[str, bool]:
    """Output name -> passed on every iteration, from Polygraphy's AccuracyResults (one compare func,
    one runner pair)."""
    out: dict[str, bool] = {}
    for result in accuracy:
        for iterations in result.values():
            for outputs in iterations:
                for name, passed in outputs.items():
                    out[name] = out.get(name, True) and bool(passed)
    return out


def _pair(results, ref_index: int, name: str):
    """RunResults holding the reference and one backend (Polygraphy compares consecutive runners)."""
    from polygraphy.comparator import RunResults
    pair = RunResults()
    for runner_name, iters in results:
        if runner_name in (results[ref_index][0], name):
            pair.append((runner_name, iters))
    return pair


@contextlib.contextmanager
def _quiet_polygraphy():
    from polygraphy.logger import G_LOGGER
    old = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.ERROR if not log.isEnabledFor(logging.DEBUG) else G_LOGGER.INFO
    try:
        yield
    finally:
        G_LOGGER.module_severity = old
