"""`armt build`: a TensorRT engine per exported graph, recorded in the manifest.

Builder: `tensorrt` when importable, else `tensorrt_rtx` (TensorRT-RTX builds ahead of time, also on a
machine without a GPU; its engines run on compute capability 7.5/8.x/12.x, not on 9.0). Networks
are strongly typed: every tensor keeps the dtype the exported graph gives it, so the memory state
and its arithmetic stay fp32 in fp16/bf16 engines, and `--precision` can only confirm the export's.

One optimization profile per engine; per input, shapes from the manifest's named dims:

    batch: 1 .. max_batch (opt: opt_batch)     width: 1 .. max_width (opt: opt_width)
    slot = width + M (ARMT graphs) or width + 2M (the RMT segment graph), from the graph contract
    decode graphs (generation): width 1 .. max_width (opt 1: the token loop), capacity (the KV
    cache) 1 .. max_capacity (default max_width + 2M + 256 new tokens; opt = max), slot = width + M

Files: `<role>.<builder>-<sha8>.engine` (content-addressed). New engines are written first, then the
manifest is replaced atomically, then engines it no longer lists are deleted: a crash at any point
leaves a manifest whose files all exist and match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from graphs.atomic import atomic_write_bytes
from graphs.contracts import contract
from graphs.errors import BackendUnavailable, ExportError
from graphs.progress import Progress

from exporter.manifest import EngineRecord, FileRecord, GraphRecord, Manifest, ProfileRange, load_manifest, write_manifest

log = logging.getLogger("armt.build")

ENGINE_TAGS = {"tensorrt": "trt", "tensorrt_rtx": "trtrtx"}
COMPUTE_CAPABILITIES = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121"}


@dataclass(frozen=True)
class ShapeLimits:
    max_batch: int = 8
    opt_batch: int = 1
    max_width: int | None = None  # default: the model's segment size
    opt_width: int | None = None  # default: max_width
    max_capacity: int | None = None  # decode graphs' KV-cache places; default max_width + 2M + DEFAULT_NEW_TOKENS


DEFAULT_NEW_TOKENS = 256


def import_builder(prefer: str = "auto"):
    """(module, name): `tensorrt` if importable (unless prefer='tensorrt_rtx'), else `tensorrt_rtx`."""
    order = {"auto": ("tensorrt", "tensorrt_rtx"), "tensorrt": ("tensorrt",),
             "tensorrt_rtx": ("tensorrt_rtx",)}[prefer]
    import importlib
    import importlib.util
    for name in order:
        try:
            return importlib.import_module(name), name
        except ImportError:
            continue
    others = [n for n in ENGINE_TAGS if n not in order and importlib.util.find_spec(n) is not None]
    if others:  # e.g. --builder tensorrt with only TensorRT-RTX installed
        raise BackendUnavailable(f"--builder {prefer}: {' or '.join(order)} is not installed; {others[0]} is "
                                 f"(use --builder {others[0]} or --builder auto)")
    raise BackendUnavailable("no TensorRT builder is installed: pip install 'armt-deploy[trt]' "
                             "(TensorRT-RTX for CUDA 13; 'armt-deploy[trt-cu12]' for CUDA 12) or NVIDIA's tensorrt")


def profile_for(graph: GraphRecord, dims: dict[str, int], limits: ShapeLimits,
                slot_extra: int | None = None, decode: bool = False) -> dict[str, ProfileRange]:
    """Min/opt/max shapes of every input from its named dims; slot = width + `slot_extra` (the
    contract's: M for an ARMT graph, 2M for an RMT's; default M). `decode`: a generation graph
    (opt width 1 unless given, a capacity range)."""
    mem, T = dims["mem_tokens"], dims["segment_size"]
    M = mem if slot_extra is None else slot_extra
    max_w = limits.max_width or T
    opt_w = min(limits.opt_width or (1 if decode else max_w), max_w)
    max_c = limits.max_capacity or max_w + 2 * mem + DEFAULT_NEW_TOKENS
    if max_c < max_w + 2 * mem:
        raise ExportError(f"--max-capacity {max_c} must hold a segment and its memory places ({max_w + 2 * mem})")
    if not 1 <= limits.opt_batch <= limits.max_batch:
        raise ExportError(f"--opt-batch {limits.opt_batch} must lie in 1..--max-batch {limits.max_batch}")
    if max_w < 1:
        raise ExportError(f"--max-width must be positive, got {max_w}")
    # "rows": the lm_head graph's hidden rows (every token place of a segment at most, or one per row);
    # "capacity": the decode graphs' KV cache
    points = {"min": {"batch": 1, "width": 1, "slot": 1 + M, "rows": 1, "capacity": 1},
              "opt": {"batch": limits.opt_batch, "width": opt_w, "slot": opt_w + M, "rows": opt_w, "capacity": max_c},
              "max": {"batch": limits.max_batch, "width": max_w, "slot": max_w + M, "rows": max_w, "capacity": max_c}}
    return {t.name: ProfileRange(*(t.concrete_shape(points[k]) for k in ("min", "opt", "max")))
            for t in graph.inputs}


def _make_logger(trt):
    """A TensorRT ILogger that forwards to logging and keeps the errors for the exception message."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
                log.debug("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.debug("TensorRT warning: %s", msg)

    return Logger()


def _parse(trt, builder, logger, path: Path, role: str):
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errs = [parser.get_error(i) for i in range(parser.num_errors)]
        if errs:
            e = errs[0]
            where = f"node {e.node_name() or e.node()} (op {e.node_operator() or '?'})"
            raise ExportError(f"TensorRT cannot parse the {role} graph at {where}: {e.desc()}"
                              + (f" (+{len(errs) - 1} more errors)" if len(errs) > 1 else ""))
        raise ExportError(f"TensorRT cannot parse the {role} graph: {'; '.join(logger.errors) or 'unknown error'}")
    return network, parser


def build_engine(trt, builder_name: str, path: Path, graph: GraphRecord, profile: dict[str, ProfileRange],
                 compute_capability: tuple[str, ...], workspace: int | None) -> bytes:
    """Parse one ONNX graph and build its serialized engine."""
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, path, graph.role)
    config = builder.create_builder_config()
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if compute_capability:
        if not hasattr(config, "set_compute_capability"):
            raise ExportError(f"--compute-capability needs TensorRT-RTX; {builder_name} builds for the GPU it runs on")
        config.num_compute_capabilities = len(compute_capability)
        for i, cc in enumerate(compute_capability):
            config.set_compute_capability(getattr(trt.ComputeCapability, COMPUTE_CAPABILITIES[cc]), i)
    prof = builder.create_optimization_profile()
    for name, rng in profile.items():
        prof.set_shape(name, rng.min, rng.opt, rng.max)
    config.add_optimization_profile(prof)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        hint = ""
        if graph.op_counts.get("Attention"):  # fused fp16/bf16 graph (opset 23): TensorRT has no kernel for some shapes
            hint = (" (the graph holds ONNX Attention nodes, which TensorRT builds only for the head sizes it has "
                    "fused kernels for (head_dim 8 is refused, 16/32/64 build); `armt export --opset 18` writes "
                    "the attention out)")
        raise ExportError(f"TensorRT could not build the {graph.role} engine{hint}: "
                          f"{'; '.join(logger.errors[-3:]) or 'no reason given'}")
    return bytes(serialized)


def build_engines(export_dir: str | Path, precision: str | None = None, compute_capability: tuple[str, ...] = (),
                  workspace: int | None = None, limits: ShapeLimits = ShapeLimits(), prefer: str = "auto",
                  roles: tuple[str, ...] | None = None) -> Manifest:
    """Build engines for the export's graphs; returns the updated manifest."""
    export_dir = Path(export_dir)
    manifest = load_manifest(export_dir, verify_checksums=True)
    if precision and precision != manifest.precision:
        raise ExportError(f"the graphs were exported in {manifest.precision}; engines are strongly typed from the "
                          f"graph's dtypes, so --precision {precision} needs `armt export --precision {precision}`")
    for cc in compute_capability:
        if cc not in COMPUTE_CAPABILITIES:
            raise ExportError(f"--compute-capability {cc} is not one TensorRT-RTX targets "
                              f"({', '.join(COMPUTE_CAPABILITIES)})")
    trt, builder_name = import_builder(prefer)
    version = getattr(trt, "__version__", "?")
    roles = roles or tuple(manifest.graphs)
    new_files: list[Path] = []
    graphs = dict(manifest.graphs)
    files = dict(manifest.files)
    try:
        with Progress(len(roles), "building engines") as bar:
            for role in roles:
                bar.describe(role)
                graph = manifest.graph(role)
                c = contract(manifest.model_config(), role, manifest.precision)
                derived = c.derived_dims
                slot_extra = derived["slot"][1] if "slot" in derived else 0  # lm_head has no slot dim
                profile = profile_for(graph, manifest.dims, limits, slot_extra, decode=c.schedule == "decode")
                log.info("building %s engine with %s %s (batch <= %d, width <= %d) ...", role, builder_name, version,
                         limits.max_batch, profile[graph.inputs[0].name].max[1])  # input_ids (B, W) / hidden (B, R, d)
                t0 = time.perf_counter()
                blob = build_engine(trt, builder_name, manifest.path(graph.file), graph, profile,
                                    tuple(compute_capability), workspace)
                digest = hashlib.sha256(blob).hexdigest()
                name = f"{role}.{ENGINE_TAGS.get(builder_name, builder_name)}-{digest[:8]}.engine"
                atomic_write_bytes(export_dir / name, blob)
                new_files.append(export_dir / name)
                log.info("built %s (%.1f MB) in %.1f s", name, len(blob) / 1e6, time.perf_counter() - t0)
                record = EngineRecord(file=name, builder=builder_name, builder_version=version,
                                      precision=manifest.precision, compute_capability=tuple(compute_capability),
                                      profiles=(profile,))
                # one engine per graph and builder: a rebuild replaces the previous record
                kept = tuple(e for e in graph.engines if e.builder != builder_name and e.file != name)
                graphs[role] = dataclasses.replace(graph, engines=(*kept, record))
                files[name] = FileRecord(sha256=digest, bytes=len(blob))
                bar.update()
    except BaseException:
        for f in new_files:
            if not any(f.name == e.file for g in manifest.graphs.values() for e in g.engines):
                f.unlink(missing_ok=True)
        raise
    engines_now = {e.file for g in graphs.values() for e in g.engines}
    dropped = [f for f in files if f.endswith(".engine") and f not in engines_now]
    for f in dropped:
        files.pop(f)
    updated = dataclasses.replace(manifest, graphs=graphs, files=files)
    write_manifest(export_dir, updated)  # the switch: before it the old manifest holds, after it the new one
    for f in dropped:
        if f not in updated.referenced_files():
            (export_dir / f).unlink(missing_ok=True)
    return load_manifest(export_dir, verify_checksums=False)


def engine_sizes(manifest: Manifest) -> dict[str, int]:
    return {e.file: manifest.files[e.file].bytes for g in manifest.graphs.values() for e in g.engines
            if e.file in manifest.files}

