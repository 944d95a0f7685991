"""The runner interface, the schedule loop and the runner-owned buffers, on the torch runner (no export needed)."""

import logging

import pytest
import torch

import numpy as np

from exporter.manifest import EngineRecord, TensorSpec
from graphs.contracts import GraphContract
from graphs.errors import ArmtError, BackendUnavailable, ExportError, InputError
from graphs.state import MemoryState
from runtimes.buffers import BufferSet, HostStorage
from runtimes.cuda_graphs import GraphIds
from runtimes.execute import run_schedule
from graphs.progress import Progress
from runtimes.torch_runner import TorchRunner
from runtimes.trt_runner import TrtRunner, pick_profile, select_engine
from tests.helpers import rel_err, same, tiny_model
from tests.precision import model_bound

ARCHS = [("llama", {}), ("gpt2", {"wrap_pos": True})]
ROLES = ["segment", "diagonal_step"]
# fp32 bounds: derived per model (tests/precision.py, model_bound)


def _ids(model, B, N, seed=1):
    return torch.randint(0, model.cfg.base.vocab_size, (B, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,kw", ARCHS)
@pytest.mark.parametrize("role", ROLES)
def test_loop_reproduces_reference_per_segment(arch, kw, role):
    model = tiny_model(arch, **kw)
    lengths = torch.tensor([23, 6, 14])
    ids = _ids(model, 3, 23)
    mask = (torch.arange(23)[None] < lengths[:, None]).long()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, schedule="sequential", trace=True)
    with TorchRunner(model, role) as runner:
        got = run_schedule(runner, ids, mask, trace=True)
    assert rel_err(got.logits, ref.logits) < model_bound(model) and rel_err(got.hidden, ref.hidden) < model_bound(model)
    assert len(got.segment_states) == len(ref.segment_states) == 4
    for g, r in zip(got.segment_states, ref.segment_states):
        assert rel_err(g.A, r.A) < model_bound(model) and rel_err(g.z, r.z) < model_bound(model) and same(g.written, r.written)
    assert same(got.state.written, ref.state.written)
    assert np.all(got.logits[1, 6:] == 0)  # padding places stay zero
    assert len(got.schedule.steps) == (4 if role == "segment" else 4 + 3 - 1)


@pytest.mark.parametrize("role", ROLES)
def test_resume_and_collect(role):
    model = tiny_model()
    ids = _ids(model, 2, 30)
    with TorchRunner(model, role) as runner:
        whole = run_schedule(runner, ids)
        first = run_schedule(runner, ids[:, :12], collect=())
        second = run_schedule(runner, ids[:, 12:], state=first.state, collect=("logits",))
        empty = run_schedule(runner, ids[:, :0], state=first.state)
    assert first.logits is None and first.hidden is None and second.hidden is None
    assert rel_err(second.logits, whole.logits[:, 12:]) < model_bound(model)
    assert rel_err(second.state.A, whole.state.A) < model_bound(model)
    assert empty.logits.shape == (2, 0, 61) and same(empty.state.A, first.state.A)
    assert not empty.schedule.steps


def test_bad_inputs_to_the_loop():
    model = tiny_model()
    with TorchRunner(model, "diagonal_step") as runner:
        with pytest.raises(InputError, match="lie in"):
            run_schedule(runner, torch.full((1, 4), 61))
        with pytest.raises(InputError, match="right-padded"):
            run_schedule(runner, _ids(model, 1, 4), torch.tensor([[0, 1, 1, 1]]))
        with pytest.raises(InputError, match="memory state"):
            run_schedule(runner, _ids(model, 2, 4), state=model.zero_state(3))
        with pytest.raises(InputError, match="2-D"):
            run_schedule(runner, torch.tensor([1, 2, 3]))
        with pytest.raises(InputError, match="collect"):
            run_schedule(runner, _ids(model, 1, 4), collect=("attention",))
        nan_state = model.zero_state(1)
        nan_state.A[0, 0, 0, 0] = float("nan")
        with pytest.raises(InputError, match="NaN"):
            run_schedule(runner, _ids(model, 1, 4), state=nan_state)


def test_runner_interface_checks_feeds():
    model = tiny_model()
    runner = TorchRunner(model, "segment")
    st = model.zero_state(2)
    feeds = {"input_ids": _ids(model, 2, 6), "positions": torch.arange(9).expand(2, 9).contiguous(),
             "key_valid": torch.ones(2, 9, dtype=torch.bool), "write": torch.ones(2, dtype=torch.bool),
             "A_in": st.A, "z_in": st.z, "written_in": st.written}
    with pytest.raises(ArmtError, match="not active"):
        runner.infer(feeds)
    with runner:
        out = runner.infer(feeds)
        assert set(out) == {"hidden", "A_out", "z_out", "written_out"}  # logits: the lm_head graph
        assert out["hidden"].shape[:2] == (2, 6) and out["written_out"].all()
        with pytest.raises(InputError, match="must be int64"):
            runner.infer({**feeds, "input_ids": feeds["input_ids"].float()})
        with pytest.raises(InputError, match="batch=3"):
            runner.infer({**feeds, "write": torch.ones(3, dtype=torch.bool)})
        with pytest.raises(InputError, match="shape"):
            runner.infer({**feeds, "A_in": st.A[:2]})
        with pytest.raises(InputError, match="missing inputs"):
            runner.infer({k: v for k, v in feeds.items() if k != "z_in"})
    assert not runner.is_active and runner.calls == 1


def test_torch_runner_precision_leaves_the_model_alone():
    model = tiny_model()
    with TorchRunner(model, "segment", precision="bf16") as runner:
        got = run_schedule(runner, _ids(model, 1, 8))
    assert model.dtype == torch.float32  # the caller's model is not cast
    assert got.state.A.dtype == np.float32  # memory stays fp32 in every precision
    with torch.no_grad():
        ref = model(_ids(model, 1, 8), schedule="sequential")
    assert 0 < rel_err(got.logits, ref.logits) < 0.1
    with pytest.raises(InputError, match="precision"):
        TorchRunner(model, "segment", precision="fp8")
    with pytest.raises(InputError, match="role"):
        TorchRunner(model, "encoder")


# ------------------------------------------------------------------------------------------ buffers
def _contract():
    ins = (TensorSpec("x", "float32", ("batch", 4)), TensorSpec("A_in", "float32", (2, "batch")))
    outs = (TensorSpec("y", "float32", ("batch", 4)), TensorSpec("A_out", "float32", (2, "batch")))
    return GraphContract("segment", "fp32", ins, outs, {"A_out": "A_in"}, {}, cfg=None)


def test_buffers_ping_pong_without_copies():
    bufs = BufferSet(_contract(), HostStorage())
    x, a = np.random.randn(3, 4).astype(np.float32), np.random.randn(2, 3).astype(np.float32)
    bound = bufs.bind_inputs({"x": x, "A_in": a})
    assert bound["x"].ptr != x.ctypes.data and np.array_equal(bufs.read(bound["x"]), x)  # host feed: staged
    staged_x = bound["x"].ptr
    out = bufs.bind_outputs({"batch": 3}, bound)
    addresses = [out["A_out"].ptr]
    for _ in range(4):  # feed A_out back: bound as it is, the next A_out goes to the other buffer
        bound = bufs.bind_inputs({"x": x, "A_in": out["A_out"]})
        assert bound["A_in"] is out["A_out"]
        assert bound["x"].ptr == staged_x
        out = bufs.bind_outputs({"batch": 3}, bound)
        assert out["A_out"].ptr != bound["A_in"].ptr
        addresses.append(out["A_out"].ptr)
    assert len(set(addresses)) == 2 and addresses[0] == addresses[2] == addresses[4]
    # another shape gets its own buffers; y never aliases an input and, never fed back, has one buffer
    small = bufs.bind_outputs({"batch": 1}, bufs.bind_inputs({"x": x[:1], "A_in": a[:, :1]}))
    assert small["y"].shape == (1, 4) and small["y"].ptr != out["y"].ptr
    again = bufs.bind_outputs({"batch": 3}, bufs.bind_inputs({"x": x, "A_in": a}))
    assert again["y"].ptr == out["y"].ptr  # the same shape reuses its buffer
    assert not any(k[1] == "y" and k[2] == 1 for k in bufs._flat)


# ------------------------------------------------------------------------------------------ TensorRT (no GPU needed)
def test_trt_engine_and_profile_selection():
    rtx = EngineRecord("segment.rtx.engine", "tensorrt_rtx", "1.7", "fp32")
    full = EngineRecord("segment.trt.engine", "tensorrt", "10.0", "fp32")
    assert select_engine([full, rtx], "segment", importable=lambda m: m == "tensorrt_rtx") is rtx
    assert select_engine([full, rtx], "segment", importable=lambda m: True) is full
    with pytest.raises(ExportError, match="armt build"):
        select_engine([], "segment")
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        select_engine([full], "segment", importable=lambda m: False)
    profiles = [{"input_ids": ((1, 1), (1, 6), (2, 6))}, {"input_ids": ((1, 1), (4, 6), (8, 6))}]
    assert pick_profile(profiles, {"input_ids": (2, 6)}) == 0
    assert pick_profile(profiles, {"input_ids": (5, 3)}) == 1
    with pytest.raises(InputError, match="optimization profile"):
        pick_profile(profiles, {"input_ids": (9, 6)})


def test_trt_runner_needs_cuda():
    with pytest.raises(InputError, match="CUDA GPU"):
        TrtRunner("/nonexistent", "segment", device="cpu")


# ------------------------------------------------------------------------------------------ progress
def test_progress_logs_without_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="armt.progress")
    with Progress(20, "steps") as bar:
        for _ in range(20):
            bar.update()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("1/20 steps") and lines[-1].startswith("20/20 steps")
    assert 5 <= len(lines) <= 12  # about every 10%, not every step
    caplog.clear()
    with Progress(20, "steps", enabled=False) as bar:
        bar.update()
    assert not caplog.records


def test_state_round_trip_types():
    model = tiny_model()
    st = MemoryState.zeros(3, 1, model.cfg.armt.d_key, 32)
    st.written = st.written.astype(np.int64)
    with TorchRunner(model, "segment") as runner, pytest.raises(InputError, match="bool"):
        run_schedule(runner, _ids(model, 1, 4), state=st)


class _FakeTrtContext:
    """Stands in for a TensorRT execution context on the CPU: resolves tensor addresses back to the
    runner's buffers and computes the graph with the torch cells, so TrtRunner's per-call work
    (profile choice, set_input_shape, set_tensor_address, output shapes, ping-pong) runs for real."""

    def __init__(self, runner, reference):
        self.runner, self.reference = runner, reference
        self.active_optimization_profile = -1
        self.shapes, self.addresses, self.calls = {}, {}, []

    def set_optimization_profile_async(self, index, stream):
        self.active_optimization_profile = index
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def get_tensor_shape(self, name):
        dims = {}
        for spec in self.runner.input_specs:
            for want, got in zip(spec.shape, self.shapes[spec.name]):
                if isinstance(want, str):
                    dims[want] = got
        return next(s for s in self.runner.output_specs if s.name == name).concrete_shape(dims)

    def _buffer(self, name):
        for buf in self.runner._buffers._flat.values():
            if buf.ptr == self.addresses[name]:
                assert buf.shape == self.shapes.get(name, buf.shape)
                return buf
        raise AssertionError(f"{name} is not bound to a runner-owned buffer")

    def execute_async_v3(self, stream):
        bufs = self.runner._buffers
        feeds = {s.name: bufs.read(self._buffer(s.name)) for s in self.runner.input_specs}
        out = self.reference.infer(feeds)
        for spec in self.runner.output_specs:
            value = self.reference.to_numpy(out[spec.name])
            buf = self._buffer(spec.name)
            assert buf.shape == value.shape
            bufs.storage.write(buf.block, np.ascontiguousarray(value).reshape(-1).view(np.uint8))
        self.calls.append(dict(self.addresses))
        return True


@pytest.mark.parametrize("role", ROLES)
def test_trt_runner_call_path_with_a_fake_engine(role):
    """TrtRunner's per-call orchestration on the CPU (the engine replaced by the torch cells): the
    schedule loop through it equals the torch runner, inputs are the previous call's output buffers,
    and outputs alternate between two buffers."""
    from graphs.contracts import contract
    from runtimes.base import Runner
    model = tiny_model()
    runner = TrtRunner.__new__(TrtRunner)  # no engine file, no GPU: set up what _activate would
    Runner.__init__(runner, contract(model.cfg, role, "fp32"), "cpu", model.model_id())  # no export directory
    runner.graphs, runner._stream, runner._graphs = GraphIds(enabled=False), None, {}
    runner.use_host_storage()
    runner._profiles = [{"input_ids": ((1, 1), (1, 6), (1, 6))}, {"input_ids": ((1, 1), (4, 6), (4, 6))}]
    runner.engine_record = EngineRecord("fake.engine", "tensorrt_rtx", "0", "fp32")
    ref = TorchRunner(model, role).activate()
    runner._context = ctx = _FakeTrtContext(runner, ref)
    runner.is_active = True
    ids = _ids(model, 3, 17)
    mask = (torch.arange(17)[None] < torch.tensor([17, 9, 4])[:, None]).long()
    with TorchRunner(model, "lm_head") as head:  # the fake engine runner has no export to open lm_head from
        got = run_schedule(runner, ids, mask, head=head)
    want = run_schedule(ref, ids, mask)
    assert rel_err(got.hidden, want.hidden) == 0 and rel_err(got.state.A, want.state.A) == 0
    assert rel_err(got.logits, want.logits) == 0
    assert ctx.active_optimization_profile == 1  # batch 3 is only in the second profile
    a_in = [c["A_in"] for c in ctx.calls]
    a_out = [c["A_out"] for c in ctx.calls]
    assert all(a_in[i + 1] == a_out[i] for i in range(len(a_in) - 1))  # state passed back, no copy
    assert len(set(a_out)) == 2 and all(a_out[i] != a_in[i] for i in range(len(a_in)))
    with pytest.raises(InputError, match="optimization profile"):
        run_schedule(runner, _ids(model, 5, 6), collect=("hidden",))


def test_trt_runner_runs_the_causal_engine_on_full_calls_and_the_masked_one_otherwise():
    """A causal twin engine (segment_causal): the calls whose slots are all full go to its context,
    the padded last segment to the masked one; call keys carry the variant; the run equals the torch
    runner bit for bit (on a full slot the causal cell computes exactly what the masked cell does)."""
    from graphs.contracts import contract
    from runtimes.base import Runner
    model = tiny_model()
    runner = TrtRunner.__new__(TrtRunner)
    Runner.__init__(runner, contract(model.cfg, "segment", "fp32"), "cpu", model.model_id())
    runner.graphs, runner._stream, runner._graphs = GraphIds(enabled=False), None, {}
    runner.use_host_storage()
    profiles = [{"input_ids": ((1, 1), (4, 6), (4, 6))}]
    runner._profiles = profiles
    runner.engine_record = EngineRecord("fake.engine", "tensorrt_rtx", "0", "fp32")
    runner.causal_record = EngineRecord("fake_causal.engine", "tensorrt_rtx", "0", "fp32")
    ref = TorchRunner(model, "segment").activate()
    runner._context = masked = _FakeTrtContext(runner, ref)
    causal = _FakeTrtContext(runner, TorchRunner(model, "segment_causal").activate())
    runner._causal, runner.has_causal = (None, causal, profiles, None), True
    runner.is_active = True
    ids = _ids(model, 2, 22)
    mask = (torch.arange(22)[None] < torch.tensor([22, 20])[:, None]).long()  # segment 3 padded in row 1
    with TorchRunner(model, "lm_head") as head:
        got = run_schedule(runner, ids, mask, head=head)
    want = run_schedule(ref, ids, mask)
    assert rel_err(got.hidden, want.hidden) == 0 and rel_err(got.state.A, want.state.A) == 0
    assert len(causal.calls) == 3 and len(masked.calls) == 1
    assert runner.variant_calls == {"causal": 3, "masked": 1}
    assert {key[0][-1] for key in runner.graphs._runs} == {"causal", "masked"}  # call keys: (profile, variant)


# ------------------------------------------------------------------------------------------ whole torch runs
@pytest.mark.parametrize("schedule", ["sequential", "diagonal"])
def test_run_torch_picks_the_fast_executor_where_it_applies(schedule, caplog):
    """`armt run --backend torch`: equal-length LLaMA rows go through the fast executor, padded batches
    and GPT-2 through the reference cells; both equal the reference within the fp32 bound derived on the model (tests/precision.py)."""
    from runtimes.torch_runner import run_torch
    caplog.set_level(logging.DEBUG, logger="armt.run")
    model = tiny_model()
    ids = _ids(model, 2, 20)
    with torch.no_grad():
        ref = model(ids, schedule="sequential")
    got = run_torch(model, ids.numpy(), schedule=schedule)
    assert "fast executor" in caplog.text
    assert rel_err(got.logits, ref.logits) < model_bound(model) and rel_err(got.hidden, ref.hidden) < model_bound(model)
    assert rel_err(got.state.A, ref.state.A) < model_bound(model) and rel_err(got.state.z, ref.state.z) < model_bound(model)
    assert same(got.state.written, ref.state.written)
    half = run_torch(model, ids.numpy()[:, :12], schedule=schedule)  # resumed from a fast run's state
    rest = run_torch(model, ids.numpy()[:, 12:], state=half.state, schedule=schedule)
    assert rel_err(rest.logits, ref.logits[:, 12:]) < model_bound(model)
    caplog.clear()
    mask = (torch.arange(20)[None] < torch.tensor([20, 9])[:, None]).long()
    with torch.no_grad():
        ref_padded = model(ids, attention_mask=mask, schedule="sequential")
    padded = run_torch(model, ids.numpy(), mask.numpy(), schedule=schedule)
    assert "reference cells" in caplog.text and "fast executor" not in caplog.text
    assert rel_err(padded.logits, ref_padded.logits) < model_bound(model)
    caplog.clear()
    gpt2 = tiny_model("gpt2")
    run_torch(gpt2, _ids(gpt2, 1, 8).numpy(), schedule=schedule)
    assert "covers LLaMA only" in caplog.text
