"""CUDA graphs in the ONNX Runtime and TensorRT runners: the call-key -> graph-id bookkeeping and the
fallbacks, on the CPU with stand-in sessions that behave as ONNX Runtime's CUDA-graph mode does (a
replayed id reads and writes the addresses it was captured with, whatever is bound now), so a wrong
id assignment gives wrong numbers here. Real capture on a GPU: the tests marked `gpu` at the end."""

import logging

import numpy as np
import pytest
import torch

from graphs.contracts import contract
from graphs.dtypes import ORT_TYPE_NAMES
from graphs.errors import InputError
from runtimes.cuda_graphs import SKIP, GraphIds, call_key, resolve_cuda_graph
from runtimes.execute import run_schedule
from runtimes.loaders import CaptureRefused, OrtSessionLoader
from runtimes.ort_runner import OrtRunner
from runtimes.torch_runner import TorchRunner
from tests.helpers import rel_err, same, tiny_model

ROLES = ["segment", "diagonal_step"]
ORT_TYPE = {v: k for k, v in ORT_TYPE_NAMES.items()}
CAPTURE_REFUSAL = ("This session cannot use the graph capture feature as requested by the user as all "
                   "compute graph nodes have not been partitioned to the CUDAExecutionProvider")


class _Buf:
    def __init__(self, shape, ptr):
        self.shape, self.ptr = shape, ptr


# ------------------------------------------------------------------------------------------ bookkeeping
def test_graph_ids_follow_call_keys():
    ids = GraphIds()
    a = call_key({"x": _Buf((2, 3), 100)}, {"y": _Buf((2, 3), 200)})
    b = call_key({"x": _Buf((2, 3), 100)}, {"y": _Buf((2, 3), 300)})  # the other ping-pong buffer
    c = call_key({"x": _Buf((2, 4), 100)}, {"y": _Buf((2, 3), 200)})  # another shape, same addresses
    assert a != b and a != c and b != c
    assert a == call_key({"x": _Buf((2, 3), 100)}, {"y": _Buf((2, 3), 200)})
    assert [ids.id_for(k) for k in (a, b, a, c, b, a)] == [0, 1, 0, 2, 1, 0]
    assert ids.runs(a) == 3 and ids.runs(c) == 1 and len(ids) == 3
    assert call_key({"x": _Buf((1,), 1)}, {}, 0) != call_key({"x": _Buf((1,), 1)}, {}, 1)  # TensorRT profile


def test_graph_ids_limit_and_disable():
    ids = GraphIds(limit=2)
    keys = [call_key({"x": _Buf((n,), 8)}, {}) for n in range(4)]
    assert [ids.id_for(k) for k in keys] == [0, 1, SKIP, SKIP]
    assert ids.id_for(keys[1]) == 1  # ids already given stay
    assert ids.disable("refused") is True and ids.disable("again") is False  # warn once
    assert ids.reason == "refused" and ids.id_for(keys[0]) == SKIP
    assert GraphIds(enabled=False).id_for(keys[0]) == SKIP


def test_cuda_graph_option_defaults():
    assert resolve_cuda_graph(None, "cuda") is True and resolve_cuda_graph(None, "cpu") is False
    assert resolve_cuda_graph(None, "cuda", default_on=False) is False  # ONNX Runtime: opt-in
    assert resolve_cuda_graph(True, "cuda", default_on=False) is True
    assert resolve_cuda_graph(False, "cuda") is False
    with pytest.raises(InputError, match="CUDA device"):
        resolve_cuda_graph(True, "cpu")


# ------------------------------------------------------------------------------------------ stand-in ORT
class _Value:
    def __init__(self, name, dtype):
        self.name, self.type = name, ORT_TYPE[dtype]


class _Binding:
    def __init__(self):
        self.inputs, self.outputs = {}, {}

    def bind_input(self, name, dev_type, dev_id, elem, shape, ptr):
        self.inputs[name] = (tuple(shape), ptr)

    def bind_output(self, name, dev_type, dev_id, elem, shape, ptr):
        self.outputs[name] = (tuple(shape), ptr)


class _FakeSession:
    """ONNX Runtime's CUDA-graph behaviour without a GPU: with `graphs`, the first run with a new
    gpu_graph_id computes WARMUP_RUNS times plainly (ONNX Runtime's regular runs before capture,
    min_num_runs_before_cuda_graph_capture_ = 2, done inside the one user call), records ("captures")
    its bindings and replays; a run with a known id computes from the recorded addresses (a replay
    does not look at the current binding); `fail_capture_of`: the capture of that id raises, as a
    failed stream capture does; `bake`: input names whose *content* at capture the replays keep (a
    graph that baked a value into the capture: the wrong behaviour the check mode must catch)."""

    WARMUP_RUNS = 2

    def __init__(self, runner, reference, graphs: bool, fail_capture_of: int | None = None, fixed=None,
                 bake: tuple[str, ...] = ()):
        self.runner, self.reference, self.graphs = runner, reference, graphs
        self.fail_capture_of, self.fixed, self.bake = fail_capture_of, fixed, bake
        self.baked: dict[int, dict] = {}
        self.computes = 0  # model executions (a capture call executes WARMUP_RUNS + 1 times)
        self.captured: dict[int, tuple[dict, dict]] = {}
        self.calls: list[int | None] = []  # gpu_graph_id of every run (None: no run options)

    def get_inputs(self):
        return [_Value(s.name, s.dtype) for s in self.runner.contract.inputs]

    def get_outputs(self):
        return [_Value(s.name, s.dtype) for s in self.runner.contract.outputs]

    def io_binding(self):
        return _Binding()

    def _buffer(self, shape, ptr):
        for buf in self.runner._buffers._flat.values():
            if buf.ptr == ptr and buf.shape == shape:
                return buf
        raise AssertionError(f"no runner buffer at {ptr:#x} with shape {shape}")

    def run_with_iobinding(self, binding, run_options=None):
        gid = None if run_options is None else int(run_options.get_run_config_entry("gpu_graph_id"))
        self.calls.append(gid)
        if gid is not None and not self.graphs:
            raise AssertionError("gpu_graph_id given to a session made without enable_cuda_graph")
        ins, outs = binding.inputs, binding.outputs
        if self.fixed:  # a session with pinned dims runs only calls of those dims
            for spec in self.runner.contract.inputs:
                assert ins[spec.name][0] == spec.concrete_shape(self.fixed), (spec.name, self.fixed)
        bufs = self.runner._buffers
        baked = {}
        if self.graphs and gid is not None and gid != SKIP:
            if gid in self.captured:
                ins, outs = self.captured[gid]  # replay: the captured addresses
                baked = self.baked[gid]
            elif gid == self.fail_capture_of:
                raise RuntimeError("CUDA failure 900: operation not permitted when stream is capturing")
            else:
                for _ in range(self.WARMUP_RUNS):  # the regular runs before capture, same bindings
                    self._compute(ins, outs, {})
                self.captured[gid] = (dict(ins), dict(outs))
                baked = self.baked[gid] = {n: bufs.read(self._buffer(*ins[n])).copy() for n in self.bake if n in ins}
        self._compute(ins, outs, baked)

    def _compute(self, ins, outs, baked):
        bufs = self.runner._buffers
        self.computes += 1
        feeds = {n: baked[n] if n in baked else bufs.read(self._buffer(*ins[n])) for n in ins}
        out = self.reference.infer(feeds)
        for name, (shape, ptr) in outs.items():
            value = np.ascontiguousarray(self.reference.to_numpy(out[name]))
            buf = self._buffer(shape, ptr)
            bufs.storage.write(buf.block, value.reshape(-1).view(np.uint8))


class _FakeLoader(OrtSessionLoader):
    """Hands out stand-in sessions; `refuse`: a session with enable_cuda_graph is refused as ONNX
    Runtime refuses one whose nodes are not all on the CUDA provider."""

    def __init__(self, reference, refuse=False, fail_capture_of=None, bake=()):
        super().__init__("fake.onnx")
        self.reference, self.refuse, self.fail_capture_of, self.bake = reference, refuse, fail_capture_of, bake
        self.runner, self.sessions = None, []

    def __call__(self):
        if self.cuda_graph and self.refuse:
            raise CaptureRefused(CAPTURE_REFUSAL)
        s = _FakeSession(self.runner, self.reference, self.cuda_graph, self.fail_capture_of, self.fixed_dims,
                         self.bake)
        self.sessions.append(s)
        return s


def _fake_runner(model, role, **loader_kw):
    """An OrtRunner on the CPU whose session is the stand-in, with CUDA graphs on as on a GPU."""
    ref = TorchRunner(model, role).activate()
    loader = _FakeLoader(ref, **loader_kw)
    runner = OrtRunner(loader, contract=contract(model.cfg, role, "fp32"), model_id=model.model_id())
    runner.graphs.enabled, runner.graphs.reason, runner.loader.cuda_graph = True, None, True  # as cuda would
    loader.runner = runner
    return runner, ref, loader


def _batch(model, B=3, N=40):
    ids = torch.randint(0, model.cfg.base.vocab_size, (B, N), generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(N)[None] < torch.tensor([N, 23, 4][:B])[:, None]).long()
    return ids, mask


def _same_run(got, want):
    assert rel_err(got.hidden, want.hidden) == 0
    assert rel_err(got.state.A, want.state.A) == 0 and rel_err(got.state.z, want.state.z) == 0
    assert same(got.state.written, want.state.written)


@pytest.mark.parametrize("role", ROLES)
def test_ort_graph_per_call_key_replays_correctly(role):
    """Every call of a whole schedule runs under a graph id; replays (which read the captured
    addresses) give exactly the plain runner's numbers, twice over; steady calls reuse ids."""
    model = tiny_model()
    runner, ref, loader = _fake_runner(model, role)
    ids, mask = _batch(model)
    with runner:
        got = run_schedule(runner, ids, mask, collect=("hidden",))
        again = run_schedule(runner, ids, mask, collect=("hidden",))
        n_keys = len(runner.graphs)
    want = run_schedule(ref, ids, mask, collect=("hidden",))
    _same_run(got, want)
    _same_run(again, want)
    dynamic, *pinned = loader.sessions  # the dynamic session opened at activate(), one per call shape
    assert not dynamic.graphs and dynamic.calls == [] and not dynamic.fixed
    assert len(pinned) == (2 if role == "segment" else 1)  # segment: full width and the short last one
    calls = [gid for s in pinned for gid in s.calls]
    assert all(s.graphs and s.fixed for s in pinned) and None not in calls and SKIP not in calls
    n_ids = sum(len(s.captured) for s in pinned)
    assert n_ids == n_keys and 2 <= n_ids < len(calls) // 2  # parities and shapes, replayed
    for s in pinned:
        assert s.calls[len(s.calls) // 2:] == s.calls[:len(s.calls) // 2]  # the second run replays the first
    assert runner.cuda_graph and runner.cuda_graph_reason is None


def test_ort_shapes_past_the_session_limit_run_plainly(monkeypatch):
    import runtimes.ort_runner as ort_runner
    monkeypatch.setattr(ort_runner, "MAX_SHAPE_SESSIONS", 1)
    model = tiny_model()
    runner, ref, loader = _fake_runner(model, "segment")
    ids, mask = _batch(model)
    with runner:
        got = run_schedule(runner, ids, mask, collect=("hidden",))
    _same_run(got, run_schedule(ref, ids, mask, collect=("hidden",)))
    first, pinned, dynamic = loader.sessions  # the short last segment reopened the dynamic session
    assert pinned.fixed and pinned.graphs and None not in pinned.calls
    assert first.calls == [] and set(dynamic.calls) == {None} and runner.cuda_graph


def test_ort_capture_refused_falls_back_with_one_warning(caplog):
    model = tiny_model()
    runner, ref, loader = _fake_runner(model, "diagonal_step", refuse=True)
    ids, mask = _batch(model)
    caplog.set_level(logging.WARNING, logger="armt.ort")
    with runner:
        got = run_schedule(runner, ids, mask, collect=("hidden",))
    _same_run(got, run_schedule(ref, ids, mask, collect=("hidden",)))
    assert [r.getMessage().count("CUDA graphs off") for r in caplog.records] == [1]
    assert "graph capture feature" in runner.cuda_graph_reason and not runner.cuda_graph
    (session,) = loader.sessions
    assert not session.graphs and set(session.calls) == {None}


def test_ort_failed_capture_reopens_the_session_plain(caplog):
    model = tiny_model()
    runner, ref, loader = _fake_runner(model, "diagonal_step", fail_capture_of=1)
    ids, mask = _batch(model)
    caplog.set_level(logging.WARNING, logger="armt.ort")
    with runner:
        got = run_schedule(runner, ids, mask, collect=("hidden",))
        run_schedule(runner, ids, mask, collect=("hidden",))
    _same_run(got, run_schedule(ref, ids, mask, collect=("hidden",)))
    assert sum("CUDA graphs off" in r.getMessage() for r in caplog.records) == 1
    assert "capture failed" in runner.cuda_graph_reason
    dynamic, pinned, reopened = loader.sessions
    assert pinned.graphs and pinned.calls[:2] == [0, 1] and dynamic.calls == []
    assert not reopened.graphs and set(reopened.calls) == {None} and not reopened.fixed


def test_ort_runner_cuda_graph_option_on_cpu():
    model = tiny_model()
    ref = TorchRunner(model, "segment")
    c = contract(model.cfg, "segment", "fp32")
    plain = OrtRunner(_FakeLoader(ref), contract=c, model_id=model.model_id())
    assert not plain.cuda_graph and not plain.loader.cuda_graph  # the CPU default
    with pytest.raises(InputError, match="CUDA device"):
        OrtRunner(_FakeLoader(ref), contract=c, model_id=model.model_id(), cuda_graph=True)


def test_ort_runner_cuda_graphs_are_opt_in_on_cuda():
    """ONNX Runtime's CUDA graphs are off unless asked for on graphs without fused Attention (NaN
    measured with them on the H200); the fused exports' default is in tests/test_fused_export.py."""
    model = tiny_model()
    ref = TorchRunner(model, "segment")
    c = contract(model.cfg, "segment", "fp32")
    default = OrtRunner(_FakeLoader(ref), contract=c, model_id=model.model_id(), device="cuda")
    assert not default.cuda_graph and not default.loader.cuda_graph and default.cuda_graph_reason == "not requested"
    asked = OrtRunner(_FakeLoader(ref), contract=c, model_id=model.model_id(), device="cuda", cuda_graph=True)
    assert asked.cuda_graph and asked.loader.cuda_graph


def test_fake_capture_runs_the_warmup_runs_inside_the_first_call():
    """The stand-in runs a new id WARMUP_RUNS + 1 times in one call (as ONNX Runtime does): the
    runner's results stay exact only because no input buffer is also an output buffer."""
    model = tiny_model()
    runner, ref, loader = _fake_runner(model, "diagonal_step")
    ids, mask = _batch(model)  # 7 segments of 6 > 3 layers: steady steps with every layer active
    with runner:
        got = run_schedule(runner, ids, mask, collect=("hidden", "last_logits"), head=ref.companion("lm_head").activate())
        n_ids, calls = len(runner.graphs), len(got.schedule.steps)
    _same_run(got, run_schedule(ref, ids, mask, collect=("hidden",)))
    (pinned,) = loader.sessions[1:]
    assert pinned.computes == calls + _FakeSession.WARMUP_RUNS * n_ids


@pytest.mark.parametrize("mode", ["1", "all"])
def test_graph_check_mode_agrees_on_faithful_replays(mode, monkeypatch):
    monkeypatch.setenv("ARMT_CHECK_CUDA_GRAPHS", mode)
    model = tiny_model()
    runner, ref, loader = _fake_runner(model, "diagonal_step")
    ids, mask = _batch(model)
    with runner:
        got = run_schedule(runner, ids, mask, collect=("hidden",))
        checks, n_ids, calls = list(runner.graph_checks), len(runner.graphs), len(got.schedule.steps)
    _same_run(got, run_schedule(ref, ids, mask, collect=("hidden",)))
    assert checks and all(c["ok"] and not c["inputs_written"] for c in checks)
    replays = calls - n_ids
    assert len(checks) == (replays if mode == "all" else n_ids - 1)  # id 0 (host state) is never replayed here
    assert {c["graph_id"] for c in checks} == set(range(1, n_ids))


def test_graph_check_mode_catches_a_replay_that_baked_an_input(monkeypatch, caplog):
    """A capture that kept the `active` mask of its capture step (ramp-up) gives wrong steady steps;
    without the check the run is silently wrong, with it every bad replay is named in a warning."""
    model = tiny_model()
    ids, mask = _batch(model)
    want = run_schedule(TorchRunner(model, "diagonal_step").activate(), ids, mask, collect=("hidden",))
    runner, ref, loader = _fake_runner(model, "diagonal_step", bake=("active",))
    with runner:
        wrong = run_schedule(runner, ids, mask, collect=("hidden",))
    assert rel_err(wrong.state.A, want.state.A) > 1e-3  # the stand-in does model a bad capture
    monkeypatch.setenv("ARMT_CHECK_CUDA_GRAPHS", "all")
    caplog.set_level(logging.WARNING, logger="armt.ort")
    runner, ref, loader = _fake_runner(model, "diagonal_step", bake=("active",))
    with runner:
        checked = run_schedule(runner, ids, mask, collect=("hidden",))
        checks = list(runner.graph_checks)
    assert any(not c["ok"] for c in checks)
    assert any("replay differs from a plain run" in r.getMessage() for r in caplog.records)
    _same_run(checked, want)  # the checked call keeps the plain run's outputs


# ------------------------------------------------------------------------------------------ GPU only
def _cuda_ep() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("role", ROLES)
def test_ort_cuda_graphs_match_plain_runs(role, caplog):
    """On a GPU: with CUDA graphs (captured, or refused with one warning) the run equals the plain
    CUDA run within the fp32 bound, and a second (replayed) run is bit-identical to the first."""
    if not _cuda_ep():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
    from exporter.bounds import compare
    from tests.test_runtime_ort import _ids, exported
    export_dir, _ = exported("llama")
    ids = _ids(2, 26, seed=7)
    mask = (torch.arange(26)[None] < torch.tensor([26, 11])[:, None]).long()
    with OrtRunner(export_dir, role, device="cuda", cuda_graph=False) as plain, \
            OrtRunner(export_dir, role, device="cuda", cuda_graph=True) as graphs:
        a = run_schedule(plain, ids, mask, collect=("hidden",))
        b = run_schedule(graphs, ids, mask, collect=("hidden",))
        b2 = run_schedule(graphs, ids, mask, collect=("hidden",))
        logging.getLogger("armt.ort").info("cuda graphs %s (%s), %d ids", graphs.cuda_graph,
                                           graphs.cuda_graph_reason, len(graphs.graphs))
    for kind, x, y in (("hidden", b.hidden, a.hidden), ("A", b.state.A, a.state.A), ("z", b.state.z, a.state.z)):
        c = compare(kind, kind, "fp32", x, y)
        assert c.ok, f"{role} {kind}: {c.rel:.2e} (bound {c.bound})"
    assert same(b.hidden, b2.hidden) and same(b.state.A, b2.state.A)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["llama", "llama-fp16"])
def test_ort_cuda_graphs_many_segments_last_logits(kind, monkeypatch, caplog):
    """The H200 NaN's shape in small: diagonal schedule with many more segments than layers (steady
    steps with every layer active, replayed ping-pong graphs), last logits through the lm_head graph.
    Per tensor: CUDA graphs vs plain runs on the same pinned-dims sessions (ARMT_ORT_PIN_DIMS=1: what
    separates capture from dim pinning) vs the dynamic session; every replay also checked against a
    plain run of the same call (ARMT_CHECK_CUDA_GRAPHS=all); NaN never passes."""
    if not _cuda_ep():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
    from exporter.bounds import compare
    from tests.test_runtime_ort import KINDS, _ids, exported
    precision = KINDS[kind]
    export_dir, _ = exported(kind)
    N = 96  # segments of 5-6 tokens: 16-19 segments over 3 layers
    vocab = OrtRunner(export_dir, "diagonal_step", device="cuda", cuda_graph=False).cfg.base.vocab_size
    ids = _ids(2, N, seed=5, V=vocab)
    mask = (torch.arange(N)[None] < torch.tensor([N, N - 13])[:, None]).long()
    collect = ("hidden", "last_logits")
    caplog.set_level(logging.INFO, logger="armt.ort")
    with OrtRunner(export_dir, "diagonal_step", device="cuda", cuda_graph=False) as plain:
        a = run_schedule(plain, ids, mask, collect=collect)
    monkeypatch.setenv("ARMT_ORT_PIN_DIMS", "1")
    with OrtRunner(export_dir, "diagonal_step", device="cuda", cuda_graph=False) as pinned:
        p = run_schedule(pinned, ids, mask, collect=collect)
    monkeypatch.delenv("ARMT_ORT_PIN_DIMS")
    with OrtRunner(export_dir, "diagonal_step", device="cuda", cuda_graph=True) as graphs:
        b = run_schedule(graphs, ids, mask, collect=collect)
        b2 = run_schedule(graphs, ids, mask, collect=collect)  # every call a replay now
        monkeypatch.setenv("ARMT_CHECK_CUDA_GRAPHS", "all")
        b3 = run_schedule(graphs, ids, mask, collect=collect)
        checks = list(graphs.graph_checks)
        assert graphs.cuda_graph, graphs.cuda_graph_reason  # a tiny graph must capture on the CUDA provider
    assert len(a.schedule.steps) > 3 * 3
    tensors = lambda r: {"hidden": r.hidden, "last_logits": r.last_logits, "A": r.state.A, "z": r.state.z}  # noqa: E731
    for label, got, want in (("pinned vs dynamic", p, a), ("graphs vs pinned", b, p), ("replayed vs pinned", b2, p),
                             ("checked vs pinned", b3, p), ("graphs vs dynamic", b2, a)):
        for name, x in tensors(got).items():
            y = tensors(want)[name]
            assert np.isfinite(x).all() and np.isfinite(y).all(), f"{kind} {label} {name}: non-finite"
            c = compare(f"{label} {name}", "logits" if name == "last_logits" else name, precision, x, y)
            assert c.ok, f"{kind} {label} {name}: {c.rel:.2e} (bound {c.bound})"
    assert checks and all(c["ok"] for c in checks), [c for c in checks if not c["ok"]][:3]


# ------------------------------------------------------------------------------------------ TensorRT
class _FakeCudaGraph:
    """A 'captured' TensorRT call: launch() executes with the addresses set when it was captured."""

    def __init__(self, ctx):
        self.ctx, self.addresses, self.shapes = ctx, dict(ctx.addresses), dict(ctx.shapes)
        self.launches = 0

    def launch(self):
        now = self.ctx.addresses, self.ctx.shapes
        self.ctx.addresses, self.ctx.shapes = dict(self.addresses), dict(self.shapes)
        try:
            assert self.ctx.execute_async_v3(0)
        finally:
            self.ctx.addresses, self.ctx.shapes = now
        self.launches += 1


def _fake_trt(model, role, fail_capture=False):
    from exporter.manifest import EngineRecord
    from graphs.contracts import contract as contract_of
    from runtimes.base import Runner
    from runtimes.trt_runner import TrtRunner
    from tests.test_runtime_core import _FakeTrtContext
    runner = TrtRunner.__new__(TrtRunner)  # no engine, no GPU: what _activate would set up
    Runner.__init__(runner, contract_of(model.cfg, role, "fp32"), "cpu", model.model_id())
    runner.graphs, runner._stream, runner._graphs = GraphIds(enabled=True), None, {}
    runner.use_host_storage()
    runner._profiles = [{"input_ids": ((1, 1), (4, 6), (4, 6))}]
    runner.engine_record = EngineRecord("fake.engine", "tensorrt_rtx", "0", "fp32")
    ref = TorchRunner(model, role).activate()
    runner._context = ctx = _FakeTrtContext(runner, ref)
    runner.is_active = True
    captured = []

    def capture(context):  # the execution context of the call's graph variant (here always the masked one)
        assert context is ctx
        if fail_capture:
            if runner.graphs.disable("capture failed: stand-in"):
                logging.getLogger("armt.trt").warning("%s: CUDA graphs off (stand-in)", runner.name)
            return None
        captured.append(_FakeCudaGraph(context))
        return captured[-1]
    runner._capture = capture
    return runner, ref, captured


@pytest.mark.parametrize("role", ROLES)
def test_trt_captures_each_call_key_on_its_second_call(role):
    """TensorRT runner: a key runs plainly once, is captured on its second call and replayed after;
    replays (with the captured addresses) give the plain numbers exactly."""
    model = tiny_model()
    runner, ref, captured = _fake_trt(model, role)
    ids, mask = _batch(model)
    got = run_schedule(runner, ids, mask, collect=("hidden",))
    again = run_schedule(runner, ids, mask, collect=("hidden",))
    want = run_schedule(ref, ids, mask, collect=("hidden",))
    _same_run(got, want)
    _same_run(again, want)
    assert captured and len(captured) == len(runner._graphs) <= len(runner.graphs)
    assert sum(g.launches for g in captured) > len(captured)  # replayed, not only launched at capture


def test_trt_failed_capture_runs_plainly():
    model = tiny_model()
    runner, ref, captured = _fake_trt(model, "diagonal_step", fail_capture=True)
    ids, mask = _batch(model)
    got = run_schedule(runner, ids, mask, collect=("hidden",))
    _same_run(got, run_schedule(ref, ids, mask, collect=("hidden",)))
    assert not captured and not runner.cuda_graph and "capture failed" in runner.graphs.reason


def test_run_cuda_graph_on_the_cpu_is_bad_input(tmp_path, capsys):
    from armt.cli import main
    ids = tmp_path / "ids.npy"
    np.save(ids, np.zeros((1, 4), dtype=np.int64))
    code = main(["run", "models/armt-recall", "--input-ids", str(ids), "--output", str(tmp_path / "o.npy"),
                 "--cuda-graph", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "CUDA device" in err[0]
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.parametrize("role", ROLES)
def test_pinned_dims_sessions_on_a_real_graph(role):
    """The per-shape sessions on real ONNX Runtime (CPU provider; the CUDA-graph run option is given
    as on CUDA): free-dimension overrides load the exported graph for each call shape, and the run
    equals the plain runner within the fp32 bounds."""
    from exporter.bounds import compare
    from tests.test_runtime_ort import _ids, exported
    export_dir, _ = exported("llama")
    ids = _ids(2, 26, seed=7)
    mask = (torch.arange(26)[None] < torch.tensor([26, 11])[:, None]).long()
    with OrtRunner(export_dir, role) as plain, OrtRunner(export_dir, role) as pinned:
        pinned.graphs.enabled, pinned.graphs.reason = True, None  # as on CUDA (the CPU provider ignores the id)
        a = run_schedule(plain, ids, mask, collect=("hidden",))
        b = run_schedule(pinned, ids, mask, collect=("hidden",))
        shapes = [dict(dims) for variant, dims in pinned._shape_sessions]  # keys: (graph variant, pinned dims)
        assert shapes and all(set(s) >= {"batch", "width", "slot"} for s in shapes)
        assert "masked" not in pinned._plain and len(pinned.graphs) >= 2  # the dynamic session was released
    for kind, x, y in (("hidden", b.hidden, a.hidden), ("A", b.state.A, a.state.A), ("z", b.state.z, a.state.z)):
        c = compare(kind, kind, "fp32", x, y)
        assert c.ok, f"{role} {kind}: {c.rel:.2e} (bound {c.bound})"
