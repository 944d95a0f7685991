"""The ATen -> ONNX op registry shared by the torch.onnx.export calls of a process
(exporter/trace.py shared_op_registry): built once per opset, the same graphs byte for byte."""

import onnx_ir as ir
import pytest
import torch
from torch.onnx._internal.exporter import _registration

from exporter import trace
from tests.helpers import tiny_model


@pytest.fixture
def builds(monkeypatch):
    """Count the registries torch.onnx builds (the original from_torchlib's calls), from an empty cache."""
    calls = []
    build = _registration.ONNXRegistry.__dict__["from_torchlib"].__func__

    def counting(cls, *args, **kwargs):
        calls.append(args or tuple(kwargs.values()))
        return build(cls, *args, **kwargs)

    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(counting))
    monkeypatch.setattr(trace, "_OP_REGISTRIES", {})
    return calls


def test_one_registry_serves_every_export_call_of_a_process(builds):
    model = tiny_model("llama", num_hidden_layers=2)
    for role in ("segment", "lm_head"):  # three torch.onnx.export calls: the segment's ends and layer, the head
        trace.trace_graph(model, role, "fp32", cache=False)
    assert len(builds) == 1
    assert set(trace._OP_REGISTRIES) == {trace.DEFAULT_OPSET}
    patched = _registration.ONNXRegistry.__dict__["from_torchlib"]
    with trace.shared_op_registry():
        assert _registration.ONNXRegistry.__dict__["from_torchlib"] is not patched
    assert _registration.ONNXRegistry.__dict__["from_torchlib"] is patched  # as found after the block


def test_outside_the_block_every_call_builds_its_own(builds):
    model = tiny_model("llama", num_hidden_layers=2)
    module = trace.cell_module(model, "lm_head", "fp32", trace.DEFAULT_OPSET)
    for _ in range(2):
        trace._translate(module, model, "lm_head", "fp32", trace.DEFAULT_OPSET)
    assert len(builds) == 2


@pytest.mark.parametrize("arch,role,precision", [("llama", "segment", "fp32"), ("gpt2", "decode", "fp16")])
def test_the_shared_registry_changes_no_graph(arch, role, precision):
    """The translated graph (before the optimizer) is the same bytes with a registry built for the
    call and with the process's shared one, at both opsets (GPT-2's GELU has an opset-20 variant:
    a registry of the wrong opset would change that graph)."""
    model = tiny_model(arch, num_hidden_layers=2)
    if precision != "fp32":
        model.cast(torch.float16)
    opset = trace.default_opset(precision)
    module = trace.cell_module(model, role, precision, opset)
    own = trace._translate(module, model, role, precision, opset)
    with trace.shared_op_registry():
        trace._translate(module, model, role, precision, opset)  # builds the shared one
        shared = trace._translate(module, model, role, precision, opset)
    assert ir.serde.serialize_model(own).SerializeToString() == ir.serde.serialize_model(shared).SerializeToString()
