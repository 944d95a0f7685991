"""Exact resume anywhere (issue 13): a run cut at any token and continued from its state equals one
call, on the torch runner, the fast torch executor and ONNX Runtime, with both schedules, batched
rows cut at different places included; state files carry the unfinished segments and a format
version. Every check also shows that the memory matters on these weights: continuing without the
unfinished segment (the old behaviour) misses by far more than the tolerance."""

import logging

import numpy as np
import pytest
import torch

from graphs.errors import InputError
from graphs.state import STATE_FORMAT, MemoryState, load_state, save_state
from runtimes.execute import run_schedule
from runtimes.torch_runner import TorchRunner, run_torch
from armt.cli import main
from tests.helpers import rel_err, tiny_model
from tests.precision import LazyBound, model_bound

ROLES = ["segment", "diagonal_step"]
SCHEDULES = {"segment": "sequential", "diagonal_step": "diagonal"}
# fp32: the same cells on the same slots; only slot widths (sequential batches) may differ; the bound is
# derived on the module's model (tests/precision.py)
TOL = LazyBound(lambda: model_bound(tiny_model("llama")))


def _ids(B, N, V, seed=0):
    return np.random.default_rng(seed).integers(0, V, (B, N)).astype(np.int64)


def _mask(lengths, N):
    return (np.arange(N)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)


def _rows(ids, starts, stops):
    """Row b's tokens starts[b]:stops[b] of `ids`, right-padded into one batch, and its mask."""
    n = np.asarray(stops) - np.asarray(starts)
    out = np.zeros((ids.shape[0], max(int(n.max()), 0)), dtype=np.int64)
    for b, (lo, hi) in enumerate(zip(starts, stops)):
        out[b, :hi - lo] = ids[b, lo:hi]
    return out, _mask(n, out.shape[1])


def _chain(run, ids, cuts_per_call):
    """Run `ids` (B, N) as consecutive calls, each row cut at its own places; stitch the per-row
    logits/hidden back to (B, N, ...). `run(ids, mask, state)` -> RunResult."""
    B, N = ids.shape
    bounds = [np.zeros(B, np.int64), *[np.asarray(c) for c in cuts_per_call], np.full(B, N)]
    logits, hidden, state = [], [], None
    for lo, hi in zip(bounds, bounds[1:]):
        part, mask = _rows(ids, lo, hi)
        res = run(part, mask, state)
        state = res.state.numpy()  # through the host, as a state file would carry it
        logits.append([res.logits[b, :hi[b] - lo[b]] for b in range(B)])
        hidden.append([res.hidden[b, :hi[b] - lo[b]] for b in range(B)])
    stitch = lambda parts: np.stack([np.concatenate([p[b] for p in parts]) for b in range(B)])  # noqa: E731
    return stitch(logits), stitch(hidden), state


def _same_state(got: MemoryState, want: MemoryState, close) -> None:
    for name in ("A", "z"):
        close(getattr(got, name), getattr(want, name), name)
    assert np.array_equal(got.written, want.written)
    assert (got.pending is None) == (want.pending is None)
    if want.pending is not None:
        assert np.array_equal(got.pending.lengths, want.pending.lengths)
        for b, u in enumerate(want.pending.lengths):
            assert np.array_equal(got.pending.ids[b, :u], want.pending.ids[b, :u])
        for name in ("A", "z"):
            close(getattr(got.pending.before, name), getattr(want.pending.before, name), f"before {name}")


def _torch_close(a, b, what):
    assert rel_err(a, b) < TOL, (what, rel_err(a, b))


def _check_against_whole(got, whole, close):
    logits, hidden, state = got
    close(logits, whole.logits, "logits")
    close(hidden, whole.hidden, "hidden")
    _same_state(state, whole.state, close)


def _amnesic_miss(run, ids, cut):
    """How far the second half's logits land when the unfinished segment is dropped (the old behaviour)."""
    whole = run(ids, None, None)
    first = run(ids[:, :cut], None, None)
    second = run(ids[:, cut:], None, first.state.without_pending())
    return rel_err(second.logits, whole.logits[:, cut:])


# ------------------------------------------------------------------------------------------ torch
@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.mark.parametrize("role", ROLES)
def test_torch_runner_resume_at_every_split_point(model, role):
    """One call == two calls for every split point 1..N-1 (N = 20, segments of 6)."""
    ids = _ids(2, 20, model.cfg.base.vocab_size)
    with TorchRunner(model, role) as runner:
        run = lambda x, m, s: run_schedule(runner, x, m, state=s)  # noqa: E731
        whole = run(ids, None, None)
        assert whole.state.pending is not None and list(whole.state.pending.lengths) == [2, 2]  # 20 = 3*6 + 2
        for cut in range(1, 20):
            _check_against_whole(_chain(run, ids, [[cut, cut]]), whole, _torch_close)
        assert _amnesic_miss(run, ids, 9) > 100 * TOL  # the memory matters on these weights


@pytest.mark.parametrize("role", ROLES)
def test_torch_runner_rows_split_at_different_points(model, role):
    """A batch whose rows are cut at different places (also inside and at the ends of segments), in
    two and in three calls, equals one call row for row."""
    ids = _ids(4, 20, model.cfg.base.vocab_size, seed=1)
    with TorchRunner(model, role) as runner:
        run = lambda x, m, s: run_schedule(runner, x, m, state=s)  # noqa: E731
        whole = run(ids, None, None)
        for cuts in ([[3, 11, 6, 19]], [[1, 6, 13, 0]], [[2, 7, 12, 5], [9, 7, 19, 17]]):
            _check_against_whole(_chain(run, ids, cuts), whole, _torch_close)


@pytest.mark.parametrize("schedule", ["sequential", "diagonal"])
def test_fast_executor_resume_at_every_split_point(model, schedule, caplog):
    """runtimes.torch_runner.run_torch (the fast executor for equal rows) continues exactly too."""
    caplog.set_level(logging.DEBUG, logger="armt.run")
    ids = _ids(2, 20, model.cfg.base.vocab_size, seed=2)
    run = lambda x, m, s: run_torch(model, x, None if m is None or m.all() else m, state=s,  # noqa: E731
                                    schedule=schedule)
    whole = run(ids, None, None)
    for cut in range(1, 20):
        _check_against_whole(_chain(run, ids, [[cut, cut]]), whole, _torch_close)
    assert "reference cells" not in caplog.text and "fast executor" in caplog.text
    assert _amnesic_miss(run, ids, 9) > 100 * TOL
    ref = run_torch(model, ids, schedule="sequential", collect=("logits",))  # and it is the reference's result
    with torch.no_grad():
        assert rel_err(ref.logits, model(torch.from_numpy(ids), schedule="sequential").logits) < TOL


def test_reference_forward_refuses_a_pending_state(model):
    ids = _ids(1, 8, model.cfg.base.vocab_size)
    with TorchRunner(model, "segment") as runner:
        state = run_schedule(runner, ids).state
    with pytest.raises(InputError, match="unfinished segments"):
        model(torch.from_numpy(ids), state=state)


def test_a_call_with_no_new_tokens_keeps_the_unfinished_segment(model):
    ids = _ids(2, 8, model.cfg.base.vocab_size, seed=3)
    with TorchRunner(model, "diagonal_step") as runner:
        first = run_schedule(runner, ids)
        empty = run_schedule(runner, ids[:, :0], state=first.state)
        after = run_schedule(runner, _ids(2, 5, model.cfg.base.vocab_size, seed=4), state=empty.state)
        direct = run_schedule(runner, _ids(2, 5, model.cfg.base.vocab_size, seed=4), state=first.state)
    assert empty.logits.shape == (2, 0, model.cfg.base.vocab_size)
    _same_state(empty.state, first.state, _torch_close)
    assert rel_err(after.logits, direct.logits) < TOL


# ------------------------------------------------------------------------------------------ state files
def test_state_file_round_trip_keeps_the_unfinished_segment(model, tmp_path):
    ids = _ids(2, 9, model.cfg.base.vocab_size)
    with TorchRunner(model, "segment") as runner:
        state = run_schedule(runner, ids, _mask([9, 4], 9)).state
    assert list(state.pending.lengths) == [3, 4]
    save_state(tmp_path / "s.npz", state, model.model_id())
    back = load_state(tmp_path / "s.npz", model.model_id())
    _same_state(back, state, lambda a, b, what: np.testing.assert_array_equal(a, b))
    with np.load(tmp_path / "s.npz") as data:
        assert int(data["format_version"]) == STATE_FORMAT


def test_old_and_foreign_state_files_are_refused_in_one_line(model, tmp_path):
    st = MemoryState.zeros(3, 1, model.cfg.armt.d_key, model.cfg.base.d_model)
    np.savez(tmp_path / "v1.npz", A=st.A, z=st.z, written=st.written, model_id=np.array(model.model_id()))
    with pytest.raises(InputError, match="format version 1") as info:
        load_state(tmp_path / "v1.npz", model.model_id())
    assert "\n" not in str(info.value)
    np.savez(tmp_path / "v9.npz", format_version=np.array(9), A=st.A, z=st.z, written=st.written,
             model_id=np.array(model.model_id()))
    with pytest.raises(InputError, match="format version 9"):
        load_state(tmp_path / "v9.npz", model.model_id())
    np.savez(tmp_path / "half.npz", format_version=np.array(STATE_FORMAT), A=st.A, z=st.z, written=st.written,
             model_id=np.array(model.model_id()), pending_ids=np.zeros((1, 2), np.int64))
    with pytest.raises(InputError, match="part of a pending segment"):
        load_state(tmp_path / "half.npz", model.model_id())
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(InputError, match="not a valid ARMT state file"):
        load_state(tmp_path / "empty.npz", model.model_id())


def test_a_pending_segment_that_does_not_fit_is_refused(model):
    ids = _ids(2, 8, model.cfg.base.vocab_size)
    with TorchRunner(model, "segment") as runner:
        state = run_schedule(runner, ids).state
        state.pending.lengths[0] = model.cfg.armt.segment_size  # a whole segment cannot be pending
        with pytest.raises(InputError, match="pending segment lengths"):
            run_schedule(runner, ids, state=state)
        state.pending.lengths[0] = 2
        state.pending.ids[0, 0] = model.cfg.base.vocab_size
        with pytest.raises(InputError, match="pending segment ids"):
            run_schedule(runner, ids, state=state)


def test_cli_resume_inside_a_segment_equals_one_run(model, tmp_path):
    """`armt run --state-out` then `--state-in`, cut inside a segment (the case issue 13 reports)."""
    from graphs.modeldir import save_model_dir
    model_dir = save_model_dir(model, tmp_path / "model")
    ids = _ids(2, 20, model.cfg.base.vocab_size, seed=5)
    np.save(tmp_path / "all.npy", ids)
    np.save(tmp_path / "a.npy", ids[:, :8])
    np.save(tmp_path / "b.npy", ids[:, 8:])
    run = lambda *a: main(["run", str(model_dir), "--no-progress", *map(str, a)])  # noqa: E731
    assert run("--input-ids", tmp_path / "all.npy", "--output", tmp_path / "whole.npy",
               "--state-out", tmp_path / "whole.npz") == 0
    assert run("--input-ids", tmp_path / "a.npy", "--output", tmp_path / "a_out.npy",
               "--state-out", tmp_path / "s.npz") == 0
    assert run("--input-ids", tmp_path / "b.npy", "--state-in", tmp_path / "s.npz",
               "--output", tmp_path / "b_out.npy", "--state-out", tmp_path / "s2.npz") == 0
    got = np.concatenate([np.load(tmp_path / "a_out.npy"), np.load(tmp_path / "b_out.npy")], 1)
    assert rel_err(got, np.load(tmp_path / "whole.npy")) < TOL
    mid = model.model_id()
    _same_state(load_state(tmp_path / "s2.npz", mid), load_state(tmp_path / "whole.npz", mid), _torch_close)


# ------------------------------------------------------------------------------------------ ONNX Runtime
def _ort_close(a, b, what):
    """ORT results on the exported official LLaMA fixture: the bound derived on that model."""
    from tests.test_runtime_ort import fresh_model
    bound = model_bound(fresh_model("llama"))
    assert rel_err(a, b) < bound, (what, rel_err(a, b), bound)


@pytest.mark.parametrize("role", ROLES)
def test_ort_resume_at_every_split_point_and_row_wise(role):
    """The exported official LLaMA fixture (segments of 5) on ONNX Runtime: one call == two calls at
    every split point 1..N-1, and a batch whose rows are cut at different places."""
    from runtimes.ort_runner import OrtRunner
    from tests.test_runtime_ort import V, exported
    export_dir, _ = exported("llama")
    ids = _ids(2, 13, V, seed=6)
    with OrtRunner(export_dir, role) as runner:
        run = lambda x, m, s: run_schedule(runner, x, m, state=s)  # noqa: E731
        whole = run(ids, None, None)
        for cut in range(1, 13):
            _check_against_whole(_chain(run, ids, [[cut, cut]]), whole, _ort_close)
        for cuts in ([[2, 9]], [[5, 12], [7, 12]]):
            _check_against_whole(_chain(run, ids, cuts), whole, _ort_close)
        assert _amnesic_miss(run, ids, 7) > 1e-3


def test_torch_state_file_continues_on_ort_inside_a_segment(tmp_path):
    """A state written by `armt run` on torch (model dir), cut inside a segment, continues on ORT."""
    from tests.test_runtime_ort import V, exported
    export_dir, model_dir = exported("llama")
    ids = _ids(2, 17, V, seed=7)
    np.save(tmp_path / "a.npy", ids[:, :7])
    np.save(tmp_path / "b.npy", ids[:, 7:])
    np.save(tmp_path / "all.npy", ids)
    assert main(["run", str(model_dir), "--input-ids", str(tmp_path / "a.npy"), "--output", str(tmp_path / "a_out.npy"),
                 "--state-out", str(tmp_path / "s.npz")]) == 0
    assert main(["run", str(model_dir), "--input-ids", str(tmp_path / "all.npy"),
                 "--output", str(tmp_path / "whole.npy")]) == 0
    for schedule in ("sequential", "diagonal"):
        out = tmp_path / f"b_{schedule}.npy"
        assert main(["run", str(export_dir), "--backend", "ort", "--schedule", schedule, "--input-ids",
                     str(tmp_path / "b.npy"), "--state-in", str(tmp_path / "s.npz"), "--output", str(out)]) == 0
        got = np.concatenate([np.load(tmp_path / "a_out.npy"), np.load(out)], 1)
        _ort_close(got, np.load(tmp_path / "whole.npy"), "logits")
