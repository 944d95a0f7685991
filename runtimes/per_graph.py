"""`armt verify --per-graph`: each graph on its own, across backends, with Polygraphy's comparator.

    sample feeds (export dir, realistic: non-zero memory state from a real run)
        -> Comparator.run([torch reference, ONNX Runtime, TensorRT])
        -> Comparator.compare_accuracy(simple compare func: atol = bound x max|reference|, rtol = 0)

The torch reference is this project's TorchRunner wrapped as a Polygraphy runner; ONNX Runtime and
TensorRT are Polygraphy's own runners (OnnxrtRunner on the .onnx file, TrtRunner on the engine), so
this check does not go through runtimes/ort_runner.py or trt_runner.py at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import OrderedDict

import numpy as np
import torch

from exporter.specs import tensor_kind
from graphs.errors import BackendUnavailable, ExportError
from graphs.model import ArmtModel
from exporter.bounds import bound_for, compare
from runtimes.graphio import ROLES, TORCH_DTYPES
from runtimes.torch_runner import TorchRunner
from runtimes.verify import Report, Row

log = logging.getLogger("armt.verify")



def load_sample_feeds(manifest) -> dict[str, list[dict[str, np.ndarray]]]:
    """role -> list of feed dicts from the export's sample feeds (.npz keys "<role>/<input>" or
    "<role>/<i>/<input>")."""
    if not manifest.samples:
        raise ExportError(f"export {manifest.root} has no sample feeds (export it again)")
    path = manifest.path(manifest.samples)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path} is not a readable .npz ({exc})") from None
    feeds: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for key, value in arrays.items():
        parts = key.split("/")
        if len(parts) == 2:
            role, index, name = parts[0], "0", parts[1]
        elif len(parts) == 3:
            role, index, name = parts
        else:
            raise ExportError(f"{path}: unexpected sample key {key!r}")
        feeds.setdefault(role, {}).setdefault(index, {})[name] = value
    out = {role: [by_index[i] for i in sorted(by_index, key=int)] for role, by_index in feeds.items()}
    for role, samples in out.items():
        if role not in manifest.graphs:
            continue
        for spec in manifest.graph(role).inputs:
            if spec.dtype == "bfloat16":  # numpy has no bfloat16: stored as float32 (exact), cast back
                import ml_dtypes
                for feed in samples:
                    feed[spec.name] = feed[spec.name].astype(ml_dtypes.bfloat16)
    return out


def _polygraphy_runner_class():
    try:
        from polygraphy.backend.base import BaseRunner
    except ImportError as exc:
        raise BackendUnavailable(f"--per-graph needs polygraphy ({exc}); pip install polygraphy") from None

    class ArmtPolygraphyRunner(BaseRunner):
        """A runtimes Runner seen as a Polygraphy runner (numpy in, numpy out)."""

        def __init__(self, runner, name):
            super().__init__(name=name)
            self.runner = runner

        def activate_impl(self):
            self.runner.activate()

        def get_input_metadata_impl(self):
            from polygraphy.common import TensorMetadata
            meta = TensorMetadata()
            for spec in self.runner.input_specs:
                meta.add(spec.name, TORCH_DTYPES[spec.dtype],
                         [None if isinstance(d, str) else d for d in spec.shape])
            return meta

        def infer_impl(self, feed_dict):
            feeds = {}
            for spec in self.runner.input_specs:
                value = np.asarray(feed_dict[spec.name])
                if value.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: torch cannot take it directly
                    value = value.astype(np.float32)
                feeds[spec.name] = torch.from_numpy(value.copy()).to(TORCH_DTYPES[spec.dtype])
            start = time.perf_counter()
            out = self.runner.infer(feeds)
            self.inference_time = time.perf_counter() - start
            return OrderedDict((k, v.detach().float().cpu().numpy() if v.dtype in (torch.float16, torch.bfloat16)
                                else v.detach().cpu().numpy()) for k, v in out.items())

        def deactivate_impl(self):
            self.runner.deactivate()

    return ArmtPolygraphyRunner


def _ort_runner(manifest, role, device):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    return OnnxrtRunner(SessionFromOnnx(str(manifest.graph_path(role)), providers=providers), name="ort")


def _trt_runner(manifest, role):
    from runtimes.trt_runner import select_engine
    engine = select_engine(manifest.graph(role).engines, role)
    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT engines need a CUDA GPU; none is visible here")
    if engine.builder == "tensorrt_rtx":
        os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1"  # read when polygraphy.backend.trt is first imported
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    return TrtRunner(EngineFromBytes(BytesFromPath(str(manifest.path(engine.file)))), name="trt")


def compare_graphs(manifest, model: ArmtModel, backends: list[str], device: str = "cpu") -> Report:
    """Each graph's outputs on the sample feeds: every backend against the torch reference."""
    try:
        from polygraphy import comparator as pc
        from polygraphy.comparator import Comparator
    except ImportError as exc:
        raise BackendUnavailable(f"--per-graph needs polygraphy ({exc}); pip install polygraphy") from None
    simple = getattr(pc, "SimpleCompareFunc", None) or pc.CompareFunc.simple  # the class from Polygraphy 0.50 on
    wrapper = _polygraphy_runner_class()
    samples = load_sample_feeds(manifest)
    report = Report(str(manifest.root), manifest.precision)
    for role in ROLES:
        if role not in samples:
            raise ExportError(f"export {manifest.root}: sample feeds lack graph {role}")
        feeds = samples[role]
        ref = wrapper(TorchRunner(model, role, device=device, precision=manifest.precision), name="torch")
        runners = [ref]
        for backend in backends:
            try:
                runners.append(_ort_runner(manifest, role, device) if backend == "ort" else _trt_runner(manifest, role))
            except BackendUnavailable as exc:
                report.rows.append(Row(backend, f"graph {role}", "samples", "*", status="not run", note=str(exc)))
        with _quiet_polygraphy():
            try:
                results = Comparator.run(runners, data_loader=feeds)
            except Exception as exc:  # Polygraphy reports runner failures as its own exceptions
                raise ExportError(f"polygraphy could not run graph {role}: {str(exc).splitlines()[0]}") from None
        ref_iters = results[0][1]
        atol = {name: bound_for(manifest.precision, tensor_kind(name)).rel * max(
                    float(np.abs(it[name].astype(np.float64)).max()) if it[name].size else 0.0 for it in ref_iters)
                for name in ref_iters[0].keys()}
        for name, iters in list(results)[1:]:
            with _quiet_polygraphy():
                verdict = Comparator.compare_accuracy(
                    _pair(results, 0, name), compare_func=simple(atol=atol, rtol=0.0, check_error_stat="max"))
            per_output = _verdicts(verdict)  # output -> Polygraphy passed it on every sample
            for out_name in ref_iters[0].keys():
                worst, worst_i = None, 0
                for i, (it, rit) in enumerate(zip(iters, ref_iters)):
                    c = compare(out_name, tensor_kind(out_name), manifest.precision, it[out_name], rit[out_name])
                    if worst is None or (not c.ok, c.rel) > (not worst.ok, worst.rel):
                        worst, worst_i = c, i
                polygraphy_ok = per_output.get(out_name, False)
                ok = worst.ok and polygraphy_ok
                report.rows.append(Row(name, f"graph {role}", f"samples ({len(feeds)})", out_name, worst, worst_i,
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
