"""`armt export`: an ArmtModel -> an export directory (graphs, shared weights, samples, manifest).

    model (cast to the precision)
      |-- samples.plans: fresh inputs of every call of a 3-segment, 2-row run (one row padded)
      |-- trace.export_graph (per role) -> fix I/O names/dims, portability check,
      |                                    weights -> weights.data (shared), onnx.checker
      |-- [validate] validate_graph: each plan on ONNX Runtime CPU and the torch cell, per output
      |-- sample_feeds.npz (one call per graph, from the torch run), polygraphy_data_loader.py
      '-- manifest.json (checksums of everything)      all inside graphs.atomic.atomic_directory

A failure anywhere (trace, portability, parity) leaves EXPORT_DIR as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import torch

from graphs.atomic import atomic_directory
from graphs.errors import ExportError, ParityFailure
from graphs.model import ArmtModel

import exporter
from exporter import samples as sampling
from exporter.manifest import (GRAPH_FILES, POLYGRAPHY_SCRIPT, PRECISIONS, ROLES, SAMPLE_FEEDS, GraphRecord,
                               Manifest, TensorSpec, record_files, write_manifest)
from exporter.polygraphy_loader import write_script
from exporter.portability import check_portable, op_counts
from exporter.specs import graph_io, model_dims
from exporter.trace import DEFAULT_OPSET, check_opset, trace_graph
from exporter.validate import GraphValidation, validate_graph
from exporter.weights import SharedWeights

log = logging.getLogger("armt.export")

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ONNX_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
              "bfloat16": onnx.TensorProto.BFLOAT16, "int64": onnx.TensorProto.INT64,
              "int32": onnx.TensorProto.INT32, "bool": onnx.TensorProto.BOOL}


@dataclass
class ExportResult:
    export_dir: Path
    manifest: Manifest
    validation: dict[str, GraphValidation] = field(default_factory=dict)
    seconds: float = 0.0


def fix_io(model: onnx.ModelProto, role: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
           mem_tokens: int) -> None:
    """Give the graph's inputs/outputs exactly the contract's names, dtypes and named dims;
    rename torch's derived dim "width + M" to "slot" inside the graph too."""
    for got, specs, what in ((model.graph.input, inputs, "inputs"), (model.graph.output, outputs, "outputs")):
        names = [v.name for v in got]
        if names != [s.name for s in specs]:
            raise ExportError(f"{role} graph {what} are {names}, the contract says {[s.name for s in specs]}")
        for value, spec in zip(got, specs):
            tt = value.type.tensor_type
            if tt.elem_type != ONNX_TYPES[spec.dtype]:
                raise ExportError(f"{role} graph {spec.name} has ONNX type {onnx.TensorProto.DataType.Name(tt.elem_type)}, "
                                  f"the contract says {spec.dtype}")
            if len(tt.shape.dim) != len(spec.shape):
                raise ExportError(f"{role} graph {spec.name} has rank {len(tt.shape.dim)}, the contract says {len(spec.shape)}")
            for dim, want in zip(tt.shape.dim, spec.shape):
                if isinstance(want, str):
                    dim.Clear()
                    dim.dim_param = want
                elif dim.HasField("dim_value") and dim.dim_value != want:
                    raise ExportError(f"{role} graph {spec.name} has a fixed size {dim.dim_value} where the "
                                      f"contract says {want}")
                else:
                    dim.Clear()
                    dim.dim_value = want
    slot_name = f"width + {mem_tokens}"
    for value in model.graph.value_info:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == slot_name:
                dim.dim_param = "slot"


def _versions(validated: bool) -> dict[str, str]:
    import onnxscript
    v = {"exporter": exporter.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
         "onnxscript": onnxscript.__version__}
    if validated:
        import onnxruntime
        v["onnxruntime"] = onnxruntime.__version__
    return v


def export_model(model: ArmtModel, export_dir: str | Path, precision: str = "fp32", opset: int = DEFAULT_OPSET,
                 validate: bool = True, overwrite: bool = False, sample_width: int | None = None,
                 source: str = "", report: Callable[[str], None] | None = None,
                 free_model: bool = False) -> ExportResult:
    """Export `model` (fp32 as loaded; cast here, in place, to `precision`) into `export_dir`.

    `report` receives the validation tables (the CLI prints them). `free_model`: drop the model's
    weights once traced (lower peak memory; the model is unusable afterwards). Raises ParityFailure
    when an output misses its bound (nothing is written then), ExportError for export problems."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    check_opset(opset)
    t_start = time.perf_counter()
    cfg = model.cfg
    model_id = model.model_id()  # of the weights as given (state files carry it)
    model.cast(TORCH_DTYPES[precision]).eval()
    width = sample_width or sampling.sample_width(cfg)
    export_dir = Path(export_dir)

    with atomic_directory(export_dir, overwrite=overwrite) as stage:
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes it private; an export is a normal directory
        plans = sampling.plans(model, width, ROLES)

        shared = SharedWeights(stage)
        graphs: dict[str, GraphRecord] = {}
        for role in ROLES:
            inputs, outputs = graph_io(cfg, role, precision)
            path = stage / GRAPH_FILES[role]
            traced = trace_graph(model, role, precision, opset)

            def edit(proto: onnx.ModelProto, role=role, inputs=inputs, outputs=outputs) -> None:
                fix_io(proto, role, inputs, outputs, cfg.armt.num_mem_tokens)
                check_portable(proto, role)

            proto = shared.adopt_ir(traced, path, edit)
            del traced
            try:
                onnx.checker.check_model(str(path), full_check=True)
            except onnx.checker.ValidationError as exc:
                raise ExportError(f"{role} graph fails the ONNX checker: {str(exc).splitlines()[0]}") from None
            graphs[role] = GraphRecord(role=role, file=GRAPH_FILES[role], data_files=(shared.name,), inputs=inputs,
                                       outputs=outputs, precision=precision, opset=opset, op_counts=op_counts(proto))
            del proto
            log.info("wrote %s (%d nodes); %s is %.1f MB", GRAPH_FILES[role], sum(graphs[role].op_counts.values()),
                     shared.name, shared.size / 1e6)

        results: dict[str, GraphValidation] = {}
        samples: dict[str, sampling.Call] = {}
        if validate:
            for role in ROLES:
                log.info("validating %s on ONNX Runtime CPU against the torch cell (%d calls) ...", role,
                         len(plans[role].fresh))
                results[role], call = validate_graph(stage / GRAPH_FILES[role], plans[role], model, precision)
                if call is not None:
                    samples[role] = call
                if report:
                    report(results[role].table())
        missing = {role: plan for role, plan in plans.items() if role not in samples}
        if missing:
            samples.update(_sample_calls(model, missing, precision, free_model))
        if free_model:
            _free(model)
        sampling.save_samples(stage / SAMPLE_FEEDS, samples)
        del samples
        write_script(stage / POLYGRAPHY_SCRIPT, {r: {t.name: t.dtype for t in g.inputs} for r, g in graphs.items()})
        validation = _validation_summary(validate, results)
        failed = [f"{r.role}.{c.name}: {_miss(c)}" for r in results.values() for c in r.rows if not c.ok]
        if failed:
            raise ParityFailure(f"export validation failed ({'; '.join(failed)}); nothing was written")

        names = [g.file for g in graphs.values()] + [shared.name, SAMPLE_FEEDS, POLYGRAPHY_SCRIPT]
        log.info("checksumming %d files ...", len(names))
        manifest = Manifest(precision=precision, opset=opset,
                            model={"config": cfg.base.hf_config, "armt_config": cfg.armt.to_dict(),
                                   "model_id": model_id, "fingerprint": cfg.fingerprint(), "source": source},
                            dims=model_dims(cfg), graphs=graphs, files=record_files(stage, names),
                            versions=_versions(bool(results)), validation=validation)
        write_manifest(stage, manifest)
    manifest.root = export_dir
    seconds = time.perf_counter() - t_start
    log.info("export written to %s in %.1f s", export_dir, seconds)
    return ExportResult(export_dir, manifest, results, seconds)


def _sample_calls(model: ArmtModel, plans: dict, precision: str, consume: bool) -> dict[str, sampling.Call]:
    """The sample call of each plan from a torch run (when validation did not provide them). Only the
    sample call is kept. fp16 on CPU: torch's fp16 matmul is ~500x slower than bf16 there, so a model
    we may consume runs the plan in bf16 (same weights, realistic state), its hidden cast to fp16."""
    t0 = time.perf_counter()
    run_dtype = model.dtype
    if precision == "fp16" and consume and model.device.type == "cpu":
        model.cast(torch.bfloat16)
        run_dtype = torch.bfloat16
    log.info("sample run on the torch cells (%s) ...", str(run_dtype).replace("torch.", ""))
    out = {}
    for role, plan in plans.items():
        if run_dtype != TORCH_DTYPES[precision]:
            plan = dataclasses.replace(plan, initial={k: v.to(run_dtype) if v.is_floating_point() and v.dtype != torch.float32
                                                      else v for k, v in plan.initial.items()})
        chain = sampling.run_torch(model, plan, stop=plan.sample_index + 1, keep={plan.sample_index})
        call = chain.calls[plan.sample_index]
        feeds = {k: v.to(TORCH_DTYPES[precision]) if v.is_floating_point() and v.dtype != torch.float32 else v
                 for k, v in call.feeds.items()}
        out[role] = sampling.Call(feeds, {})
    log.info("sample runs done in %.1f s", time.perf_counter() - t0)
    return out


def _miss(c) -> str:
    if c.rel > c.bound.rel:
        return f"rel {c.rel:.2e} > {c.bound.rel:.2g}"
    if c.q_rel > c.bound.q_rel:
        return f"q99.9 {c.q_rel:.2e} > {c.bound.q_rel:.2g}"
    return c.note


def _free(model: ArmtModel) -> None:
    """Drop the weights' memory (the graphs hold their own copy now)."""
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _validation_summary(validate: bool, results: dict[str, GraphValidation]) -> dict:
    if not validate:
        return {"status": "not run", "reason": "--no-validate", "graphs": {}}
    statuses = {r.status for r in results.values()}
    status = "failed" if "failed" in statuses else "not run" if "not run" in statuses else "passed"
    return {"status": status, "backend": "onnxruntime CPU", "reference": "torch cells at the export precision",
            "graphs": {role: r.to_dict() for role, r in results.items()}}
