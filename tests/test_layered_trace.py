"""Layer-once tracing (exporter/layered.py): the per-layer roles are traced as their ends and one
layer and stitched in ONNX; the stitched graph computes what the whole trace computes."""

import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from exporter import layered, trace
from exporter.bounds import compare
from graphs.cells import cell_for
from graphs.contracts import contract
from tests.helpers import tiny_model, tiny_rmt

LAYERED = ("segment", "decode", "memory_write")


def _run(model_ir, feeds):
    sess = ort.InferenceSession(ir.serde.serialize_model(model_ir).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: feeds[k] for k, i in enumerate(sess.get_inputs())})


def _feeds(model, role, monkeypatch, batch, extra_width):
    """Example inputs of `role` at another batch and width than the trace's (numpy, input order),
    with a written memory (z > 0.5: its reads are well-conditioned) and random caches: the layers'
    state inputs matter."""
    width = trace.trace_width(model) + extra_width
    monkeypatch.setattr(trace, "TRACE_BATCH", batch)
    monkeypatch.setattr(trace, "trace_width", lambda m: width)
    args = trace.example_args(model, role, "fp32")
    monkeypatch.undo()
    g = torch.Generator().manual_seed(batch)
    out = {}
    for spec, a in zip(contract(model.cfg, role).inputs, args):
        if spec.name == "z_in":
            a = torch.rand(a.shape, generator=g) + 0.5
        elif spec.name == "written_in":
            a = torch.ones_like(a)
        elif a.is_floating_point():
            a = torch.randn(a.shape, generator=g) * 0.5
        out[spec.name] = a.numpy()
    return list(out.values())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("role", LAYERED)
def test_the_stitched_graph_computes_what_the_whole_trace_computes(arch, role, monkeypatch):
    model = tiny_model(arch)
    stitched = trace.trace_graph(model, role, "fp32", cache=False)
    with monkeypatch.context() as mp:
        mp.setattr(layered, "layered", lambda cell: False)
        whole = trace.trace_graph(model, role, "fp32", cache=False)
    c = contract(model.cfg, role)
    cell = cell_for(model, role)
    for batch, extra in ((2, 0), (3, 2), (1, 5)):  # the trace's shape and two others
        feeds = _feeds(model, role, monkeypatch, batch, extra)
        got, want = _run(stitched, feeds), _run(whole, feeds)
        with torch.no_grad():
            ref = cell(*(torch.from_numpy(f) for f in feeds))
        for spec, g_, w_, r_ in zip(c.outputs, got, want, ref):
            assert compare(spec.name, spec.kind, "fp32", g_, w_).ok, (role, spec.name, batch)
            assert compare(spec.name, spec.kind, "fp32", g_, r_.numpy()).ok, (role, spec.name, batch)


def test_the_layer_is_traced_once_whatever_the_layer_count(monkeypatch):
    """Two torch.onnx.export calls (the ends, the layer) for 2 and for 4 layers; one, the whole cell,
    for 1 layer (nothing to stitch)."""
    calls = []
    real = torch.onnx.export

    def counting(module, *a, **k):
        calls.append(type(module).__name__)
        return real(module, *a, **k)

    monkeypatch.setattr(torch.onnx, "export", counting)
    for n_layers, want in ((2, 2), (4, 2), (1, 1)):
        calls.clear()
        trace.trace_graph(tiny_model("llama", num_hidden_layers=n_layers), "segment", "fp32", cache=False)
        assert len(calls) == want, (n_layers, calls)
    assert calls == ["SegmentCell"]


def test_which_cells_are_stitched():
    model, rmt = tiny_model("llama"), tiny_rmt("llama")
    for role in LAYERED:
        assert layered.layered(cell_for(model, role))
    for role in ("diagonal_step", "lm_head"):
        assert not layered.layered(cell_for(model, role))  # the diagonal step batches its layers already
    for role in ("rmt_segment", "rmt_decode", "rmt_memory_write"):
        assert not layered.layered(cell_for(rmt, role))


@pytest.mark.slow
@pytest.mark.parametrize("arch,role,precision", [("llama", "segment", "fp32"), ("llama", "segment", "fp16"),
                                                 ("llama", "diagonal_step", "fp32"), ("gpt2", "decode", "fp32")])
def test_the_skipped_rewrite_rules_change_no_graph(arch, role, precision):
    """The optimizer without trace.SKIPPED_REWRITE_RULES (quadratic, never firing here) writes the
    graph it writes with them, byte for byte."""
    model = tiny_model(arch)
    if precision != "fp32":
        model.cast(torch.float16)
    opset = trace.default_opset(precision)
    translated = trace._translate(trace.cell_module(model, role, precision, opset), model, role, precision, opset)
    graphs = []
    for skip in (True, False):
        copy = ir.serde.deserialize_model(ir.serde.serialize_model(translated))
        program = torch.onnx.ONNXProgram(copy, None)
        if skip:
            with trace._without_quadratic_rules():
                program.optimize()
        else:
            program.optimize()
        graphs.append(ir.serde.serialize_model(program.model).SerializeToString())
    assert graphs[0] == graphs[1]


def test_a_piece_that_does_not_trace_falls_back_to_the_whole_cell(monkeypatch, caplog):
    def broken(self, *args):
        raise RuntimeError("no layer here")

    monkeypatch.setattr(layered._SegmentLayer, "forward", broken)
    model = tiny_model("llama", num_hidden_layers=2)
    with caplog.at_level("INFO", logger="armt.export"):
        graph = trace.trace_graph(model, "segment", "fp32", cache=False)
    assert "tracing the graph whole" in caplog.text
    feeds = [a.numpy() for a in trace.example_args(model, "segment", "fp32")]
    with torch.no_grad():
        ref = cell_for(model, "segment")(*(torch.from_numpy(f) for f in feeds))
    for spec, got, want in zip(contract(model.cfg, "segment").outputs, _run(graph, feeds), ref):
        assert compare(spec.name, spec.kind, "fp32", got, want.numpy()).ok
