"""One copy of an export's weights for all its ONNX Runtime sessions (runtimes/shared_weights.py, issue 10).

Two parts. Hand-built graphs (onnx.helper, no torch export: fast): the pool's values hold the file's
bytes (fp32, fp16, bf16 bits), sessions give bit-identical outputs with and without the pool in both
value paths (CPU zero-copy views of the map; device copies + DLPack views, the CUDA path, run on the
CPU), ONNX Runtime really computes with the pool's values (a pool of altered values changes the
output: the test that would fail if the values were silently ignored), tensors are shared by bytes
not names, an initializer only constant nodes read is left to the session, a rewritten file gets a
new pool, the pool dies with its last session, a refusal or a failed probe falls back to the
session's own copy (one warning), a broken file is reported by the session alone, the DLPack view on
older onnxruntime builds' capsule API, and the switch. Exports (a tiny LLaMA ARMT, fp32 and
fp16 with decode graphs): run_schedule on both schedules, masked and causal variants, the lm_head
companion, and the decoder, bitwise equal with and without the pool, all sessions on one pool.
"""

from __future__ import annotations

import gc
import logging
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import runtimes.loaders as loaders
from runtimes.loaders import OrtSessionLoader
from runtimes.shared_weights import ENV, external_tensors, live_pools, pool_for

ort = pytest.importorskip("onnxruntime")

ROWS, COLS = 8, 4


def _write_blobs(path, blobs) -> dict[str, tuple[int, int]]:
    """Append arrays to one file, 64-byte aligned as exporter/weights.py does: name -> (offset, length)."""
    out, pos = {}, 0
    with open(path, "wb") as f:
        for name, arr in blobs.items():
            pos = -(-pos // 64) * 64
            f.seek(pos)
            raw = np.ascontiguousarray(arr).tobytes()
            f.write(raw)
            out[name] = (pos, len(raw))
            pos += len(raw)
    return out


def _external(name, dtype, dims, where):
    t = TensorProto(name=name, data_type=dtype, dims=dims, data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "weights.data"), ("offset", str(where[0])), ("length", str(where[1]))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _graph(path, names, places):
    """y (n, 4) float32 = Gather(W, idx) * x + Cast(Gather(H, idx)) + Cast(Gather(B, idx)) + (c - F):
    W float32, H float16, B bfloat16 external (named `names`), read at run time (Gathers on a graph
    input); F float32 external but only read by a constant node (c - F, folded at load); c inline."""
    w, h, b = names
    nodes = [helper.make_node("Gather", [w, "idx"], ["gw"]), helper.make_node("Mul", ["gw", "x"], ["m"]),
             helper.make_node("Gather", [h, "idx"], ["gh"]), helper.make_node("Cast", ["gh"], ["ch"], to=1),
             helper.make_node("Gather", [b, "idx"], ["gb"]), helper.make_node("Cast", ["gb"], ["cb"], to=1),
             helper.make_node("Add", ["m", "ch"], ["s1"]), helper.make_node("Add", ["s1", "cb"], ["s2"]),
             helper.make_node("Sub", ["c", "F"], ["cf"]), helper.make_node("Add", ["s2", "cf"], ["y"])]
    inits = [_external(w, TensorProto.FLOAT, [ROWS, COLS], places["W"]),
             _external(h, TensorProto.FLOAT16, [ROWS, COLS], places["H"]),
             _external(b, TensorProto.BFLOAT16, [ROWS, COLS], places["B"]),
             _external("F", TensorProto.FLOAT, [COLS], places["F"]),
             numpy_helper.from_array(np.arange(COLS, dtype=np.float32) / 7, "c")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("idx", TensorProto.INT64, ["n"]),
                                       helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", COLS])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", COLS])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _arrays(seed=0):
    import ml_dtypes
    r = np.random.default_rng(seed)
    return {"W": r.standard_normal((ROWS, COLS)).astype(np.float32),
            "H": r.standard_normal((ROWS, COLS)).astype(np.float16),
            "B": r.standard_normal((ROWS, COLS)).astype(ml_dtypes.bfloat16).view(np.uint16),
            "F": r.standard_normal(COLS).astype(np.float32)}


@pytest.fixture
def export(tmp_path):
    """A directory as an export lays it out: two graphs naming the same weights.data bytes differently."""
    places = _write_blobs(tmp_path / "weights.data", _arrays())
    _graph(tmp_path / "a.onnx", ("W", "H", "B"), places)
    _graph(tmp_path / "b.onnx", ("onnx::W_7", "onnx::H_8", "onnx::B_9"), places)
    return tmp_path


FEEDS = {"idx": np.array([3, 0, 7, 3, 5], dtype=np.int64),
         "x": np.linspace(-2, 2, 5 * COLS, dtype=np.float32).reshape(5, COLS)}


def _expected(scale=1):
    """The graph's y in float32, in the graph's order of operations (bit for bit); `scale`: W, H and B
    multiplied by it (2: exact in every float format)."""
    import ml_dtypes
    a = _arrays()
    i = FEEDS["idx"]
    w = a["W"] * np.float32(scale)
    h = (a["H"] * np.float16(scale)).astype(np.float32)
    bf = (a["B"].view(ml_dtypes.bfloat16) * ml_dtypes.bfloat16(scale)).astype(np.float32)
    return w[i] * FEEDS["x"] + h[i] + bf[i] + (np.arange(COLS, dtype=np.float32) / 7 - a["F"])


def _run(path, **kw):
    session = OrtSessionLoader(path, **kw)()
    return session, session.run(None, FEEDS)[0]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    loaders._POOL_FAILED.clear()
    yield
    gc.collect()


def test_external_tensors_read_from_the_graph(export):
    got = {t.name: t for t in external_tensors(export / "a.onnx")}
    assert sorted(got) == ["B", "H", "W"]  # c is inline, F folded at load: left to the session
    assert sorted(t.name for t in external_tensors(export / "a.onnx", run_time_only=False)) == ["B", "F", "H", "W"]
    assert got["B"].onnx_type == TensorProto.BFLOAT16 and got["W"].shape == (ROWS, COLS)
    assert got["W"].file == (export / "weights.data").resolve()


@pytest.mark.parametrize("copy", [False, True], ids=["view", "device-copy"])
def test_pool_values_hold_the_file_bytes(export, copy):
    pool = pool_for(export / "a.onnx", "cpu", copy=copy)
    values = pool.initializers_for(export / "a.onnx")
    ref = onnx.load(str(export / "a.onnx"))  # external data loaded by onnx itself
    for t in ref.graph.initializer:
        if t.name in ("c", "F"):
            assert t.name not in values
            continue
        v = values[t.name]
        assert v.shape() == list(t.dims)
        raw = np.from_dlpack(v) if t.data_type != TensorProto.BFLOAT16 else None
        want = numpy_helper.to_array(t)
        if raw is not None:
            assert np.array_equal(raw, want)
    mm = pool._maps[(export / "weights.data").resolve()][0]
    base = mm.ctypes.data
    inside = [base <= v.data_ptr() < base + mm.size for v in values.values()]
    assert all(inside) if not copy else not any(inside)  # views of the map / device (here host) copies


@pytest.mark.parametrize("mode", ["view", "copy"])
def test_sessions_equal_with_and_without_the_pool(export, monkeypatch, mode):
    if mode == "copy":
        monkeypatch.setenv(ENV, "copy")
    s1, on = _run(export / "a.onnx")
    _, off = _run(export / "a.onnx", shared_weights=False)
    assert getattr(s1, "_armt_weight_pool", None) is not None and s1._armt_weight_pool.copy == (mode == "copy")
    assert np.array_equal(on, off) and np.array_equal(off, _expected())


def _doubled_map(export):
    """weights.data's bytes with every external tensor of a.onnx doubled (exact in every float format)."""
    import ml_dtypes
    from runtimes import shared_weights as sw
    data = np.fromfile(export / "weights.data", dtype=np.uint8)
    for t in external_tensors(export / "a.onnx"):
        region = data[t.offset:t.offset + t.length].view(sw.STORAGE_DTYPES[t.onnx_type])
        if t.onnx_type == TensorProto.BFLOAT16:
            region[:] = (region.view(ml_dtypes.bfloat16) * ml_dtypes.bfloat16(2)).view(np.uint16)
        else:
            region *= region.dtype.type(2)
    return data


@pytest.mark.parametrize("mode", ["view", "copy"])
def test_the_session_computes_with_the_pools_values(export, monkeypatch, mode):
    """A pool over doubled bytes doubles W, H and B in the output, bit for bit, on both value paths: the
    session computes with the pool's values (fp32, fp16, bf16), it does not silently keep its own copy."""
    from runtimes import shared_weights as sw
    doubled = _doubled_map(export)
    monkeypatch.setattr(sw.WeightPool, "_map", lambda self, file: doubled)
    if mode == "copy":
        monkeypatch.setenv(ENV, "copy")
    _, got = _run(export / "a.onnx")
    assert np.array_equal(got, _expected(scale=2)) and not np.array_equal(got, _expected())


@pytest.mark.gpu
def test_cuda_sessions_compute_with_the_pools_device_values(export, monkeypatch):
    """CUDA: the pool's device values (DLPack views) are used in place by the session, not replaced by
    ONNX Runtime's own copy (which it does, silently but for a warning in its log, when the value's
    device does not equal the planned one): doubled bytes give the doubled output, bit for bit."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDAExecutionProvider in this onnxruntime")
    from runtimes import shared_weights as sw
    from runtimes.base import parse_device
    assert sw.probe_sharing(ort, parse_device("cuda:0"), True, OrtSessionLoader(export / "a.onnx", "cuda:0")
                            .providers(ort)), "ONNX Runtime CUDA ignores caller-owned device initializers"
    s, y = _run(export / "a.onnx", device="cuda:0")
    assert getattr(s, "_armt_weight_pool", None) is not None and s._armt_weight_pool.copy
    assert np.array_equal(y, _expected())
    doubled = _doubled_map(export)
    monkeypatch.setattr(sw.WeightPool, "_map", lambda self, file: doubled)
    monkeypatch.setattr(sw, "_POOLS", {})  # a fresh pool over the doubled bytes
    _, got = _run(export / "a.onnx", device="cuda:0")
    assert np.array_equal(got, _expected(scale=2)), "ONNX Runtime CUDA did not use the pool's device values"


def test_one_value_per_tensor_across_graphs_and_sessions(export):
    sa, ya = _run(export / "a.onnx")
    sb, yb = _run(export / "b.onnx")  # other names, the same bytes
    assert sa._armt_weight_pool is sb._armt_weight_pool
    assert sa._armt_weight_pool.count == 3 and sa._armt_weight_pool.nbytes == ROWS * COLS * (4 + 2 + 2)
    assert np.array_equal(ya, yb)


def test_pool_lives_as_long_as_its_last_session(export):
    s1, _ = _run(export / "a.onnx")
    s2, _ = _run(export / "b.onnx")
    pool = s1._armt_weight_pool
    ref = __import__("weakref").ref(pool)
    del pool, s1
    gc.collect()
    assert ref() is not None and ref() in live_pools()
    del s2
    gc.collect()
    assert ref() is None


def test_a_rewritten_file_gets_a_new_pool(export):
    s1, y1 = _run(export / "a.onnx")
    arrays = _arrays(seed=1)
    os.replace(export / "weights.data", export / "old.data")  # the old pool's map stays valid (its inode)
    _write_blobs(export / "weights.data", arrays)
    s2, y2 = _run(export / "a.onnx")
    assert s2._armt_weight_pool is not s1._armt_weight_pool
    _, off = _run(export / "a.onnx", shared_weights=False)
    assert np.array_equal(y2, off) and not np.array_equal(y1, y2)


def test_refused_values_fall_back_to_the_sessions_own_copy(export, monkeypatch, caplog):
    """ONNX Runtime refuses an OrtValue that owns its buffer (add_initializer): the session opens
    without the pool, one warning, the same outputs."""
    from runtimes import shared_weights as sw

    def owned(self, path):
        return {t.name: ort.OrtValue.ortvalue_from_shape_and_type(list(t.shape), t.onnx_type, "cpu", 0)
                for t in external_tensors(path)}

    monkeypatch.setattr(sw.WeightPool, "initializers_for", owned)
    with caplog.at_level(logging.WARNING, logger="armt.run"):
        s1, y1 = _run(export / "a.onnx")
        s2, y2 = _run(export / "b.onnx")
    assert not hasattr(s1, "_armt_weight_pool") and not hasattr(s2, "_armt_weight_pool")
    assert np.array_equal(y1, _expected()) and np.array_equal(y2, _expected())
    warned = [r for r in caplog.records if "refused the shared weights" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]


def test_a_failed_device_copy_falls_back_with_one_warning(export, monkeypatch, caplog):
    from runtimes import shared_weights as sw

    def broken(self, t):
        raise RuntimeError("out of device memory")

    monkeypatch.setattr(sw.WeightPool, "_make", broken)
    with caplog.at_level(logging.WARNING, logger="armt.run"):
        s1, y1 = _run(export / "a.onnx")
        _run(export / "a.onnx")
    assert not hasattr(s1, "_armt_weight_pool") and np.array_equal(y1, _expected())
    assert sum("no shared weights" in r.getMessage() for r in caplog.records) == 1


def test_a_broken_file_is_reported_by_the_session_alone(export, caplog):
    """A corrupt graph: no pool warning, the session's one error line (what `armt run` prints)."""
    (export / "a.onnx").write_bytes(b"not an onnx file")
    with caplog.at_level(logging.WARNING, logger="armt.run"), pytest.raises(loaders.ExportError, match="cannot load"):
        _run(export / "a.onnx")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("env,option,shared", [("0", None, False), ("off", None, False), ("", None, True),
                                               ("1", None, True), ("0", True, True), ("", False, False)])
def test_switch(export, monkeypatch, env, option, shared):
    monkeypatch.setenv(ENV, env)
    s, y = _run(export / "a.onnx", shared_weights=option)
    assert hasattr(s, "_armt_weight_pool") == shared
    assert np.array_equal(y, _expected())


# ------------------------------------------------------------------------------------------ exports
@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """precision -> export directory of a tiny LLaMA ARMT (2 heads of 16, GQA) with its decode graphs;
    fp16 also has the causal twins (opset 23). Not validated: parity here is pool vs no pool."""
    torch = pytest.importorskip("torch")
    from runtimes.validation import export_model
    from tests.helpers import tiny_model
    root = tmp_path_factory.mktemp("sharedw")
    done = {}

    def get(precision):
        if precision not in done:
            with torch.no_grad():
                export_model(tiny_model("llama", num_attention_heads=2, num_key_value_heads=1), root / precision,
                             precision=precision, validate=False, decode=True)
            done[precision] = root / precision
        return done[precision]
    return get


def _ids_and_masks(V, T):
    r = np.random.default_rng(3)
    ids = r.integers(0, V, (3, 4 * T + 2)).astype(np.int64)  # (B, N): 4 segments and a partial one
    padded = np.ones_like(ids)
    padded[1, 2 * T + 1:] = 0  # row 1 ends early: its calls run the masked graph
    return ids, padded


def _sessions(runner):
    return [s for s, _ in runner._plain.values()]


@pytest.mark.parametrize("mode", ["view", "copy"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("role", ["segment", "diagonal_step"])
def test_export_runs_bitwise_equal_with_and_without_the_pool(exports, monkeypatch, precision, role, mode):
    """run_schedule (logits via the lm_head companion, hidden, final memory) on a full and a padded batch:
    the same bits with the pool as without, on both value paths (`copy`: the CUDA path's device copies
    and DLPack views, on the CPU); every session of the runner and its head on one pool."""
    from graphs.contracts import CAUSAL, MASKED
    from runtimes.execute import run_schedule
    from runtimes.ort_runner import OrtRunner
    if mode == "copy":
        monkeypatch.setenv(ENV, "copy")
    export_dir = exports(precision)
    results, pools = {}, {}
    for shared in (False, True):
        runner = OrtRunner(export_dir, role, shared_weights=shared).activate()
        head = runner.companion("lm_head").activate()
        cfg = runner.manifest.model_config()
        ids, padded = _ids_and_masks(cfg.base.vocab_size, cfg.armt.segment_size)
        out = []
        for mask in (None, padded):
            res = run_schedule(runner, ids, mask, head=head)
            out += [res.logits, res.hidden, *(np.asarray(getattr(res.state, n)) for n in res.state.TENSORS)]
        results[shared] = out
        sessions = _sessions(runner) + _sessions(head)
        assert set(runner._plain) == ({MASKED, CAUSAL} if precision == "fp16" else {MASKED})
        if precision == "fp16":
            assert runner.variant_calls[CAUSAL] > 0 and runner.variant_calls[MASKED] > 0
        got = {id(getattr(s, "_armt_weight_pool", None)) for s in sessions}
        pools[shared] = [getattr(s, "_armt_weight_pool", None) for s in sessions]
        assert len(got) == 1
        head.deactivate()
        runner.deactivate()
    assert all(p is None for p in pools[False]) and pools[True][0] is not None
    pool = pools[True][0]
    assert pool.copy == (mode == "copy")
    graphs = [export_dir / f for f in os.listdir(export_dir) if f.startswith((role, "lm_head")) and f.endswith(".onnx")]
    for a, b in zip(results[False], results[True]):
        assert np.isfinite(a).all() and a.dtype == b.dtype and np.array_equal(a, b)
    tensors = [t for g in graphs for t in external_tensors(g)]
    unique = {t.key: t.length for t in tensors}
    assert pool.count == len(unique) and pool.nbytes == sum(unique.values()) > 0  # each tensor once
    if precision == "fp16":  # the causal twin references the masked graph's bytes: held once, not twice
        assert pool.nbytes < sum(t.length for t in tensors)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("policy", ["frozen", "recurrent"])
def test_decoder_equal_with_and_without_the_pool(exports, monkeypatch, precision, policy):
    """The decoder's sessions (prefill, decode, memory write) on one pool: the same tokens and score bits."""
    from runtimes.decoders import open_decoder
    from runtimes.generate import generate
    export_dir = exports(precision)
    got = {}
    for env in ("0", "1"):
        monkeypatch.setenv(ENV, env)
        dec = open_decoder(export_dir, "ort")
        V, T = dec.cfg.base.vocab_size, dec.cfg.armt.segment_size
        ids = np.random.default_rng(5).integers(0, V, (2, 2 * T + 3)).astype(np.int64)
        res = generate(dec, ids, max_new_tokens=T + 2, policy=policy)
        sessions = [s for r in (*dec.runners.values(), *dec._prefill_runners.values()) for s in _sessions(r)]
        pools = {id(getattr(s, "_armt_weight_pool", None)) for s in sessions}
        assert len(sessions) >= 3 and len(pools) == 1 and (None not in [getattr(s, "_armt_weight_pool", None)
                                                                          for s in sessions]) == (env == "1")
        dec.close()
        got[env] = res
    assert np.array_equal(got["0"].tokens, got["1"].tokens) and np.array_equal(got["0"].scores, got["1"].scores)
    assert np.isfinite(got["1"].scores).all()


def test_dlpack_view_on_the_legacy_capsule_path(monkeypatch):
    """The view of a device copy through the capsule API of older onnxruntime builds (no OrtValue
    `__dlpack__`): same memory, same bytes, accepted by add_initializer."""
    from runtimes.shared_weights import dlpack_view
    owner = ort.OrtValue.ortvalue_from_shape_and_type([2, 3], TensorProto.FLOAT, "cpu", 0)
    owner.update_inplace(np.arange(6, dtype=np.float32).reshape(2, 3))
    monkeypatch.delattr(ort.OrtValue, "__dlpack__")
    view = dlpack_view(ort, owner)
    assert view.data_ptr() == owner.data_ptr() and view.shape() == [2, 3]
    assert np.array_equal(view.numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))
    ort.SessionOptions().add_initializer("w", view)


@pytest.mark.parametrize("copy", [False, True], ids=["view", "device-copy"])
def test_probe_sees_whether_the_value_is_used(copy):
    """The one-node probe: True for the values the pool makes (both paths on the CPU); False when the
    session computes with something else than the value given (here: a value of other bytes)."""
    from runtimes.base import parse_device
    from runtimes.shared_weights import _PROBED, make_value, probe_sharing
    cpu = parse_device("cpu")
    _PROBED.clear()
    assert probe_sharing(ort, cpu, copy, ["CPUExecutionProvider"])

    def stale(ort_, host, onnx_type, device, copy_):
        return make_value(ort_, np.zeros_like(host), onnx_type, device, copy_)

    _PROBED.clear()
    assert not probe_sharing(ort, cpu, copy, ["CPUExecutionProvider"], make=stale)
    _PROBED.clear()


def test_a_failed_probe_opens_sessions_without_the_pool(export, monkeypatch, caplog):
    from runtimes import shared_weights as sw
    monkeypatch.setattr(sw.WeightPool, "check_used", lambda self, ort_, providers: False)
    with caplog.at_level(logging.WARNING, logger="armt.run"):
        s1, y1 = _run(export / "a.onnx")
        s2, _ = _run(export / "b.onnx")
    assert not hasattr(s1, "_armt_weight_pool") and not hasattr(s2, "_armt_weight_pool")
    assert np.array_equal(y1, _expected())
    assert sum("does not compute with caller-owned" in r.getMessage() for r in caplog.records) == 1
