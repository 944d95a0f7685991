"""torch.onnx's decomposition step without its re-trace (exporter/decompositions.py): the translated
graphs are torch's own (same nodes, attributes, initializers and wiring; names aside), the re-trace
is really skipped where the module says, and anything else falls back to torch's step."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from torch.onnx._internal.exporter import _fx_passes

from exporter import decompositions, trace
from tests.helpers import tiny_model, tiny_rmt


def structure(model: ir.Model):
    """The graph up to names: a multiset of node keys, each hashing its op, domain, attributes and the
    keys of its inputs (graph inputs by name, initializers by their bytes), and the graph's input and
    output types with the keys of the outputs."""
    g = onnx.load_from_string(ir.serde.serialize_model(model).SerializeToString()).graph
    key = {i.name: "input:" + i.name for i in g.input}
    for t in g.initializer:
        bare = onnx.TensorProto()
        bare.CopyFrom(t)
        bare.name = ""
        key[t.name] = "init:" + hashlib.sha256(bare.SerializeToString(deterministic=True)).hexdigest()
    nodes = collections.Counter()
    for n in g.node:
        attrs = []
        for a in sorted(n.attribute, key=lambda a: a.name):
            bare = onnx.AttributeProto()
            bare.CopyFrom(a)
            if bare.HasField("t"):
                bare.t.name = ""
            attrs.append(bare.SerializeToString(deterministic=True))
        k = hashlib.sha256(repr((n.op_type, n.domain, [key.get(x, "?" + x) for x in n.input], attrs)).encode()).hexdigest()
        nodes[k] += 1
        for j, out in enumerate(n.output):
            key[out] = f"{k}:{j}"
    io = ([(i.name, str(i.type)) for i in g.input], [(key[o.name], str(o.type)) for o in g.output])
    return nodes, io


@pytest.fixture
def retraces(monkeypatch):
    """Count torch's re-traces (ExportedProgram.run_decompositions calls)."""
    calls = []
    original = torch.export.ExportedProgram.run_decompositions

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", counting)
    return calls


def _translate_both(translate, retraces, monkeypatch):
    """One translate() call with torch's re-trace and one with direct decompositions: for each, the
    final graph, the graph of every torch.onnx.export call in it, and the re-traces it ran."""
    calls = []
    export = torch.onnx.export

    def recording(*args, **kwargs):
        program = export(*args, **kwargs)
        calls.append(program.model)
        return program

    monkeypatch.setattr(torch.onnx, "export", recording)
    runs = []
    with trace.shared_op_registry():
        for direct in (False, True):
            n_calls, n_retraces = len(calls), len(retraces)
            with decompositions.direct_decompositions() if direct else contextlib.nullcontext():
                graph = translate()
            runs.append((graph, calls[n_calls:], len(retraces) - n_retraces))
    return runs


CELLS = [  # model, role, precision: stitched and whole graphs, written-out and fused attention, RMT
    ("llama", "segment", "fp32"),
    ("llama", "memory_write", "fp16"),
    ("gpt2", "diagonal_step", "fp32"),
    ("llama", "segment_causal", "bf16"),
    ("rmt-llama", "rmt_decode", "fp32"),
]


@pytest.mark.slow
@pytest.mark.parametrize("arch,role,precision", CELLS)
def test_the_graphs_are_torchs_and_no_retrace_runs(arch, role, precision, retraces, monkeypatch):
    """Every torch.onnx.export call of the role (a stitched role's pieces, or the whole cell) gives
    torch's graph, and so does the role; on torch 2.13 (the version pinned for CPU hosts) without a
    single re-trace. (torch 2.11 captures a data-dependent size in the stitched roles' epilogue: that
    piece takes torch's re-trace, whose pieces do not stitch there, and the cell is traced whole, as
    with torch's step alone.)"""
    model = tiny_rmt("llama", num_hidden_layers=2) if arch.startswith("rmt") else tiny_model(arch, num_hidden_layers=2)
    if precision != "fp32":
        model.cast(torch.float16 if precision == "fp16" else torch.bfloat16)
    opset = trace.default_opset(precision)
    module = trace.cell_module(model, role, precision, opset)
    (full, full_calls, n_full), (direct, direct_calls, n_direct) = _translate_both(
        lambda: trace._translate(module, model, role, precision, opset), retraces, monkeypatch)
    assert n_full == len(full_calls) >= 1  # torch re-traces every call
    assert len(direct_calls) == len(full_calls)
    for a, b in zip(direct_calls, full_calls):
        assert structure(a) == structure(b)
    assert structure(direct) == structure(full)
    assert n_direct < len(direct_calls)  # at least one call without torch's re-trace
    if torch.__version__.startswith("2.13."):
        stitched = role != "diagonal_step" and not arch.startswith("rmt")
        assert (len(direct_calls), n_direct) == (2 if stitched else 1, 0)


class _Rewritten(torch.nn.Module):
    """Each op the module rewrites, in the forms the cells trace (reshape that views and one that
    must copy, `to` of the same and of another dtype in a chain, rsub, | and &)."""

    def forward(self, x, keep, extra):
        b, p, d = x.shape
        flat = x.reshape(b, p * d)  # a view
        moved = x.transpose(1, 2).reshape(b, d * p)  # not viewable: clone + _unsafe_view
        same = x.float().float()  # identities
        half = (1 - x).to(torch.float16)  # rsub, a cast
        both = (keep | extra) & keep
        return flat + moved, torch.where(both[..., None], same, 0.0), half


def _export(module, args, dims):
    return torch.onnx.export(module.eval(), args, dynamic_shapes=dims, dynamo=True, optimize=False, verbose=False,
                             opset_version=18).model


def _run(model: ir.Model, feeds):
    import onnxruntime as ort
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: v for i, v in zip(session.get_inputs(), feeds)})


def test_each_rewritten_op_gives_torchs_graph_and_values(retraces, monkeypatch):
    module = _Rewritten()
    batch = torch.export.Dim("batch", min=1, max=64)
    args = (torch.randn(3, 5, 4), torch.tensor([[True] * 5, [False] * 5, [True, False] * 2 + [True]]),
            torch.zeros(3, 5, dtype=torch.bool))
    dims = {"x": {0: batch}, "keep": {0: batch}, "extra": {0: batch}}
    (full, _, n_full), (direct, _, n_direct) = _translate_both(lambda: _export(module, args, dims), retraces,
                                                               monkeypatch)
    assert (n_full, n_direct) == (1, 0)
    assert structure(direct) == structure(full)
    for b in (1, 3):
        feeds = [a[:b].numpy() for a in args]
        got = _run(direct, feeds)
        want = module(*(a[:b] for a in args))
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w.numpy())  # exact: the same elementwise ops in fp32/fp16


class _NanToNum(torch.nn.Module):
    def forward(self, x):
        return torch.nan_to_num(x) * 2


def test_an_op_torch_decomposes_falls_back_to_torchs_step(retraces, caplog, monkeypatch):
    args, dims = (torch.randn(2, 3),), {"x": {0: torch.export.Dim("batch", min=1, max=64)}}
    with caplog.at_level(logging.DEBUG, logger="armt.export"):
        (full, _, n_full), (direct, _, n_direct) = _translate_both(lambda: _export(_NanToNum(), args, dims),
                                                                   retraces, monkeypatch)
    assert (n_full, n_direct) == (1, 1)
    assert "torch decomposes aten.nan_to_num.default" in caplog.text
    assert structure(direct) == structure(full)


class _Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return x * self.calls


class _NonZero(torch.nn.Module):
    def forward(self, x):
        return x.nonzero()


@pytest.mark.parametrize("module,why", [(_Counting(), "mutates"), (_NonZero(), "unbacked")])
def test_a_mutating_or_data_dependent_program_is_left_to_torch(module, why):
    """Mutations, and sizes only known at run time (torch 2.11 captured one in a stitched role's
    epilogue, which its re-trace then wrote otherwise)."""
    program = torch.export.export(module, (torch.randn(2),), strict=False)
    with trace.shared_op_registry():
        from torch.onnx._internal.exporter import _registration
        registered, table = decompositions._tables(_registration.ONNXRegistry.from_torchlib(18))
    with pytest.raises(decompositions._Fallback, match=why):
        decompositions._check(program, registered, table)


def test_forced_full_decompositions_and_the_block_restores_torch(monkeypatch, retraces):
    original = _fx_passes.decompose_with_registry
    with decompositions.direct_decompositions():
        assert _fx_passes.decompose_with_registry is not original
    assert _fx_passes.decompose_with_registry is original
    monkeypatch.setenv(decompositions.ENV_FULL, "1")
    args, dims = (torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)), None
    with trace.shared_op_registry(), decompositions.direct_decompositions():
        assert _fx_passes.decompose_with_registry is original
        _export(_Rewritten(), args, dims)
    assert len(retraces) == 1
