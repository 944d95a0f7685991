"""Layer-once tracing: a per-layer graph role traced as its ends and one layer, stitched in ONNX.

A graph that runs every layer in turn (segment and its causal twin, decode, memory_write) costs
torch.export one capture and one decomposition of every layer: the trace time grows with the
layer count (~4 s a layer for the tiny fixture, most of it symbolic-shape work). The layers are one
function of their own weights, so this traces two pieces,

    ends:  prologue(graph inputs)                  -> h0, rope tables, mask   (embeddings, geometry)
           epilogue(h, graph inputs)               -> graph outputs           (final norm, head; optional)
    layer: layer(h, tables, mask, layer l's inputs, W_l) -> h, layer l's outputs  (weights are inputs)

(memory_write has no epilogue: its ends are the prologue alone), and writes the role's ONNX graph
from them (segment shown):

    inputs --prologue--> h0 --layer(W_0, A_in[0:1], ...)--> h1 --layer(W_1, A_in[1:2], ...)--> ... --epilogue--> hidden
                                     |                                 |
                                     A_0', z_0', written_0'            A_1', ...   --Concat(axis 0)--> A_out, ...

W_l is Slice(stacked weight, l, l+1) of the model's own (L, ...) parameters (a full trace slices
them the same way, and the optimizer folds the slices alike). Each piece is traced by the same
torch.onnx.export call as a whole graph (dims, opset, no optimizer), so it holds the nodes a full
trace gives for that code; the stitched graph (nodes in topological order) then goes through the
same onnxscript optimizer, the trace cache and the export's validation against the torch cell.
Cells without a plan here (the diagonal step, which batches its layers already, the RMT roles, the
LM head) and 1-layer models are traced whole; so is a cell whose pieces fail to trace, bind or
stitch (a subgraph or a local function in a piece, say: logged).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from graphs.cells import DecodeCell, MemoryWriteCell, SegmentCausalCell, SegmentCell, pos_embed
from graphs.decode import armt_layer_write, decode_geometry, decode_layer
from graphs.dtypes import ONNX_ELEMENT_TYPES, dtype_name
from graphs.errors import ExportError
from graphs.model import layer_cells

log = logging.getLogger("armt.export")


# ------------------------------------------------------------------------------------------ pieces
class _SegmentPrologue(nn.Module):
    """SegmentCell's (input_ids, positions, key_valid) -> slot h (1, B, P, d), rope cos/sin, mask."""

    def __init__(self, cell: SegmentCell):
        super().__init__()
        self.model = cell.model
        self.causal = isinstance(cell, SegmentCausalCell)

    def forward(self, input_ids, positions, key_valid):
        m = self.model
        if self.causal:
            key_valid = torch.ones_like(key_valid)
        h = m.embed(input_ids, positions)[None]  # (1, B, P, d)
        rope, allowed = m.geometry(positions[None], key_valid[None])  # (1, B, 1, P, hd) each; (1, B, 1, P, P)
        return (h, *(rope or ()), allowed)


class _SegmentLayer(nn.Module):
    """One ARMT cell (graphs.model.layer_cells) with its weights as inputs (no parameters of its own)."""

    def __init__(self, cell: SegmentCell):
        super().__init__()
        self.cfg, self.fused, self.fast_memory = cell.model.cfg, cell.fused, cell.fast_memory
        self.names = (list(cell.model.layers.keys()), list(cell.model.mem.keys()))

    def forward(self, h, rope, allowed, A, z, written, write, layer_w, mem_w):
        """h (1, B, P, d); rope [] or [cos, sin]; allowed (1, B, 1, P, P); A (1, B, K, d); z (1, B, K);
        written (1, B); write (B,); layer_w / mem_w: this layer's weights (1, ...) in name order."""
        return layer_cells(self.cfg, dict(zip(self.names[0], layer_w)), dict(zip(self.names[1], mem_w)), h,
                           tuple(rope) if rope else None, allowed, A, z, written, write[None], self.fused,
                           self.fast_memory)


class _SegmentEpilogue(nn.Module):
    """The last layer's slot h (1, B, P, d) -> hidden (B, W, d) float32 after the final norm."""

    def __init__(self, cell: SegmentCell):
        super().__init__()
        self.model = cell.model

    def forward(self, h, input_ids):
        return self.model.final_norm(h[0, :, :input_ids.shape[1]]).float()


class _DecodePrologue(nn.Module):
    """decode_layers' set-up: new places x (B, n, d), rope cos/sin (1, B, 1, n, hd), mask (B, 1, n, C).
    input_ids None: the places are the M memory vectors (memory_write)."""

    def __init__(self, cell):
        super().__init__()
        self.model = cell.model

    def forward(self, positions, lengths, k_cache, input_ids=None):
        m = self.model
        if input_ids is not None:
            x = m.globals["embed"][input_ids]  # (B, n, d)
        else:
            x = m.globals["memory"][None].expand(positions.shape[0], -1, -1)  # (B, M, d)
        rope, allowed = decode_geometry(m, positions, lengths, k_cache.shape[3])
        return (pos_embed(m, x, positions), *(rope or ()), allowed)


class _DecodeLayer(nn.Module):
    """One layer of decode_layers (graphs.decode.decode_layer) with its weights as inputs; with
    `write`, also the layer's memory write (ArmtMemoryWrites)."""

    def __init__(self, cell, write: bool):
        super().__init__()
        self.cfg, self.fast_memory, self.write = cell.model.cfg, cell.fast_memory, write
        self.names = (list(cell.model.layers.keys()), list(cell.model.mem.keys()))

    def forward(self, h, rope, allowed, k_cache, v_cache, lengths, A, z, written, write, layer_w, mem_w):
        """h (B, n, d); k/v_cache (1, B, Hkv, C, hd); A, z, written (1, B, ...); write (B,) (memory_write;
        None for decode)."""
        mem = dict(zip(self.names[1], mem_w))
        h, k, v = decode_layer(self.cfg, dict(zip(self.names[0], layer_w)), mem["w_q"], h,
                               tuple(rope) if rope else None, allowed, k_cache[0], v_cache[0], lengths, (A, z, written),
                               False, self.fast_memory)
        if not self.write:
            return h, k[None], v[None]
        return (h, *armt_layer_write(self.cfg, mem, h, A, z, written, write))


class _DecodeEpilogue(nn.Module):
    """The last layer's h (B, n, d) -> logits (B, n, V) float32."""

    def __init__(self, cell):
        super().__init__()
        self.model = cell.model

    def forward(self, h):
        return self.model.head(h)[0].float()


class _Ends(nn.Module):
    """The prologue and the epilogue as one traced piece (one torch.onnx.export call fewer): inputs
    the prologue's and the last layer's h; outputs the prologue's, then the epilogue's."""

    def __init__(self, cell, plan: "_Plan"):
        super().__init__()
        self.model = cell.model  # the pieces' parameters keep the cell's names ("model.globals.embed")
        self.__dict__["parts"] = (plan.prologue, plan.epilogue, plan.prologue_in, plan.epilogue_in)  # not submodules

    def forward(self, *args):
        prologue, epilogue, prologue_in, epilogue_in = self.parts
        n = len(prologue_in)
        h = args[n]
        out = epilogue(*(h if s[0] == "h" else args[prologue_in.index(s[1])] for s in epilogue_in))
        return (*prologue(*args[:n]), *(out if isinstance(out, tuple) else (out,)))


# ------------------------------------------------------------------------------------------ plans
@dataclass
class _Plan:
    """How a cell's graph is stitched. Feeds name where a piece input comes from: ("in", i) graph
    input i; ("tables",) the prologue's rope tables; ("mask",) its mask (its last output); ("h",) the
    running hidden state; ("layer", i) layer l's Slice [l:l+1] of graph input i; ("none",) None (no
    graph input). The layer's first output is the running h, the others are stacked over layers
    (Concat axis 0)."""
    prologue: nn.Module
    prologue_in: list[int]
    layer: nn.Module
    layer_in: list[tuple]  # before the weights
    epilogue: nn.Module | None
    epilogue_in: list[tuple]
    outputs: list[tuple]  # ("epi", j) or ("stack", j): the layer's output j >= 1
    names: tuple = field(default_factory=tuple)


def _plan(cell) -> _Plan | None:
    if isinstance(cell, SegmentCell):  # inputs: input_ids, positions, key_valid, write, A_in, z_in, written_in
        layer = _SegmentLayer(cell)
        return _Plan(_SegmentPrologue(cell), [0, 1, 2], layer,
                     [("h",), ("tables",), ("mask",), ("layer", 4), ("layer", 5), ("layer", 6), ("in", 3)],
                     _SegmentEpilogue(cell), [("h",), ("in", 0)], [("epi", 0), ("stack", 1), ("stack", 2), ("stack", 3)],
                     names=layer.names)
    if isinstance(cell, DecodeCell):  # input_ids, positions, lengths, k_cache_in, v_cache_in, A_in, z_in, written_in
        layer = _DecodeLayer(cell, write=False)
        return _Plan(_DecodePrologue(cell), [1, 2, 3, 0], layer,
                     [("h",), ("tables",), ("mask",), ("layer", 3), ("layer", 4), ("in", 2), ("layer", 5),
                      ("layer", 6), ("layer", 7), ("none",)],
                     _DecodeEpilogue(cell), [("h",)], [("epi", 0), ("stack", 1), ("stack", 2)], names=layer.names)
    if isinstance(cell, MemoryWriteCell):  # positions, lengths, k_cache_in, v_cache_in, write, A_in, z_in, written_in
        layer = _DecodeLayer(cell, write=True)
        return _Plan(_DecodePrologue(cell), [0, 1, 2], layer,
                     [("h",), ("tables",), ("mask",), ("layer", 2), ("layer", 3), ("in", 1), ("layer", 5),
                      ("layer", 6), ("layer", 7), ("in", 4)],
                     None, [], [("stack", 1), ("stack", 2), ("stack", 3)], names=layer.names)
    return None


def layered(cell: nn.Module) -> bool:
    """Whether `cell` (graphs/cells.py) is traced piece by piece here (ARMT cells over 2+ layers)."""
    return _plan(cell) is not None and cell.model.cfg.base.n_layers > 1


# ------------------------------------------------------------------------------------------ trace
def translate_layered(cell: nn.Module, args: tuple[torch.Tensor, ...], dims: dict, input_names: list[str], export):
    """The pre-optimizer onnx_ir Model of `cell`'s graph from its pieces. `args`: the trace example
    inputs (graph input order, names `input_names`); `dims`: their torch.export dims by name;
    `export(module, args, dynamic_shapes)`: the caller's torch.onnx.export -> onnx_ir Model."""
    import onnx
    import onnx_ir as ir
    from exporter.trace_cache import BOUND_PROP, bind_weights, cell_tensors, serialize_unbound
    plan = _plan(cell)
    m = cell.model
    L = m.cfg.base.n_layers
    in_dims = [dims.get(n) for n in input_names]

    pro_args = tuple(args[i] for i in plan.prologue_in)
    with torch.no_grad():
        pro_out = plan.prologue(*pro_args)
    n_tables = len(pro_out) - 2
    layer_w = [w[0:1] for w in m.layers.values()]  # lists: torch.onnx hands the dims' containers on as lists
    mem_w = [w[0:1] for w in m.mem.values()]
    layer_args, layer_dims = [], []
    h_dims, table_dims, mask_dims = _piece_dims(cell, dims)
    for src in plan.layer_in:
        if src[0] == "h":
            layer_args.append(pro_out[0]), layer_dims.append(h_dims)
        elif src[0] == "tables":
            layer_args.append(list(pro_out[1:1 + n_tables])), layer_dims.append([table_dims] * n_tables)
        elif src[0] == "mask":
            layer_args.append(pro_out[-1]), layer_dims.append(mask_dims)
        elif src[0] == "layer":
            layer_args.append(args[src[1]][0:1]), layer_dims.append(in_dims[src[1]])
        elif src[0] == "none":
            layer_args.append(None), layer_dims.append(None)
        else:
            layer_args.append(args[src[1]]), layer_dims.append(in_dims[src[1]])
    layer_args += [layer_w, mem_w]
    layer_dims += [[None] * len(layer_w), [None] * len(mem_w)]
    pro_dims = tuple(in_dims[i] for i in plan.prologue_in)
    pieces = {"layer": (plan.layer, tuple(layer_args), tuple(layer_dims))}
    if plan.epilogue is None:
        pieces["prologue"] = (plan.prologue, pro_args, pro_dims)
    else:
        if any(s[0] == "in" and s[1] not in plan.prologue_in for s in plan.epilogue_in):
            raise _NotLayerable("its epilogue reads a graph input the prologue does not")
        pieces["ends"] = (_Ends(cell, plan), (*pro_args, pro_out[0]), ((*pro_dims, _epilogue_h_dims(cell, dims)),))  # (*args,)

    protos, bound = {}, {}
    for name, (piece, piece_args, piece_dims) in pieces.items():
        traced = export(piece, piece_args, piece_dims)
        if len(traced.functions):
            raise _NotLayerable(f"its {name} piece has local functions")
        tensors = cell_tensors(piece)
        weights = [n for n, v in traced.graph.initializers.items() if n in tensors and v.const_value is not None]
        proto = onnx.ModelProto.FromString(serialize_unbound(traced, weights))
        bound.update(json.loads({p.key: p.value for p in proto.metadata_props}[BOUND_PROP]))
        del proto.metadata_props[:]
        protos[name] = proto

    b = _Builder()
    graph_inputs = [onnx.helper.make_tensor_value_info(n, _elem_type(a.dtype), [f"{n}_{i}" for i in range(a.dim())])
                    for n, a in zip(input_names, args)]
    pro_feeds = [input_names[i] for i in plan.prologue_in]
    if plan.epilogue is None:
        pro, epi = b.add(protos["prologue"], "prologue/", pro_feeds), []
    else:  # the epilogue's h is the last layer's, added below (the nodes are sorted at the end)
        ends = b.add(protos["ends"], "ends/", [*pro_feeds, "layered/h_last"])
        pro, epi = ends[:len(pro_out)], ends[len(pro_out):]
    stacked = {}
    for group, names in zip(("layers", "mem"), plan.names):
        for n in names:
            t = getattr(m, group)[n]
            stacked[n, group] = b.weight(f"model.{group}.{n}")
            bound[f"model.{group}.{n}"] = [ir.DataType(_elem_type(t.dtype)).name, list(t.shape)]
    axis0 = b.const("layered/axis0", np.array([0], np.int64))
    h, per_layer = pro[0], []
    for l in range(L):
        start = b.const(f"layered/start{l}", np.array([l], np.int64))
        end = b.const(f"layered/end{l}", np.array([l + 1], np.int64))
        feeds = []
        for src in plan.layer_in:
            if src[0] == "h":
                feeds.append(h)
            elif src[0] == "tables":
                feeds += pro[1:1 + n_tables]
            elif src[0] == "mask":
                feeds.append(pro[-1])
            elif src[0] == "none":
                continue
            elif src[0] == "layer":
                feeds.append(b.node("Slice", [input_names[src[1]], start, end, axis0],
                                    f"layered/l{l}/{input_names[src[1]]}"))
            else:
                feeds.append(input_names[src[1]])
        for (n, group), full in stacked.items():
            feeds.append(b.node("Slice", [full, start, end, axis0], f"layered/l{l}/{group}.{n}"))
        outs = b.add(protos["layer"], f"l{l}/", feeds)
        h = outs[0]
        per_layer.append(outs)
    if plan.epilogue is not None:
        b.node("Identity", [h], "layered/h_last")
    outputs = []
    for k, (kind, j) in enumerate(plan.outputs):
        name = f"layered_out{k}"
        if kind == "epi":
            b.node("Identity", [epi[j]], name)
            outputs.append((name, protos["ends"].graph.output[len(pro_out) + j].type))
        else:
            b.node("Concat", [outs[j] for outs in per_layer], name, axis=0)
            stacked_type = onnx.TypeProto()
            stacked_type.CopyFrom(protos["layer"].graph.output[j].type)
            stacked_type.tensor_type.shape.dim[0].Clear()
            stacked_type.tensor_type.shape.dim[0].dim_value = L  # (1, ...) per layer -> (L, ...)
            outputs.append((name, stacked_type))
    model = ir.serde.deserialize_model(b.model(graph_inputs, outputs, protos["layer"]))
    bind_weights(model, bound, cell_tensors(cell))
    return model


def _piece_dims(cell, dims: dict) -> tuple[dict, dict, dict]:
    """torch.export dims of the layer piece's h, rope tables and mask. The segment's slot is a dim of
    its own there (>= M + 1, as in the graph: the layer never sees the width)."""
    from torch.export import Dim
    if isinstance(cell, SegmentCell):
        batch, width = dims["input_ids"][0], dims["input_ids"][1]
        M = cell.model.cfg.armt.num_mem_tokens
        slot = Dim("slot", min=M + 1, max=int(getattr(width, "max", 1 << 20)) + M)
        return {1: batch, 2: slot}, {1: batch, 3: slot}, {1: batch, 3: slot, 4: slot}
    positions = dims["positions"]
    batch = positions[0]
    cache = dims["k_cache_in"]
    if 1 in positions:  # decode: n new places
        n = positions[1]
        return {0: batch, 1: n}, {1: batch, 3: n}, {0: batch, 2: n, 3: cache[3]}
    return {0: batch}, {1: batch}, {0: batch, 3: cache[3]}  # memory_write: the M memory places


def _epilogue_h_dims(cell, dims: dict) -> dict:
    """torch.export dims of the epilogue's h, in the dims of the graph inputs it is traced with."""
    batch, places = dims["positions"][0], dims["positions"][1]  # segment: the slot; decode: the new places
    return {1: batch, 2: places} if isinstance(cell, SegmentCell) else {0: batch, 1: places}


def try_translate_layered(cell, args, dims, input_names, export):
    """translate_layered, or None when the cell has no plan here, or its pieces cannot be traced or
    stitched (logged: the caller then traces it whole, and a whole trace's error is the user's)."""
    from exporter.trace_cache import WeightMismatch
    if not layered(cell):
        return None
    try:
        return translate_layered(cell, args, dims, input_names, export)
    except (_NotLayerable, ExportError, WeightMismatch) as exc:
        log.info("tracing the graph whole: %s", str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)
        return None


class _NotLayerable(Exception):
    """The cell's pieces cannot be stitched (the reason is the message): it is traced whole."""


def _elem_type(dtype: torch.dtype) -> int:
    """The ONNX element type of a torch dtype (graphs.dtypes.ONNX_ELEMENT_TYPES)."""
    name = dtype_name(dtype)
    if name not in ONNX_ELEMENT_TYPES:
        raise _NotLayerable(f"no ONNX type for {dtype}")
    return ONNX_ELEMENT_TYPES[name]


# ------------------------------------------------------------------------------------------ stitching
class _Builder:
    """An ONNX graph assembled from traced pieces, each added under its own name prefix."""

    def __init__(self):
        self.nodes, self.inits, self.value_info, self.opsets = [], {}, [], {}

    def add(self, proto, prefix: str, feeds: list[str]) -> list[str]:
        """Append the nodes of piece `proto` with its graph inputs bound to `feeds` -> its output names.
        Its values and constants are renamed `prefix` + name; weight placeholders (bound to the torch
        tensors afterwards) keep their names, so the pieces share them."""
        import onnx
        g = proto.graph
        if len(feeds) != len(g.input):
            raise _NotLayerable(f"its {prefix.rstrip('/')} piece has {len(g.input)} inputs where {len(feeds)} are fed")
        for op in proto.opset_import:
            if self.opsets.setdefault(op.domain, op.version) != op.version:
                raise _NotLayerable(f"its pieces import {op.domain or 'ai.onnx'} at two versions")
        ren = {i.name: f for i, f in zip(g.input, feeds)}
        for t in g.initializer:
            if t.data_type == onnx.TensorProto.UINT8 and list(t.dims) == [0]:  # serialize_unbound's placeholder
                ren[t.name] = t.name
                self.inits.setdefault(t.name, t)
                continue
            c = onnx.TensorProto()
            c.CopyFrom(t)
            c.name = ren[t.name] = prefix + t.name
            self.inits[c.name] = c
        for n in g.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
                raise _NotLayerable(f"its {prefix.rstrip('/')} piece has a subgraph ({n.op_type})")
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.input[:] = [ren.get(x, prefix + x) if x else "" for x in n.input]
            c.output[:] = [ren.setdefault(o, prefix + o) if o else "" for o in n.output]
            c.name = prefix + n.name
            self.nodes.append(c)
        for v in g.value_info:
            if v.name in ren and ren[v.name].startswith(prefix):
                c = onnx.ValueInfoProto()
                c.CopyFrom(v)
                c.name = ren[v.name]
                self.value_info.append(c)
        return [ren.get(o.name, prefix + o.name) for o in g.output]

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        import onnx
        self.nodes.append(onnx.helper.make_node(op, inputs, [output], name=f"node_{output}", **attrs))
        return output

    def const(self, name: str, array: np.ndarray) -> str:
        import onnx
        self.inits.setdefault(name, onnx.numpy_helper.from_array(array, name))
        return name

    def weight(self, name: str) -> str:
        """A stacked model weight: a placeholder initializer, bound to the torch tensor afterwards."""
        import onnx
        self.inits.setdefault(name, onnx.helper.make_tensor(name, onnx.TensorProto.UINT8, [0], b"", raw=True))
        return name

    def model(self, inputs, outputs, first):
        """The ModelProto: graph `inputs` (ValueInfoProtos), `outputs` [(name, TypeProto)], the IR
        version and producer of piece `first`."""
        import onnx
        out_info = []
        for name, type_proto in outputs:
            v = onnx.ValueInfoProto(name=name)
            v.type.CopyFrom(type_proto)
            out_info.append(v)
        graph = onnx.helper.make_graph(_topological(self.nodes), "main_graph", inputs, out_info,
                                       initializer=list(self.inits.values()), value_info=self.value_info)
        return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v)
                                                            for d, v in sorted(self.opsets.items())],
                                      ir_version=first.ir_version, producer_name=first.producer_name,
                                      producer_version=first.producer_version)


def _topological(nodes: list) -> list:
    """`nodes` in an order where every value is produced before it is used (ONNX requires one), as
    close to the given order as that allows (the earliest ready node first)."""
    import heapq
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    users: dict[int, list[int]] = {}
    waiting = []
    for i, n in enumerate(nodes):
        deps = {producer[x] for x in n.input if x in producer}
        waiting.append(len(deps))
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users.get(i, ()):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise _NotLayerable("the stitched graph has a cycle")
    return order
