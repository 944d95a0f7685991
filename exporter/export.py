"""`export_model`: an ArmtModel or RmtModel -> an export directory (graphs, shared weights, manifest).

    model (cast to the precision)
      |-- parallel_trace.traced_in_parallel: the roles that miss the trace cache traced by worker
      |                    processes and this one at once (`jobs`), taken by the loop below in its order
      |-- trace.trace_graph (per graph role of graphs/contracts.py) -> contract I/O names and dims,
      |                    portability check, provenance metadata (model id, config hashes, dims,
      |                    roles: exporter/provenance.py), weights -> weights.data (shared), onnx.checker
      |-- every model parameter indexed in weights.data (manifest "parameters": the torch reference
      |                    can be rebuilt from the export alone, exporter/reference.py)
      |-- finalize(stage, draft)      the caller's step before the manifest is written: runtimes/
      |                               validation.py writes sample feeds and validates on ONNX Runtime
      |-- polygraphy_data_loader.py (when samples exist)
      '-- manifest.json (checksums of everything)      all inside graphs.atomic.atomic_directory

A failure anywhere (trace, portability, the finalize step) leaves EXPORT_DIR as it was. This module
runs no graph: running and comparing is the runtimes' job, handed in as `finalize`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import onnx
import torch

from graphs.atomic import atomic_directory
from graphs.config import ModelConfig
from graphs.contracts import CAUSAL, CAUSAL_OF, MASKED_OF, all_roles_of, contract, decode_roles_of, model_dims, roles_of
from graphs.dtypes import PRECISIONS, compute_dtype, torch_dtype
from graphs.errors import ExportError
from graphs.model import ArmtModel

import exporter
from exporter.parallel_trace import requested_jobs, traced_in_parallel
from exporter.manifest import POLYGRAPHY_SCRIPT, GraphRecord, Manifest, TensorSpec, record_files, write_manifest
from exporter.polygraphy_loader import write_script
from exporter.portability import attention_variant, check_portable, op_counts
from exporter.provenance import graph_metadata
from exporter.trace import (causal_variants, check_opset, default_opset, drop_separate_view, fused_attention,
                            memory_math, projection_parts, trace_graph)
from graphs.progress import Progress
from exporter.weights import SharedWeights

log = logging.getLogger("armt.export")

ONNX_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
              "bfloat16": onnx.TensorProto.BFLOAT16, "int64": onnx.TensorProto.INT64,
              "int32": onnx.TensorProto.INT32, "bool": onnx.TensorProto.BOOL}


@dataclass
class Draft:
    """What the finalize step gets: the staged graphs and the model they were traced from."""

    stage: Path
    model: ArmtModel  # cast to the export precision
    precision: str
    model_id: str
    graphs: dict[str, GraphRecord]
    validation: dict[str, Any] = field(default_factory=dict)  # the finalize step fills this in
    samples: str | None = None  # and names the sample-feeds file it wrote
    versions: dict[str, str] = field(default_factory=dict)  # and adds the versions it used


@dataclass
class ExportResult:
    export_dir: Path
    manifest: Manifest
    validation: dict = field(default_factory=dict)  # role -> per-graph result object of the finalize step
    seconds: float = 0.0


def fix_io(model: onnx.ModelProto, role: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
           derived: dict[str, tuple[str, int]]) -> None:
    """Give the graph's inputs/outputs exactly the contract's names, dtypes and named dims;
    rename torch's derived dims ("width + M") to their contract names ("slot") inside the graph too."""
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
    renames = {f"{base} + {offset}": name for name, (base, offset) in derived.items()}
    for value in model.graph.value_info:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]


def _versions() -> dict[str, str]:
    import onnxscript
    return {"exporter": exporter.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__}


def export_roles(cfg: ModelConfig, decode: bool, only: Sequence[str] | None = None,
                 causal: bool = False) -> tuple[str, ...]:
    """The roles an export writes, in the contract's order: every role of the kind (+ the decode
    roles), or `only` those (ExportError naming any role this kind has not, or lm_head without a step
    graph: its sample feed is a step graph's output); `causal` (fp16/bf16 at opset 23): each written
    step role's causal variant too (without it a causal role is refused)."""
    allowed = tuple(r for r in all_roles_of(cfg) if causal or r not in MASKED_OF)
    roles = roles_of(cfg) + (decode_roles_of(cfg) if decode else ())
    if only is not None:
        unknown = sorted(set(only) - set(allowed))
        if unknown or not only:
            raise ExportError(f"cannot export only {', '.join(unknown) or 'no graphs'}: a {cfg.kind.upper()} "
                              f"export{' at this precision/opset' if not causal else ''} holds {', '.join(allowed)}")
        if "lm_head" in only and not set(only) & (set(roles_of(cfg)) - {"lm_head"}):
            raise ExportError("lm_head needs a step graph in the same export (its sample feed is a step graph's output)")
        roles = tuple(only)
    twins = {CAUSAL_OF[r] for r in roles if r in CAUSAL_OF} if causal else set()
    return tuple(r for r in allowed if r in set(roles) | twins)


def export_model(model: ArmtModel, export_dir: str | Path, precision: str = "fp32", opset: int | None = None,
                 overwrite: bool = False, source: str = "", finalize: Callable[[Draft], None] | None = None,
                 free_model: bool = False, tokenizer_dir: str | Path | None = None,
                 decode: bool = True, only: Sequence[str] | None = None,
                 trace_cache: bool | None = None, jobs: int | None = None) -> ExportResult:
    """Export `model` (fp32 as loaded; cast here, in place, to `precision`) into `export_dir`.

    `finalize(draft)` runs inside the staging directory after the graphs are written and before the
    manifest: it may write files there (draft.samples) and fill draft.validation; an exception from
    it leaves nothing written. `free_model`: drop the model's weights at the end (lower peak memory;
    the model is unusable afterwards). `tokenizer_dir`: a model directory whose tokenizer files
    (graphs/tokenizer.py) are copied into the export, listed in the manifest and checksummed. `decode` (default True): also export the
    generation graphs (decode roles); False (`armt export --no-decode`): the step graphs and lm_head only. `only`: export just these roles (a bench exports the graphs of
    the schedules it times: the sequential `segment` graph is the slow one to trace). `trace_cache`: reuse/store
    the translated graphs in the trace cache (exporter/trace_cache.py; None: on unless ARMT_TRACE_CACHE=0).
    `jobs`: processes that trace the graphs (exporter/parallel_trace.py; None: $ARMT_TRACE_JOBS if set,
    else min(usable CPUs, graphs that miss the trace cache, 4), sequential for models over its size
    limit; 1: this process alone);
    the files are the same byte for byte either way."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    opset = default_opset(precision) if opset is None else opset  # fp32 18, fp16/bf16 23 (fused attention)
    check_opset(opset, precision)
    jobs = requested_jobs(jobs)  # None: $ARMT_TRACE_JOBS or the default of exporter/parallel_trace.py
    fused = fused_attention(precision, opset)
    t_start = time.perf_counter()
    cfg = model.cfg
    model_id = model.model_id()  # of the weights as given (state files carry it)
    model.cast(torch_dtype(compute_dtype(precision))).eval()
    export_dir = Path(export_dir)

    dims = model_dims(cfg)
    roles = export_roles(cfg, decode, only, causal=causal_variants(precision, opset))  # fp16/bf16: + is_causal twins
    with atomic_directory(export_dir, overwrite=overwrite) as stage:  # file modes: graphs.atomic's policy
        shared = SharedWeights(stage)
        graphs: dict[str, GraphRecord] = {}
        with Progress(len(roles), "tracing graphs") as bar, \
                traced_in_parallel(model, roles, precision, opset, trace_cache, jobs, bar.describe,
                                   scratch=stage / ".traces", trace=trace_graph) as ready:
            for role in roles:  # ARMT: segment, diagonal_step, lm_head (+ *_causal) (+ decode, memory_write); RMT: rmt_segment, lm_head (+ rmt_segment_causal) (+ rmt_decode, rmt_memory_write)
                bar.describe(role)
                c = contract(cfg, role, precision)
                path = stage / c.file
                traced = ready.take(role)  # traced before the loop, by a worker or here (None: not yet)
                if traced is None:
                    traced = trace_graph(model, role, precision, opset, cache=trace_cache)

                def edit(proto: onnx.ModelProto, c=c) -> None:
                    fix_io(proto, c.role, c.inputs, c.outputs, dict(c.derived_dims))
                    check_portable(proto, c.role, fused)
                    onnx.helper.set_model_props(proto, graph_metadata(  # what the manifest is checked against
                        model_id, cfg.base.hf_config, cfg.armt.to_dict(), dims, precision, c.role, roles))

                proto = shared.adopt_ir(traced, path, edit)
                del traced
                try:
                    onnx.checker.check_model(str(path), full_check=True)
                except onnx.checker.ValidationError as exc:
                    raise ExportError(f"{role} graph fails the ONNX checker: {str(exc).splitlines()[0]}") from None
                graphs[role] = GraphRecord(role=role, file=c.file, data_files=(shared.name,), inputs=c.inputs,
                                           outputs=c.outputs, precision=precision, opset=opset,
                                           op_counts=op_counts(proto), attention=attention_variant(proto))
                if c.variant == CAUSAL and graphs[role].attention != CAUSAL:
                    raise ExportError(f"the {role} graph's Attention nodes are {graphs[role].attention or 'absent'}, "
                                      "its role needs is_causal without a mask")
                del proto
                log.info("wrote %s (%d nodes); %s is %.1f MB", c.file, sum(graphs[role].op_counts.values()),
                         shared.name, shared.size / 1e6)
                bar.update()
        parameters = shared.index_parameters(model, projection_parts(model, precision, opset))
        drop_separate_view(model)  # the fused graphs' projection blocks: written; not held past the traces

        draft = Draft(stage, model, precision, model_id, graphs, versions=_versions())
        if finalize is not None:
            finalize(draft)
        else:
            draft.validation = {"status": "not run", "reason": "exported without a validation step", "graphs": {}}
        if free_model:
            _free(model)
        names = [g.file for g in graphs.values()] + [shared.name]
        tokenizer = _copy_tokenizer(tokenizer_dir, stage)
        names += tokenizer
        if draft.samples:
            write_script(stage / POLYGRAPHY_SCRIPT, {r: {t.name: t.dtype for t in g.inputs} for r, g in graphs.items()})
            names += [draft.samples, POLYGRAPHY_SCRIPT]
        log.info("checksumming %d files ...", len(names))
        manifest = Manifest(precision=precision, opset=opset,
                            model={"config": cfg.base.hf_config, "armt_config": cfg.armt.to_dict(),
                                   "model_id": model_id, "fingerprint": cfg.fingerprint(), "source": source},
                            dims=dims, graphs=graphs, files=record_files(stage, names),
                            versions=draft.versions, validation=draft.validation, parameters=parameters,
                            samples=draft.samples, polygraphy_script=POLYGRAPHY_SCRIPT if draft.samples else None,
                            tokenizer=tuple(tokenizer), memory_math=memory_math(precision, opset))
        write_manifest(stage, manifest)
    manifest.root = export_dir
    seconds = time.perf_counter() - t_start
    log.info("export written to %s in %.1f s", export_dir, seconds)
    return ExportResult(export_dir, manifest, seconds=seconds)


def _copy_tokenizer(model_dir: str | Path | None, stage: Path) -> list[str]:
    """The model directory's tokenizer files, copied into the staged export (none: [])."""
    from graphs.tokenizer import copy_tokenizer, has_tokenizer, tokenizer_files
    if model_dir is None or not has_tokenizer(tokenizer_files(model_dir)):
        return []
    return copy_tokenizer(model_dir, stage)


def _free(model: ArmtModel) -> None:
    """Drop the weights' memory (the graphs hold their own copy now)."""
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype)
