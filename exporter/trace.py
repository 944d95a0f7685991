"""Trace a graph-shaped cell (graphs/cells.py) into an ONNX file.

Exporter choice (torch 2.13): `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript) at
opset 18 with the onnxscript optimizer on. It keeps dynamic dims symbolic (no batch-1 constants
baked in; checked by running batch 1..3 and several widths on ONNX Runtime in the tests) and gives
a compact graph of plain ONNX ops. Opset 18 predates the fused RotaryEmbedding/Attention ops, so
the optimizer cannot fuse rotary tables with a batch-1 cos cache (the opset-23 trap) and attention
stays written out (blocks.attend(fused=False)), which TensorRT builds in fp32 too. The legacy
TorchScript exporter (dynamo=False) also produced a correct graph here but is deprecated and
emits a noisier graph (OneHot/Tile for torch.roll, ~700 Constant nodes); it is not used.

fp16/bf16 exports default to opset 23 instead (FUSED_OPSET): their attention is traced as one ONNX
`Attention` node per call (layers folded into the batch, GQA from the head counts, the same boolean
slot mask; LLaMA: 3-D tensors with head attributes after one RotaryEmbedding node each for q and k,
over separate q/k/v/gate/up weights: `separate_view`), which ONNX Runtime and TensorRT(-RTX) run as
a fused kernel in fp16/bf16; TensorRT refuses that op in fp32, so fp32 stays at 17..22 and written
out, bit for bit as before. An fp16/bf16 export asked for at opset 17..22 is written out too.
Fused exports also trace each step role's causal variant (`segment_causal`, ...: the cells of
graphs/cells.py with every key valid, traced with blocks.ONNX_CAUSAL: Attention is_causal=1 and no mask
input), one more trace per step graph.
The same switch picks the memory read of graphs.memory.memory_read_fast for those graphs (tensor-core
layout, `fast_memory`); the manifest records it as `memory_math` and ONNX Runtime CUDA sessions of
such graphs turn TF32 on (runtimes/loaders.py).

The roles that run the layers one after another (segment, its causal twin, decode, memory_write)
are traced as their ends and one layer and stitched in ONNX (exporter/layered.py): their trace time
does not grow with the layer count.

Example inputs: batch 2, width chosen to collide with no fixed dim (torch.export "duck-sizes"
equal sample sizes), zero state. Dims are declared with torch.export.Dim: "batch", "width", and
slot = width + M (a derived dim, renamed "slot" in the written graph).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import time
import warnings
import weakref

import numpy as np
import torch

from graphs.blocks import ONNX_ATTENTION, ONNX_CAUSAL, block_names, separate_projections
from graphs.cells import cell_for
from graphs.contracts import MASKED_OF, contract
from graphs.dtypes import FLOATS, torch_dtype
from graphs.errors import ExportError
from graphs.model import ArmtModel

from exporter.decompositions import direct_decompositions

log = logging.getLogger("armt.export")

DEFAULT_OPSET = 18  # fp32
FUSED_OPSET = 23  # fp16/bf16: ONNX Attention (opset 23) per attention call
MIN_OPSET, MAX_OPSET = 17, 22  # fp32 (written-out attention; TensorRT does not build fp32 Attention)
FUSED_PRECISIONS = ("fp16", "bf16")
TRACE_BATCH = 2
MAX_BATCH, MAX_WIDTH = 1 << 16, 1 << 20
# Python's youngest-generation collection threshold while a graph is traced (the default is 700
# allocations). A trace allocates millions of short-lived objects (FX nodes, fake tensors, sympy
# expressions) and ran ~1,800 young collections per graph; at 20,000 the fixture's export used 4%
# less CPU (median of 3 pairs, docs/exporter.md "Timing and size"). The old thresholds come back after.
TRACE_GC_THRESHOLD = 20_000


def trace_width(model: ArmtModel) -> int:
    """A sample width that equals no fixed size of the graph (and whose slot length equals none)."""
    b, a = model.cfg.base, model.cfg.armt
    extra = a.num_mem_tokens * (2 if model.cfg.kind == "rmt" else 1)  # slot = width + extra
    fixed = {b.n_layers, b.d_model, a.d_key if model.cfg.kind == "armt" else 1, b.vocab_size, a.num_mem_tokens, b.n_heads,
             b.n_kv_heads, b.head_dim, TRACE_BATCH, 1}
    for w in range(5, 1000):
        if w not in fixed and w + extra not in fixed and w != TRACE_BATCH + extra:
            return w
    raise ExportError("could not pick a trace width")  # unreachable for any real config


def trace_capacity(model: ArmtModel, width: int) -> int:
    """A sample KV-cache capacity (decode graphs) that equals no fixed size, width or slot."""
    b, a = model.cfg.base, model.cfg.armt
    taken = {b.n_layers, b.d_model, a.d_key if model.cfg.kind == "armt" else 1, b.vocab_size, a.num_mem_tokens,
             b.n_heads, b.n_kv_heads, b.head_dim, TRACE_BATCH, 1, width, width + a.num_mem_tokens}
    c = width + 2 * a.num_mem_tokens + 3
    while c in taken:
        c += 1
    return c


def decode_example_feeds(model: ArmtModel, role: str, precision: str, batch: int, width: int, capacity: int,
                         seed: int = 0, memory: bool = False) -> dict[str, np.ndarray]:
    """Feeds of a decode-role call (numpy, the contract's dtypes): row b's cache holds lengths[b]
    places (row 0 the most that fit, row 1 none, the others between), random keys/values, positions
    following the cache. memory False: zero memory state (tracing); True: a random written one
    (A ~ 0.1 N(0, 1), z in [1, 2), RMT memory ~ 0.5 N(0, 1); every row written but the last), so
    validation sees the memory read matter."""
    from graphs.dtypes import numpy_dtype
    c = contract(model.cfg, role, precision)
    rng = np.random.default_rng(seed)
    n = model.cfg.armt.num_mem_tokens if role in ("memory_write", "rmt_memory_write") else width
    places = n + (model.cfg.armt.num_mem_tokens if role == "rmt_decode" else 0)
    capacity = max(capacity, places + 4)  # room for the new places and a few cached ones (large M)
    lengths = np.zeros(batch, dtype=np.int64)
    lengths[0] = capacity - places
    if batch > 2:
        lengths[2:] = rng.integers(0, capacity - places + 1, batch - 2)
    dims = {"batch": batch, "width": width, "capacity": capacity, "slot": width + model.cfg.armt.num_mem_tokens}
    feeds: dict[str, np.ndarray] = {}
    for s in c.inputs:
        shape = s.concrete_shape(dims)
        if s.name == "input_ids":
            feeds[s.name] = rng.integers(0, model.cfg.base.vocab_size, shape).astype(np.int64)
        elif s.name == "positions":
            feeds[s.name] = (lengths[:, None] + np.arange(shape[1])[None, :]).astype(np.int64)
        elif s.name == "lengths":
            feeds[s.name] = lengths
        elif s.name in ("read", "write"):
            feeds[s.name] = np.arange(batch) % 2 == 0
        elif s.name.startswith(("k_cache", "v_cache")):
            feeds[s.name] = (0.5 * rng.standard_normal(shape)).astype(np.float32).astype(numpy_dtype(s.dtype))
        elif memory and s.name == "A_in":
            feeds[s.name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif memory and s.name == "z_in":
            feeds[s.name] = (1.0 + rng.random(shape)).astype(np.float32)
        elif memory and s.name == "memory_in":
            feeds[s.name] = (0.5 * rng.standard_normal(shape)).astype(np.float32).astype(numpy_dtype(s.dtype))
        elif memory and s.name == "written_in":
            w = np.ones(shape, dtype=bool)
            w[..., -1] = batch == 1
            feeds[s.name] = w
        else:
            feeds[s.name] = np.zeros(shape, dtype=numpy_dtype(s.dtype))
    return feeds


def example_args(model: ArmtModel, role: str, precision: str = "fp32") -> tuple[torch.Tensor, ...]:
    """Valid example inputs for tracing (the contract's order): batch 2, width trace_width(), one
    full slot each, zero memory state (decode roles: decode_example_feeds)."""
    from graphs.segments import make_slots
    from graphs.schedule import build_schedule, step_feeds
    c = contract(model.cfg, role, precision)
    B, W = TRACE_BATCH, trace_width(model)
    if c.schedule == "decode":
        feeds = decode_example_feeds(model, role, precision, B, W, trace_capacity(model, W))
        return tuple(torch.from_numpy(np.ascontiguousarray(feeds[s.name], dtype=np.float32)).to(torch_dtype(s.dtype))
                     if s.dtype in FLOATS else torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in c.inputs)
    if c.schedule is None:  # lm_head: final-norm hidden rows (any values trace the same graph)
        return tuple(torch.zeros(s.concrete_shape(c.dims_for(B, W)), dtype=torch_dtype(s.dtype)) for s in c.inputs)
    ids = np.zeros((B, W), dtype=np.int64)
    slots = make_slots(model.cfg, ids, np.full(B, W), uniform=True, segment_size=W)
    L = model.cfg.base.n_layers
    feeds = step_feeds(build_schedule(c.schedule, L, 1), slots)[0]
    if "active" in feeds:
        feeds["active"] = np.ones(L, dtype=bool)  # every layer live (one segment would idle L-1 of them)
        feeds["write"] = np.ones_like(feeds["write"])
    feeds.update(c.initial_carry(B, W))
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[s.name], dtype=np.float32)).to(torch_dtype(s.dtype))
                 if s.dtype in FLOATS else torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in c.inputs)


def dynamic_shapes(model: ArmtModel, role: str) -> dict[str, dict[int, object]]:
    """torch.export dims from the contract's named dims (derived ones as expressions: slot = width + M)."""
    from torch.export import Dim
    c = contract(model.cfg, role, "fp32")
    base = {"batch": Dim("batch", min=1, max=MAX_BATCH), "width": Dim("width", min=1, max=MAX_WIDTH),
            "capacity": Dim("capacity", min=1, max=MAX_WIDTH), "rows": Dim("rows", min=1, max=MAX_WIDTH)}
    for name, (of, offset) in c.derived_dims.items():
        base[name] = base[of] + offset
    return {spec.name: {axis: base[d] for axis, d in enumerate(spec.shape) if isinstance(d, str)}
            for spec in c.inputs}


def default_opset(precision: str) -> int:
    """The opset an export of `precision` gets when none is asked for: 23 (fused attention) for
    fp16/bf16, 18 for fp32."""
    return FUSED_OPSET if precision in FUSED_PRECISIONS else DEFAULT_OPSET


def fused_attention(precision: str, opset: int) -> bool:
    """Whether the graphs' attention is traced as ONNX Attention nodes (fp16/bf16 at opset 23)."""
    return precision in FUSED_PRECISIONS and opset >= FUSED_OPSET


def fast_memory(precision: str, opset: int) -> bool:
    """Whether the graphs read the memory with graphs.memory.memory_read_fast (tensor-core layout: the
    slot in the compute dtype, A and z fp32; ONNX Runtime CUDA runs them with TF32 on): the same
    switch as fused attention, fp16/bf16 at opset 23. fp32 graphs keep the reference's fp32 math."""
    return fused_attention(precision, opset)


def memory_math(precision: str, opset: int) -> str:
    """What the manifest records as the graphs' memory arithmetic: "fp32" (the reference's, every
    product fp32) or "tensor-core-fp16"/"tensor-core-bf16" (memory_read_fast; fp32 products as TF32)."""
    return f"tensor-core-{precision}" if fast_memory(precision, opset) else "fp32"


def causal_variants(precision: str, opset: int) -> bool:
    """Whether the export adds the step roles' causal variants (is_causal Attention, no mask): exactly
    when attention is fused (fp16/bf16 at opset 23); fp32 exports are unchanged."""
    return fused_attention(precision, opset)


_SEPARATE_VIEWS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, torch.nn.Module]]" = weakref.WeakKeyDictionary()


def separate_view(model):
    """`model` (ArmtModel or RmtModel) with its LLaMA qkv / gate_up stacks as separate q, k, v, gate, up
    parameters (graphs.blocks.separate_projections): what every graph of a fused fp16/bf16 export
    multiplies by (one MatMul per projection: no Split copies of a fused output on the device). A
    shallow copy sharing every other parameter; made once per model and weight version (the roles of one
    export share it, so weights.data holds each part once). GPT-2: the model itself."""
    if model.cfg.base.architecture != "llama":
        return model
    stamp = tuple((id(t), t.data_ptr(), t.dtype, t._version) for t in model.layers.values())
    hit = _SEPARATE_VIEWS.get(model)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    view = copy.copy(model)
    view._modules = dict(model._modules)  # the copy's own module table: the original keeps its layers
    view.layers = torch.nn.ParameterDict({n: torch.nn.Parameter(t.detach(), requires_grad=False)
                                          for n, t in separate_projections(model.cfg.base, dict(model.layers)).items()})
    _SEPARATE_VIEWS[model] = (stamp, view)
    return view


def drop_separate_view(model) -> None:
    """Forget `model`'s separate_view (its own copies of the projection blocks): the export is written."""
    _SEPARATE_VIEWS.pop(model, None)


def projection_parts(model, precision: str, opset: int) -> dict[str, list[torch.Tensor]]:
    """Parameter name ("layers.qkv") -> the separate tensors the export's graphs hold for it (the
    fused graphs' separate_view), for the manifest's parameter index; {} when the graphs hold the
    model's own parameters."""
    if not fused_attention(precision, opset) or model.cfg.base.architecture != "llama":
        return {}
    view = separate_view(model)
    return {f"layers.{name}": [view.layers[b] for b in block_names(name)] for name in model.layers
            if block_names(name) is not None}


def cell_module(model: ArmtModel, role: str, precision: str = "fp32", opset: int = DEFAULT_OPSET) -> torch.nn.Module:
    if fused_attention(precision, opset):
        model = separate_view(model)
    if role in MASKED_OF:
        if not causal_variants(precision, opset):
            raise ExportError(f"the {role} graph exists for fused fp16/bf16 exports (opset {FUSED_OPSET}) only")
        return cell_for(model, role, ONNX_CAUSAL, fast_memory(precision, opset))
    return cell_for(model, role, ONNX_ATTENTION if fused_attention(precision, opset) else False,
                    fast_memory(precision, opset))


def check_opset(opset: int, precision: str = "fp32") -> None:
    if precision in FUSED_PRECISIONS:
        if not MIN_OPSET <= opset <= FUSED_OPSET:
            raise ExportError(f"--opset {opset} is not supported for {precision} (choose {MIN_OPSET}..{FUSED_OPSET}; "
                              f"{FUSED_OPSET}, the default, fuses attention into ONNX Attention nodes)")
    elif not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset} is not supported for {precision} (choose {MIN_OPSET}..{MAX_OPSET}; "
                          "TensorRT does not build the opset-23 Attention op in fp32)")


def trace_graph(model: ArmtModel, role: str, precision: str, opset: int | None = None, cache: bool | None = None):
    """Trace the `role` cell of `model` (already cast to the export precision): an onnx_ir Model whose
    initializers still share memory with the torch parameters. opset None: default_opset(precision).
    cache: use the trace cache (exporter/trace_cache.py; None: its default, on unless ARMT_TRACE_CACHE=0).

    torch.onnx.export(dynamo=True, optimize=False) captures, decomposes and translates (the per-layer
    roles piece by piece, stitched by exporter/layered.py); the onnxscript optimizer (without
    SKIPPED_REWRITE_RULES) and the renaming of the graph's inputs/outputs to the contract's names then
    run here, in the order torch.onnx.export(optimize=True, input_names=..., output_names=...) runs
    them. A trace-cache hit replaces only the first step."""
    from exporter import trace_cache
    opset = default_opset(precision) if opset is None else opset
    check_opset(opset, precision)
    c = contract(model.cfg, role, precision)
    module = cell_module(model, role, precision, opset)
    use_cache = trace_cache.enabled() if cache is None else cache
    store = trace_cache.TraceCache() if use_cache else None
    key = trace_cache.trace_key(model, role, precision, opset, fused_attention(precision, opset), module) if store else ""
    t0 = time.perf_counter()
    with (warnings.catch_warnings(), torch.no_grad(), _fewer_collections(), shared_op_registry(),
          direct_decompositions()):
        warnings.simplefilter("ignore")  # the exporter's deprecation/user warnings are not ours to show
        translated = store.load(key, module) if store else None
        hit = translated is not None
        if not hit:
            log.info("tracing %s graph (torch.onnx dynamo exporter, opset %d, %s) ...", role, opset, precision)
            translated = _translate(module, model, role, precision, opset)
            if store:
                store.save(key, translated, module)
        program = torch.onnx.ONNXProgram(translated, None)
        try:
            with _without_quadratic_rules():
                program.optimize()  # onnxscript optimizer (constant folding, redundancy elimination), in place
        except Exception as exc:
            raise ExportError(f"the onnxscript optimizer failed on the {role} graph: {exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    _rename(program.model.graph.inputs, c.input_names)
    _rename(program.model.graph.outputs, c.output_names)
    log.info("traced %s graph in %.1f s%s", role, time.perf_counter() - t0, " (from the trace cache)" if hit else "")
    return program.model


# onnxscript rewrite rules left out of torch.onnx's optimizer run (by rule name). SlicesSplit (two
# Slices of one tensor's last axis at [0:n/2] and [n/2:n] with constant bounds -> one Split) is a
# two-root pattern whose matcher walks the whole graph for every node: quadratic in the graph's size
# (36.6 of 52 s for a 16-layer segment graph, ~1.2 s of the fixture's 3-layer one) and it never fires
# on these graphs (torch writes open slice ends as INT64_MAX; the fused graphs use separate
# projections): tests/test_layered_trace.py checks that the optimized graphs are the same without it.
SKIPPED_REWRITE_RULES = ("SlicesSplit",)


@contextlib.contextmanager
def _without_quadratic_rules():
    """onnxscript's default rewrite rules without SKIPPED_REWRITE_RULES while the block runs (the
    optimizer reads the module's rule list when it is called); as they were afterwards. An onnxscript
    without that list runs its own rules."""
    from onnxscript import rewriter
    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if not isinstance(rules, tuple):
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if getattr(r, "name", None) not in SKIPPED_REWRITE_RULES)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


@contextlib.contextmanager
def _fewer_collections():
    """Raise the young-generation GC threshold to TRACE_GC_THRESHOLD for the block (never lower it)."""
    old = gc.get_threshold()
    gc.set_threshold(max(old[0], TRACE_GC_THRESHOLD), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


# torch.onnx.export builds its ATen -> ONNX op registry (ONNXRegistry.from_torchlib: every torchlib
# function, overload lookups, the opset clean-up) afresh on every call: ~0.37 s, 8 times in an export
# with decode graphs (two pieces per stitched role), a tenth of its tracing CPU. The registry is only
# read once built (torch.onnx registers custom_translation_table ops into it; this project passes
# none), so while shared_op_registry is active one registry per opset is built per process and
# handed to every call. tests/test_trace_registry.py checks that the graphs are the same byte for byte.
_OP_REGISTRIES: dict[int | None, object] = {}  # opset (None: torch's default) -> registry


@contextlib.contextmanager
def shared_op_registry():
    """Within the block, torch.onnx's ONNXRegistry.from_torchlib returns this process's registry for
    the opset (built on first use, kept in _OP_REGISTRIES); the original method comes back after.
    A torch without that private layout: the block changes nothing (each call builds its own)."""
    try:
        from torch.onnx._internal.exporter import _registration
        cls = _registration.ONNXRegistry
        original = cls.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(klass, opset_version=None, *args, **kwargs):
        given = () if opset_version is None else (opset_version,)  # not given: torch's default opset
        if args or kwargs or klass is not cls or not isinstance(opset_version, (int, type(None))):
            return build(klass, *given, *args, **kwargs)  # not torch.onnx.export's call (another torch): as torch has it
        if opset_version not in _OP_REGISTRIES:
            _OP_REGISTRIES[opset_version] = build(klass, *given)
        return _OP_REGISTRIES[opset_version]

    cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        cls.from_torchlib = original


def _translate(module: torch.nn.Module, model: ArmtModel, role: str, precision: str, opset: int):
    """torch.export capture, aten decompositions and FX -> ONNX translation (no optimizer, torch's own
    names on the inputs/outputs): the onnx_ir Model the trace cache stores."""
    from exporter.layered import try_translate_layered
    args = example_args(model, role, precision)
    dims = dynamic_shapes(model, role)

    def export(cell, cell_args, cell_dims):
        try:
            return torch.onnx.export(cell, cell_args, dynamic_shapes=cell_dims, opset_version=opset, dynamo=True,
                                     optimize=False, external_data=True, verbose=False).model
        except Exception as exc:  # torch.export raises many types; the message is what the user needs
            raise ExportError(f"torch.onnx.export of the {role} graph failed: {exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc

    names = [spec.name for spec in contract(model.cfg, role, precision).inputs]
    stitched = try_translate_layered(module, args, dims, names, export)
    return stitched if stitched is not None else export(module, args, dims)


def _rename(values, names: tuple[str, ...] | list[str]) -> None:
    """Give graph inputs/outputs the contract's names, recording torch's name as torch.onnx.export's
    input_names/output_names do (metadata "pkg.torch.onnx.original_node_name")."""
    names = list(names)
    if len(values) != len(names):
        raise ExportError(f"the traced graph has {len(values)} inputs/outputs where the contract names {len(names)}")
    for value, name in zip(values, names):
        value.metadata_props["pkg.torch.onnx.original_node_name"] = str(value.name)
        value.name = name
