"""`armt export` / `build` / `inspect` on tiny LLaMA and GPT-2(wrap_pos) ARMTs, fp32 and fp16 (bf16 too).

Exports are made once per (arch, precision) for the whole session (tracing is the slow part) and
copied where a test changes them.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from armt.cli import main
from exporter import bounds
from exporter.bounds import compare
from exporter.manifest import Manifest, load_manifest, record_files, write_manifest
from exporter.portability import ALLOWED_OPS, FUSED_ALLOWED_OPS
from exporter.samples import load_samples
from exporter.trace import default_opset
from exporter.weights import WEIGHTS_FILE
from graphs.cells import DiagonalStep, SegmentCell
from graphs.contracts import GRAPH_FILES, ROLES_OF_KIND, STEP_ROLES_OF_KIND, causal_roles_of, contract
from graphs.dtypes import compute_dtype, torch_dtype
from graphs.errors import ExportError
from graphs.modeldir import save_model_dir
from graphs.schedule import build_schedule, step_feeds
from graphs.segments import make_slots, row_lengths
from runtimes.validation import export_model
from tests.helpers import tiny_model


def tensor_kind(name):
    return contract(tiny_model().cfg, "diagonal_step").kind(name)

ARCHS = {"llama": {}, "gpt2": {"wrap_pos": True}}
EXPECTED_FILES = {"manifest.json", "segment.onnx", "diagonal_step.onnx", "lm_head.onnx", WEIGHTS_FILE,
                  "sample_feeds.npz", "polygraphy_data_loader.py"}
CAUSAL_FILES = {"segment_causal.onnx", "diagonal_step_causal.onnx"}  # fp16/bf16 at opset 23 only


def expected_files(precision):
    """An export's files: fp32 unchanged; fp16 adds the step graphs' causal variants."""
    return EXPECTED_FILES | (CAUSAL_FILES if precision != "fp32" else set())


def reference_model(arch, precision):
    """The tiny model as exported: same seed, cast to the export precision."""
    return tiny_model(arch, **ARCHS[arch]).cast(torch_dtype(compute_dtype(precision))).eval()


@pytest.fixture(scope="session")
def export_of(tmp_path_factory):
    """(arch, precision) -> export directory, exported once. LLaMA fp32 goes through the CLI."""
    root = tmp_path_factory.mktemp("exports")
    done = {}

    def get(arch, precision, opset=None):
        key = (arch, precision) if opset is None else (arch, precision, opset)
        if key not in done:
            out = root / "-".join(map(str, (arch, precision, opset) if opset else (arch, precision)))
            if key == ("llama", "fp32"):
                model_dir = root / "llama-model"
                save_model_dir(tiny_model(arch, **ARCHS[arch]), model_dir)
                assert main(["export", str(model_dir), "-o", str(out), "--no-decode"]) == 0
            else:
                export_model(tiny_model(arch, **ARCHS[arch]), out, precision=precision, opset=opset, decode=False)
            done[key] = out
        return done[key]

    return get


ROLES = ROLES_OF_KIND["armt"]  # the graphs of an ARMT export (an RMT has its own: tests/test_rmt_ort.py)
STEP_ROLES = STEP_ROLES_OF_KIND["armt"]  # the schedule-driven ones (lm_head: hidden rows -> logits)
CASES = [(a, p) for a in ARCHS for p in ("fp32", "fp16")]


def _ort(path):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _np(t):
    return t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()


# ----------------------------------------------------------------------------------- what is written
@pytest.mark.parametrize("arch,precision", CASES)
def test_export_writes_a_valid_directory(export_of, arch, precision):
    d = export_of(arch, precision)
    assert {p.name for p in d.iterdir()} == expected_files(precision)  # no stray per-graph .data files, no partial dirs
    assert not [p for p in d.parent.iterdir() if ".partial-" in p.name]
    m = load_manifest(d, verify_checksums=True)
    assert m.precision == precision and m.opset == default_opset(precision)
    assert set(m.files) == expected_files(precision) - {"manifest.json"}
    assert m.validation["status"] == "passed"
    for role in (*ROLES, *(causal_roles_of(m.model_config()) if precision != "fp32" else ())):
        v = m.validation["graphs"][role]
        assert v["status"] == "passed" and v["calls"] >= (1 if role == "lm_head" else 3) and v["outputs"]
        assert all(o["ok"] and o["rel"] <= o["bound_rel"] for o in v["outputs"])
    assert m.model_config() == tiny_model(arch, **ARCHS[arch]).cfg
    assert m.model["model_id"] == tiny_model(arch, **ARCHS[arch]).model_id()  # of the fp32 weights as given
    assert {"torch", "onnx", "exporter", "onnxruntime"} <= set(m.versions)
    for role, g in m.graphs.items():
        assert g.file == GRAPH_FILES[role] and g.data_files == (WEIGHTS_FILE,)


@pytest.mark.parametrize("arch,precision", CASES)
def test_graphs_pass_checker_and_carry_the_contract(export_of, arch, precision, tmp_path):
    d = export_of(arch, precision)
    m = load_manifest(d)
    for role, g in m.graphs.items():
        path = d / g.file
        onnx.checker.check_model(str(path), full_check=True)
        inferred = tmp_path / f"{role}.inferred.onnx"
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), strict_mode=True)
        proto = onnx.load(str(inferred), load_external_data=False)
        for values, specs in ((proto.graph.input, g.inputs), (proto.graph.output, g.outputs)):
            assert [v.name for v in values] == [s.name for s in specs]
            for v, s in zip(values, specs):
                tt = v.type.tensor_type
                assert onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name == s.dtype or \
                    (s.dtype == "bfloat16" and tt.elem_type == onnx.TensorProto.BFLOAT16)
                assert tuple(dim.dim_param or dim.dim_value for dim in tt.shape.dim) == s.shape
        # every external tensor lives in the one shared file
        for t in proto.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                assert {e.key: e.value for e in t.external_data}["location"] == WEIGHTS_FILE
        # op allow-list: standard domain only, nothing data-dependent
        ops = {(n.domain, n.op_type) for n in proto.graph.node}
        assert {dom for dom, _ in ops} <= {""}
        allowed = ALLOWED_OPS | FUSED_ALLOWED_OPS if precision != "fp32" else ALLOWED_OPS  # fp16: opset 23, fused
        assert {op for _, op in ops} <= allowed, {op for _, op in ops} - allowed
        if role != "lm_head":  # fp32: attention written out (Softmax); fp16: one Attention node per call
            assert ("Attention" in g.op_counts) == (precision != "fp32") != ("Softmax" in g.op_counts)
        assert sum(g.op_counts.values()) == len(proto.graph.node)


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_precision_rules(export_of, arch):
    """Layers/embeddings/head fp16; memory weights, state and its arithmetic fp32; logits fp32."""
    m = load_manifest(export_of(arch, "fp16"))
    step = m.graph("diagonal_step")
    assert step.input("hidden_in").dtype == "float16" and step.output("hidden_out").dtype == "float16"
    for role, g in m.graphs.items():
        if role == "lm_head":  # hidden rows in, logits out, both float32
            assert g.input("hidden").dtype == "float32" and g.output("logits").dtype == "float32"
            continue
        assert g.input("A_in").dtype == "float32" and g.output("z_out").dtype == "float32"
        assert g.output("hidden").dtype == "float32" and "logits" not in [s.name for s in g.outputs]
    proto = onnx.load(str(m.graph_path("diagonal_step")), load_external_data=False)
    big = [(t.data_type, tuple(t.dims)) for t in proto.graph.initializer if np.prod(t.dims) >= 64]
    cfg = m.model_config()
    L, d, dm = cfg.base.n_layers, cfg.base.d_model, cfg.armt.d_mem
    assert any(dt == onnx.TensorProto.FLOAT16 and len(s) == 3 and s[0] == L for dt, s in big)  # layer stacks
    mem = [dt for dt, s in big if s[-2:] == (d, dm)]  # w_q / w_k (possibly unsqueezed)
    assert onnx.TensorProto.FLOAT in mem  # w_k (the write) and the stored weights: fp32
    # opset 23: the tensor-core read's h Wq runs in fp16 on a cast of W_mq (folded to one constant
    # when small, graphs/memory.py memory_read_fast); no other fp16 memory weight
    assert set(mem) <= {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16} and mem.count(onnx.TensorProto.FLOAT16) <= 1
    assert m.memory_math == ("tensor-core-fp16" if m.opset >= 23 else "fp32")
    stored = {n: p["dtype"] for n, p in m.parameters.items() if n.startswith("mem.")}
    assert stored and set(stored.values()) == {"float32"}, stored


# ----------------------------------------------------------------------------------- numbers
def _state_after_one_segment(model, B, width, seed):
    """Non-zero memory for B rows (row 0 shorter, so not all rows are full)."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.base.vocab_size, (B, width), generator=gen)
    lengths = torch.tensor([max(1, width - 1)] + [width] * (B - 1))
    slot = make_slots(cfg, ids, lengths, uniform=False)[0]
    st = model.zero_state(B)
    t = torch.from_numpy
    with torch.no_grad():
        _, A, z, wr = SegmentCell(model)(t(slot.ids), t(slot.positions), t(slot.key_valid), t(slot.write), st.A,
                                            st.z, st.written)
    return A, z, wr


@pytest.mark.parametrize("arch", ARCHS)
def test_graphs_match_torch_at_other_batches_and_widths(export_of, arch):
    """Dims really are dynamic: batch 1 and 3, widths 1 .. T (not the trace sizes) on ONNX Runtime."""
    d = export_of(arch, "fp32")
    model = reference_model(arch, "fp32")
    cfg = model.cfg
    T = cfg.armt.segment_size
    seg, step = _ort(d / "segment.onnx"), _ort(d / "diagonal_step.onnx")
    for B in (1, 3):
        for W in (1, 4, T):
            A, z, wr = _state_after_one_segment(model, B, T, seed=B * 10 + W)
            ids = torch.randint(0, cfg.base.vocab_size, (B, W + T), generator=torch.Generator().manual_seed(W))
            lengths = torch.tensor([W + T] * B)
            slot = make_slots(cfg, ids, lengths, uniform=False)[1]  # second segment: positions continue
            feeds = {"input_ids": slot.ids, "positions": slot.positions, "key_valid": slot.key_valid,
                     "write": slot.write}
            feeds = {**{k: torch.from_numpy(v) for k, v in feeds.items()}, "A_in": A, "z_in": z, "written_in": wr}
            with torch.no_grad():
                ref = SegmentCell(model)(**feeds)
            got = seg.run(None, {k: _np(v) for k, v in feeds.items()})
            for name, g, r in zip(("hidden", "A_out", "z_out", "written_out"), got, ref):
                c = compare(name, tensor_kind(name), "fp32", g, r)
                assert c.ok, (B, W, c)
        # diagonal step with all layers active at width W = T and a narrower width
        for W in (T, 2):
            L = cfg.base.n_layers
            ids = torch.randint(0, cfg.base.vocab_size, (B, W * (L + 1)), generator=torch.Generator().manual_seed(B))
            slots = make_slots(cfg, ids, row_lengths(ids, None), uniform=True, segment_size=W)
            A, z, wr = _state_after_one_segment(model, B, T, seed=B)
            hidden = torch.randn(L, B, W + cfg.armt.num_mem_tokens, cfg.base.d_model)
            sched = build_schedule("diagonal", L, len(slots))
            f = {k: torch.from_numpy(v) for k, v in step_feeds(sched, slots)[L - 1].items()}
            feeds = {"input_ids": f["input_ids"], "hidden_in": hidden, "positions": f["positions"],
                     "key_valid": f["key_valid"], "active": f["active"], "write": f["write"],
                     "A_in": A, "z_in": z, "written_in": wr}
            with torch.no_grad():
                ref = DiagonalStep(model)(**feeds)
            got = step.run(None, {k: _np(v) for k, v in feeds.items()})
            for name, g, r in zip(("hidden_out", "hidden", "A_out", "z_out", "written_out"), got, ref):
                c = compare(name, tensor_kind(name), "fp32", g, r)
                assert c.ok, (B, W, c)


def _run_named(session, feeds) -> dict:
    """One ORT call, outputs by name (the step graphs return hidden rows; logits come from lm_head)."""
    return dict(zip((o.name for o in session.get_outputs()), session.run(None, feeds)))


@pytest.mark.parametrize("arch", ARCHS)
def test_state_flows_through_graph_io(export_of, arch):
    """A different A_in / written_in / hidden_in changes what the graphs compute; idle steps pass state through."""
    d = export_of(arch, "fp32")
    head = _ort(d / "lm_head.onnx")

    def logits(out):  # the step graph's final-norm hidden rows through the exported lm_head
        return head.run(None, {"hidden": out["hidden"]})[0]

    seg = _ort(d / "segment.onnx")
    feeds = load_samples(d / "sample_feeds.npz", "segment")
    assert feeds["written_in"].any() and np.abs(feeds["A_in"]).max() > 0  # the sample has real memory
    base = _run_named(seg, feeds)
    other = dict(feeds, A_in=feeds["A_in"] * 1.5 + 0.01)
    changed = _run_named(seg, other)
    assert np.abs(logits(changed) - logits(base)).max() > 1e-4
    assert np.abs(changed["A_out"] - base["A_out"]).max() > 1e-6
    empty = _run_named(seg, dict(feeds, written_in=np.zeros_like(feeds["written_in"])))
    assert np.abs(logits(empty) - logits(base)).max() > 1e-4  # memory read switched off

    step = _ort(d / "diagonal_step.onnx")
    feeds = load_samples(d / "sample_feeds.npz", "diagonal_step")
    base = _run_named(step, feeds)
    bumped = _run_named(step, dict(feeds, hidden_in=feeds["hidden_in"] + 0.5))
    assert np.abs(bumped["hidden_out"][1:] - base["hidden_out"][1:]).max() > 1e-4  # layers >= 1 read hidden_in[l - 1]
    assert np.abs(bumped["A_out"] - base["A_out"]).max() > 1e-6  # and write it into their memory
    assert feeds["written_in"][-1].any() and feeds["active"][-1]  # the last layer reads written memory
    changed = _run_named(step, dict(feeds, A_in=feeds["A_in"] * 1.5 + 0.01))
    assert np.abs(logits(changed) - logits(base)).max() > 1e-4
    assert np.abs(changed["hidden_out"] - base["hidden_out"]).max() > 1e-4
    idle = _run_named(step, dict(feeds, active=np.zeros_like(feeds["active"])))
    np.testing.assert_array_equal(idle["hidden_out"], feeds["hidden_in"])
    np.testing.assert_array_equal(idle["A_out"], feeds["A_in"])
    np.testing.assert_array_equal(idle["z_out"], feeds["z_in"])
    np.testing.assert_array_equal(idle["written_out"], feeds["written_in"])


@pytest.mark.parametrize("arch", ARCHS)
def test_idle_layers_cannot_leak_nan_on_onnxruntime(export_of, arch):
    """Step 0 of a run: only layer 0 works; NaN in every hidden_in slot must not reach live outputs."""
    from exporter.samples import sample_batch
    from runtimes.execute import plan_run
    from runtimes.torch_runner import TorchRunner
    d = export_of(arch, "fp32")
    model = reference_model(arch, "fp32")
    ids, mask = sample_batch(model.cfg, model.cfg.armt.segment_size)
    plan = plan_run(TorchRunner(model, "diagonal_step"), ids, mask)
    feeds = {**plan.feeds[0], **plan.initial}
    feeds["hidden_in"] = np.full_like(feeds["hidden_in"], np.nan)
    out = _run_named(_ort(d / "diagonal_step.onnx"), feeds)
    hidden_out, A, z, written = out["hidden_out"], out["A_out"], out["z_out"], out["written_out"]
    assert np.isfinite(A).all() and np.isfinite(z).all() and np.isfinite(hidden_out[0]).all()
    assert written[0].all() and not written[1:].any()
    assert np.isnan(hidden_out[1:]).all()  # idle layers pass their (garbage) buffer through untouched


def test_sample_feeds_are_realistic(export_of):
    d = export_of("llama", "fp32")
    m = load_manifest(d)
    head = load_samples(d / m.samples, "lm_head")  # a step graph's real hidden rows
    assert set(head) == {"hidden"} and head["hidden"].dtype == np.float32 and np.abs(head["hidden"]).max() > 0
    for role in STEP_ROLES:
        feeds = load_samples(d / m.samples, role)
        assert set(feeds) == {t.name for t in m.graph(role).inputs}
        assert not feeds["key_valid"].all()  # a padded row
        assert feeds["written_in"].any() and np.abs(feeds["z_in"]).max() > 0  # memory from earlier segments
        for t in m.graph(role).inputs:
            assert str(feeds[t.name].dtype) == t.dtype


def test_polygraphy_runs_both_graphs_with_the_data_loader(export_of):
    pytest.importorskip("polygraphy")
    d = export_of("llama", "fp32")
    exe = Path(sys.executable).with_name("polygraphy")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "polygraphy"]
    for graph in ("diagonal_step.onnx", "segment.onnx"):
        r = subprocess.run([*cmd, "run", graph, "--onnxrt", "--data-loader-script", "./polygraphy_data_loader.py"],
                           cwd=d, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "PASSED" in r.stdout + r.stderr
        assert "A_in [dtype=float32" in r.stdout + r.stderr


# ----------------------------------------------------------------------------------- refusals
def test_damaged_exports_are_refused_with_one_line(export_of, tmp_path, capsys):
    src = export_of("llama", "fp32")
    cases = {
        "altered": lambda d: _flip_byte(d / WEIGHTS_FILE),
        "missing": lambda d: (d / "diagonal_step.onnx").unlink(),
        "swapped": lambda d: _swap(d / "segment.onnx", d / "diagonal_step.onnx"),
        "no manifest": lambda d: (d / "manifest.json").unlink(),
    }
    for name, damage in cases.items():
        d = tmp_path / name.replace(" ", "_")
        shutil.copytree(src, d)
        damage(d)
        with pytest.raises(ExportError):
            load_manifest(d)
        capsys.readouterr()
        assert main(["inspect", str(d), "--verify"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("armt inspect: error:") and "\n" not in err, err


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _swap(a, b):
    tmp = a.with_suffix(".tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def test_no_validate_export_then_failed_validation_keeps_it(tmp_path, monkeypatch, capsys):
    """--no-validate: validation "not run", samples still from a real (torch) run. Then an
    export with bounds no export can meet: table says MISS, exit 1, the earlier export is untouched."""
    model_dir = tmp_path / "model"
    save_model_dir(tiny_model("llama", num_hidden_layers=1), model_dir)
    out = tmp_path / "export"
    assert main(["export", str(model_dir), "-o", str(out), "--no-validate", "--no-decode"]) == 0
    assert "validation not run" in capsys.readouterr().out
    m = load_manifest(out)
    assert m.validation["status"] == "not run" and "onnxruntime" not in m.versions
    for role in STEP_ROLES:
        feeds = load_samples(out / m.samples, role)
        assert feeds["written_in"].any() and np.abs(feeds["A_in"]).max() > 0  # from a real multi-segment run
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    strict = {k: bounds.Bound(1e-12, 1e-12) if k[1] != "written" else b for k, b in bounds.BOUNDS.items()}
    monkeypatch.setattr(bounds, "BOUNDS", strict)
    assert main(["export", str(model_dir), "-o", str(out), "--overwrite", "--no-decode"]) == 1
    captured = capsys.readouterr()
    assert "MISS" in captured.out and "logits" in captured.out
    assert "validation failed" in captured.err and "\n" not in captured.err.strip()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "model"]


def test_failed_trace_writes_nothing(tmp_path, monkeypatch):
    import exporter.export as ex

    def broken(model, role, precision, opset, cache=None):
        raise ExportError("simulated trace failure")

    monkeypatch.setattr(ex, "trace_graph", broken)
    out = tmp_path / "export"
    with pytest.raises(ExportError, match="simulated"):
        export_model(tiny_model("llama"), out, decode=False)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_bad_arguments(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    for argv in (["export", "--synthetic", "tiny", "-o", str(tmp_path / "taken")],
                 ["export", "-o", str(tmp_path / "x")],
                 ["export", str(tmp_path / "no-model"), "-o", str(tmp_path / "y")],
                 ["export", "--synthetic", "nope", "-o", str(tmp_path / "z")],
                 ["export", "--synthetic", "tiny", "--opset", "23", "-o", str(tmp_path / "w")]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("armt export: error:") and "\n" not in err, err
    assert (tmp_path / "taken" / "file").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_bf16_export_is_not_claimed_validated(export_of):
    """ONNX Runtime CPU has no bf16 kernels: validation says 'not run' (never 'passed')."""
    d = export_of("llama", "bf16")
    m = load_manifest(d)
    assert m.validation["status"] == "not run"
    for role in ROLES:
        v = m.validation["graphs"][role]
        assert v["status"] == "not run" and "ONNX Runtime" in v["reason"] and not v["outputs"]
        onnx.checker.check_model(str(d / GRAPH_FILES[role]), full_check=True)
    assert m.graph("diagonal_step").input("hidden_in").dtype == "bfloat16"
    assert m.graph("segment").input("A_in").dtype == "float32"


# ----------------------------------------------------------------------------------- inspect / build
def test_inspect_lists_graphs_and_tensors(export_of, capsys):
    d = export_of("gpt2", "fp16")
    assert main(["inspect", str(d)]) == 0
    out = capsys.readouterr().out
    for text in ("segment.onnx", "diagonal_step.onnx", "weights.data", "hidden_in", "(3, batch, slot, 32)",
                 "float16", "wrap_pos", "validation: passed", "engines: none", "MatMul"):
        assert text in out, text


def test_build_refuses_a_precision_the_graphs_lack(export_of):
    with pytest.raises(ExportError, match="exported in fp32"):
        from exporter.engines import build_engines
        build_engines(export_of("llama", "fp32"), precision="fp16")


def _have_trt_rtx():
    try:
        import tensorrt_rtx  # noqa: F401
        return True
    except ImportError:
        return False


trt_only = pytest.mark.skipif(not _have_trt_rtx(), reason="tensorrt_rtx is not installed (pip install '.[trt]')")


@pytest.mark.trt
@trt_only
@pytest.mark.parametrize("arch,precision", CASES + [("llama", "bf16")])
def test_build_engines_for_every_graph(export_of, arch, precision, tmp_path, capsys):
    d = tmp_path / "export"
    # the tiny models' head_dim 8 has no fused TensorRT Attention kernel: fp16/bf16 written out (opset 18)
    # here; the fused graphs' engines are built in tests/test_fused_export.py (head_dim 16)
    shutil.copytree(export_of(arch, precision, None if precision == "fp32" else 18), d)
    argv = ["build", str(d), "--builder", "tensorrt_rtx", "--max-batch", "4", "--compute-capability", "8.9"]
    assert main(argv) == 0
    m = load_manifest(d, verify_checksums=True)
    for role, g in m.graphs.items():
        assert len(g.engines) == 1
        e = g.engines[0]
        assert e.builder == "tensorrt_rtx" and e.precision == precision and e.compute_capability == ("8.9",)
        assert (d / e.file).stat().st_size > 1000 and e.file in m.files
        prof = e.profiles[0]
        T, M = m.dims["segment_size"], m.dims["mem_tokens"]
        if role == "lm_head":  # rows 1 .. the max width (every token place of a segment, or one per row)
            d_model = m.dims["d_model"]
            assert prof["hidden"].min == (1, 1, d_model) and prof["hidden"].max == (4, T, d_model)
            continue
        assert prof["input_ids"].min == (1, 1) and prof["input_ids"].max == (4, T)
        key = "positions"
        assert prof[key].max[-1] == T + M and prof["A_in"].max[1] == 4
    if (arch, precision) != ("llama", "fp32"):
        return
    first = {role: g.engines[0].file for role, g in m.graphs.items()}
    # a rebuild with another profile replaces the engines (old files gone, manifest consistent)
    assert main(argv[:-2] + ["--max-width", "3"]) == 0
    m2 = load_manifest(d, verify_checksums=True)
    for role, g in m2.graphs.items():
        key = "hidden" if role == "lm_head" else "input_ids"
        assert len(g.engines) == 1 and g.engines[0].profiles[0][key].max[:2] == (4, 3)
        assert g.engines[0].file != first[role] and not (d / first[role]).exists()
    assert main(["inspect", str(d)]) == 0
    assert "tensorrt_rtx" in capsys.readouterr().out


@pytest.mark.trt
@trt_only
def test_build_names_the_node_tensorrt_cannot_parse(export_of, tmp_path):
    d = tmp_path / "export"
    shutil.copytree(export_of("llama", "fp32"), d)
    proto = onnx.load(str(d / "segment.onnx"), load_external_data=False)
    victim = next(n for n in proto.graph.node if n.op_type == "Softmax")
    victim.op_type, victim.domain = "MysteryOp", "armt.test"
    proto.opset_import.append(onnx.helper.make_opsetid("armt.test", 1))
    onnx.save_model(proto, str(d / "segment.onnx"))
    m = Manifest.from_dict(json.loads((d / "manifest.json").read_text()), root=d)
    m.files.update(record_files(d, ["segment.onnx"]))
    write_manifest(d, m)
    from exporter.engines import build_engines
    with pytest.raises(ExportError) as info:
        build_engines(d, prefer="tensorrt_rtx", roles=("segment",))
    msg = str(info.value)
    assert victim.name in msg and "MysteryOp" in msg and "\n" not in msg
    assert not list(d.glob("*.engine"))
