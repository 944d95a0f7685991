"""Exporter pieces that need no export: bounds, manifest checks, portability, synthetic models."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from exporter.bounds import BOUNDS, KINDS, bound_for, compare
from exporter.manifest import (FORMAT_VERSION, GraphRecord, Manifest, TensorSpec, load_manifest, record_files,
                               write_manifest)
from exporter.portability import ALLOWED_OPS, check_portable
from exporter.provenance import graph_metadata
from graphs.contracts import contract, model_dims
from exporter.synthetic_model import synthetic_model
from graphs.errors import ExportError
from tests.helpers import tiny_config


# ----------------------------------------------------------------------------------- bounds
def test_bounds_table_covers_every_precision_and_kind():
    for p in ("fp32", "fp16", "bf16"):
        for k in KINDS:
            assert (p, k) in BOUNDS
    assert bound_for("fp32", "logits").rel <= 1e-5
    assert bound_for("fp16", "A").rel < bound_for("bf16", "A").rel
    with pytest.raises(KeyError):
        bound_for("int8", "logits")


def test_compare_flags_nan_and_misses():
    ref = np.linspace(-1, 1, 1000).astype(np.float32)
    assert compare("x", "logits", "fp32", ref + 1e-7, ref).ok
    assert not compare("x", "logits", "fp32", ref + 1e-3, ref).ok
    bad = ref.copy()
    bad[3] = np.nan
    c = compare("x", "logits", "fp16", bad, ref)
    assert not c.ok and "NaN" in c.note
    assert not compare("x", "logits", "fp32", ref[:10], ref).ok  # shape mismatch
    flags = np.array([True, False])
    assert compare("w", "written", "fp32", flags, flags).ok
    assert not compare("w", "written", "fp32", ~flags, flags).ok
    assert compare("h", "hidden_out", "bf16", torch.ones(3, dtype=torch.bfloat16), torch.ones(3)).ok


def test_tensor_kinds_of_outputs():
    cfg = tiny_config("llama")
    for role in ("segment", "diagonal_step"):
        for o in contract(cfg, role, "fp16").outputs:
            assert o.kind in KINDS


# ----------------------------------------------------------------------------------- manifest
def _fake_export(tmp_path):
    """A one-graph export whose graph is an empty ONNX model carrying the provenance metadata."""
    cfg = tiny_config("llama")
    proto = helper.make_model(helper.make_graph([], "g", [], []))
    helper.set_model_props(proto, graph_metadata("id-1", cfg.base.hf_config, cfg.armt.to_dict(), model_dims(cfg),
                                                 "fp32", "segment", ("segment",)))
    (tmp_path / "segment.onnx").write_bytes(proto.SerializeToString())
    (tmp_path / "weights.data").write_bytes(b"\0" * 64)
    c = contract(cfg, "segment", "fp32")
    g = GraphRecord("segment", "segment.onnx", ("weights.data",), c.inputs, c.outputs, "fp32", 18)
    m = Manifest(precision="fp32", opset=18, model={"config": cfg.base.hf_config, "armt_config": cfg.armt.to_dict(),
                                                    "model_id": "id-1"},
                 dims=model_dims(cfg), graphs={"segment": g}, files=record_files(tmp_path, ["segment.onnx", "weights.data"]),
                 versions={}, samples=None, polygraphy_script=None)
    write_manifest(tmp_path, m)
    return m


def test_manifest_round_trip(tmp_path):
    m = _fake_export(tmp_path)
    back = load_manifest(tmp_path)
    assert back.graphs == m.graphs and back.files == m.files
    assert back.model_config() == tiny_config("llama")
    assert back.graph("segment").input("A_in").concrete_shape({"batch": 2}) == (3, 2, 24, 32)
    assert back.graph_path("segment") == tmp_path / "segment.onnx"
    with pytest.raises(ExportError, match="no 'diagonal_step' graph"):
        back.graph("diagonal_step")


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "weights.data").write_bytes(b"\1" * 64), "weights.data was altered"),
    (lambda d: (d / "weights.data").write_bytes(b"\0" * 65), "weights.data was altered"),
    (lambda d: (d / "segment.onnx").unlink(), "segment.onnx is missing"),
    (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda d: (d / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda d: _edit(d, format_version=FORMAT_VERSION + 1), "format version"),
    (lambda d: _edit(d, drop_file="weights.data"), "lists no checksum"),
    (lambda d: _edit(d, add_file="../outside.bin"), "outside the export directory"),
    (lambda d: _edit(d, precision="fp8"), "unknown precision"),
    (lambda d: _edit(d, drop_key="graphs"), "malformed"),
])
def test_damaged_manifest_dirs_are_refused(tmp_path, damage, message):
    _fake_export(tmp_path)
    damage(tmp_path)
    with pytest.raises(ExportError, match=message) as info:
        load_manifest(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_export_dir_is_refused(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        load_manifest(tmp_path / "nope")


def test_size_check_without_checksums(tmp_path):
    _fake_export(tmp_path)
    (tmp_path / "weights.data").write_bytes(b"\1" * 64)  # same size, other bytes
    load_manifest(tmp_path, verify_checksums=False)  # only sizes are checked then
    with pytest.raises(ExportError):
        load_manifest(tmp_path, verify_checksums=True)


def _edit(d, format_version=None, drop_file=None, add_file=None, precision=None, drop_key=None):
    raw = json.loads((d / "manifest.json").read_text())
    if format_version is not None:
        raw["format_version"] = format_version
    if drop_file:
        raw["files"].pop(drop_file)
    if add_file:
        raw["files"][add_file] = {"sha256": "0" * 64, "bytes": 1}
    if precision:
        raw["precision"] = precision
    if drop_key:
        raw.pop(drop_key)
    (d / "manifest.json").write_text(json.dumps(raw))


# ----------------------------------------------------------------------------------- portability
def _graph_with(op_type, domain=""):
    node = helper.make_node(op_type, ["x"], ["y"], name="the_node", domain=domain)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    imports = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(g, opset_imports=imports)


@pytest.mark.parametrize("op,domain,message", [
    ("NonZero", "", "data-dependent"),
    ("RotaryEmbedding", "", "fp16/bf16 graphs at opset 23"),
    ("Attention", "", "fp32 on TensorRT"),
    ("FusedMatMul", "com.microsoft", "com.microsoft::FusedMatMul"),
    ("Einsum", "", "allow-list"),
])
def test_portability_refuses_with_node_and_op(op, domain, message):
    with pytest.raises(ExportError, match=message) as info:
        check_portable(_graph_with(op, domain), "segment")
    assert "the_node" in str(info.value)


def test_portability_accepts_plain_ops():
    check_portable(_graph_with("Relu"), "segment")
    assert "NonZero" not in ALLOWED_OPS and "Attention" not in ALLOWED_OPS


# ----------------------------------------------------------------------------------- synthetic
def test_synthetic_model_dtypes_and_determinism():
    a = synthetic_model("tiny", torch.float16, seed=1, num_hidden_layers=2)
    b = synthetic_model("tiny", torch.float16, seed=1, num_hidden_layers=2)
    assert a.layers["qkv"].dtype == torch.float16 and a.globals["embed"].dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in a.mem.values())  # memory weights stay fp32
    assert torch.equal(a.layers["qkv"], b.layers["qkv"]) and a.model_id() == b.model_id()
    assert torch.equal(a.layers["attn_norm"], torch.ones_like(a.layers["attn_norm"]))
    assert a.inv_freq is not None and a.inv_freq.device.type == "cpu" and torch.isfinite(a.inv_freq).all()
    ids = torch.randint(0, a.cfg.base.vocab_size, (1, 40))
    with torch.no_grad():
        out = a(ids)
    assert torch.isfinite(out.logits).all()


# ----------------------------------------------------------------------------------- samples / masks
def test_plans_and_output_masks():
    from exporter.samples import sample_batch
    from runtimes.execute import plan_run
    from runtimes.torch_runner import TorchRunner
    from tests.helpers import tiny_model
    model = tiny_model("llama")
    ids, mask = sample_batch(model.cfg, 6)
    seg_c = contract(model.cfg, "segment")
    seg = plan_run(TorchRunner(model, "segment"), ids, mask, segment_size=6)
    assert len(seg.feeds) == 3 and [f["input_ids"].shape[1] for f in seg.feeds] == [6, 6, 3]
    f0 = {**seg.feeds[0], **seg.initial}
    m = seg_c.output_mask("hidden", f0)
    assert m.shape == (2, 6, 1) and m[0].all() and m[1].sum() == 4  # row 1 holds 4 tokens, then padding
    assert not seg_c.output_mask("hidden", {**seg.feeds[1], **seg.initial})[1].any()  # row 1 ended
    assert seg_c.output_mask("A_out", f0) is None
    diag_c = contract(model.cfg, "diagonal_step")
    diag = plan_run(TorchRunner(model, "diagonal_step"), ids, mask, segment_size=6)
    L = model.cfg.base.n_layers
    assert len(diag.feeds) == 3 + L - 1
    f = {**diag.feeds[L], **diag.initial}
    hm = diag_c.output_mask("hidden_out", f)
    assert hm.shape == (L, 2, 9, 1)
    assert not hm[0].any()  # layer 0 idle at step L (S = 3 segments)
    assert hm[L - 1, 0].all() and not hm[L - 1, 1].any()  # row 1 has no tokens in segment 1


def test_widen_by_reference_spread_is_capped():
    from exporter.bounds import NOISE_CAP, widen
    ref = np.linspace(1, 2, 100)
    c = compare("A_out", "A", "fp32", ref * (1 + 3e-5), ref)
    assert not c.ok
    noise = compare("A_out", "A", "fp32", ref * (1 + 1e-5), ref)
    w = widen(c, noise)
    assert w.ok and w.bound.rel == pytest.approx(4 * noise.rel) and "widened" in w.note
    huge = compare("A_out", "A", "fp32", ref * 1.5, ref)
    assert widen(c, huge).bound.rel == pytest.approx(NOISE_CAP * 1e-5)  # never beyond the cap
    assert widen(c, None) is c
    flags = compare("w", "written", "fp32", np.array([True]), np.array([False]))
    assert widen(flags, noise) is flags  # exact tensors are never widened
    bad = compare("x", "logits", "fp32", np.array([np.nan]), np.array([1.0]))
    assert not widen(bad, noise).ok


def test_manifest_records_the_attention_variant_of_a_graph():
    """GraphRecord.attention ("causal", "masked" or ""), from the graph's Attention nodes, round-trips;
    an entry of a manifest written before it reads as ""."""
    from exporter.portability import attention_variant
    from onnx import TensorProto
    cfg = tiny_config("llama")
    c = contract(cfg, "segment_causal", "fp16")
    g = GraphRecord("segment_causal", c.file, ("weights.data",), c.inputs, c.outputs, "fp16", 23, attention="causal")
    assert GraphRecord.from_dict(g.to_dict()) == g and c.file == "segment_causal.onnx"
    old = g.to_dict()
    del old["attention"]
    assert GraphRecord.from_dict(old).attention == ""

    def graph(*nodes):
        x = [helper.make_tensor_value_info(n, TensorProto.FLOAT16, [1]) for n in ("q", "k", "v")]
        return helper.make_model(helper.make_graph(list(nodes), "g", x, [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT16, [1])]))
    causal = helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=1)
    masked = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"])
    both = helper.make_node("Attention", ["q", "k", "v", "m"], ["y"], is_causal=1)
    assert [attention_variant(graph(n)) for n in (causal, masked, both)] == ["causal", "masked", "mixed"]
    assert attention_variant(graph()) == "" and attention_variant(graph(causal, masked)) == "mixed"
