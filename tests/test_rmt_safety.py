"""Issue 13 for the RMT (issue 14's second model kind): exact resume anywhere, model ids over every
weight, manifest protection of the rmt_segment graph, output checks and --strict.

An RMT state is the memory (B, M, d) with the batch on axis 0 and no layer axis; the state before a
row's unfinished segment is taken at the step where its last complete segment leaves the last layer
(runtimes/execute.py, through the Schedule data, the same code as the ARMT's). Every resume check
also shows that the carried memory matters on these weights: continuing without the unfinished
segment, or from the wrong memory, misses by far more than the tolerance.

One tiny LLaMA RMT is exported once for this module (fp32, no validation step: parity here is what
these tests measure)."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from armt.cli import main
from exporter.manifest import check_export, load_manifest
from exporter.provenance import read_metadata_props
from graphs.errors import ExportError, InputError
from graphs.modeldir import WEIGHTS, load_model_dir, recorded_model_id, save_model_dir
from graphs.state import STATE_FORMAT, RmtState, load_state, save_state
from runtimes.execute import run_schedule
from runtimes.torch_runner import TorchRunner, run_torch
from tests.helpers import rel_err, tiny_rmt
from tests.precision import LazyBound, model_bound

# fp32: the same cells on the same slots; only slot widths (sequential batches) may differ; the bound is
# derived on the module's tiny RMTs (tests/precision.py)
TOL = LazyBound(lambda: max(model_bound(tiny_rmt(a, **kw)) for a, kw in (("llama", {}), ("gpt2", {"wrap_pos": True}))))
T = 6  # tiny_rmt's segment size
V = 61  # and vocabulary


def _ids(B, N, seed=0):
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
        res = run(part, None if mask.all() else mask, state)
        state = res.state.numpy()  # through the host, as a state file would carry it
        assert isinstance(state, RmtState)
        logits.append([res.logits[b, :hi[b] - lo[b]] for b in range(B)])
        hidden.append([res.hidden[b, :hi[b] - lo[b]] for b in range(B)])
    stitch = lambda parts: np.stack([np.concatenate([p[b] for p in parts]) for b in range(B)])  # noqa: E731
    return stitch(logits), stitch(hidden), state


def _same_state(got: RmtState, want: RmtState, close) -> None:
    close(got.memory, want.memory, "memory")
    assert np.array_equal(got.written, want.written)
    assert (got.pending is None) == (want.pending is None)
    if want.pending is not None:
        assert np.array_equal(got.pending.lengths, want.pending.lengths)
        for b, u in enumerate(want.pending.lengths):
            assert np.array_equal(got.pending.ids[b, :u], want.pending.ids[b, :u])
        assert isinstance(got.pending.before, RmtState)
        close(got.pending.before.memory, want.pending.before.memory, "before memory")
        assert np.array_equal(got.pending.before.written, want.pending.before.written)


def _torch_close(a, b, what):
    assert rel_err(a, b) < TOL, (what, rel_err(a, b))


def _ort_close(a, b, what):
    assert rel_err(a, b) < TOL, (what, rel_err(a, b), TOL)  # ORT on the tiny RMT: the same bound


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
@pytest.fixture(scope="module", params=[("llama", False), ("gpt2", True)], ids=["llama", "gpt2-wrap-pos"])
def rmt(request):
    arch, wrap_pos = request.param
    return tiny_rmt(arch, wrap_pos=wrap_pos)


def test_torch_resume_at_every_split_point(rmt):
    """One call == two calls for every split point 1..N-1 (N = 20, segments of 6: 3 whole + 2)."""
    ids = _ids(2, 20)
    with TorchRunner(rmt, "rmt_segment") as runner:
        run = lambda x, m, s: run_schedule(runner, x, m, state=s)  # noqa: E731
        whole = run(ids, None, None)
        assert list(whole.state.pending.lengths) == [2, 2] and whole.state.memory.shape == (2, 3, 32)
        for cut in range(1, 20):
            _check_against_whole(_chain(run, ids, [[cut, cut]]), whole, _torch_close)
        assert _amnesic_miss(run, ids, 9) > 100 * TOL  # the memory matters on these weights
        assert _amnesic_miss(run, ids, 3) > 100 * TOL  # inside the first segment too (before: the fresh memory)


def test_torch_rows_split_at_different_points(rmt):
    """A batch whose rows are cut at different places (inside, at the ends of and before any whole
    segment), in two and in three calls, equals one call row for row; run_torch continues the same."""
    ids = _ids(4, 20, seed=1)
    with TorchRunner(rmt, "rmt_segment") as runner:
        run = lambda x, m, s: run_schedule(runner, x, m, state=s)  # noqa: E731
        whole = run(ids, None, None)
        for cuts in ([[3, 11, 6, 19]], [[1, 6, 13, 0]], [[2, 7, 12, 5], [9, 7, 19, 17]]):
            _check_against_whole(_chain(run, ids, cuts), whole, _torch_close)
    run = lambda x, m, s: run_torch(rmt, x, m, state=s, schedule="sequential")  # noqa: E731
    _check_against_whole(_chain(run, ids, [[4, 13, 6, 0], [10, 13, 17, 5]]), whole, _torch_close)


def test_state_before_the_unfinished_segment_is_that_of_the_last_whole_one(rmt):
    """pending.before holds, per row, the memory right after its last complete segment (the traced
    per-segment state), or the state the call started from for a row with no complete segment."""
    ids = _ids(3, 16, seed=2)
    mask = _mask([16, 11, 4], 16)  # 2 whole + 4, 1 whole + 5, 0 whole + 4
    with TorchRunner(rmt, "rmt_segment") as runner:
        res = run_schedule(runner, ids, mask, trace=True)
    p = res.state.pending
    assert list(p.lengths) == [4, 5, 4]
    np.testing.assert_array_equal(p.before.memory[0], res.segment_states[1].memory[0])
    np.testing.assert_array_equal(p.before.memory[1], res.segment_states[0].memory[1])
    assert not p.before.written[2] and not p.before.memory[2].any()  # a fresh row: nothing written yet
    assert p.before.written[:2].all() and res.state.written.all()
    assert rel_err(p.before.memory[:2], res.state.memory[:2]) > 1e-2  # the unfinished segment wrote memory


def test_reference_forward_refuses_a_pending_state(rmt):
    with TorchRunner(rmt, "rmt_segment") as runner:
        state = run_schedule(runner, _ids(1, 8)).state
    with pytest.raises(InputError, match="unfinished segments"):
        rmt(torch.from_numpy(_ids(1, 8)), state=state)


# ------------------------------------------------------------------------------------------ state files
def test_state_file_round_trip_keeps_kind_and_the_unfinished_segment(rmt, tmp_path):
    with TorchRunner(rmt, "rmt_segment") as runner:
        state = run_schedule(runner, _ids(2, 9), _mask([9, 4], 9)).state
    assert list(state.pending.lengths) == [3, 4]
    save_state(tmp_path / "s.npz", state, rmt.model_id())
    back = load_state(tmp_path / "s.npz", rmt.model_id())
    assert isinstance(back, RmtState)
    _same_state(back, state, lambda a, b, what: np.testing.assert_array_equal(a, b))
    with np.load(tmp_path / "s.npz") as data:
        assert int(data["format_version"]) == STATE_FORMAT and str(data["kind"]) == "rmt"
        assert {"pending_ids", "pending_lengths", "before/memory", "before/written"} <= set(data.files)


def test_version_1_and_partial_rmt_state_files_are_refused(tmp_path):
    model = tiny_rmt("llama")
    st = RmtState.zeros(1, 3, 32)
    mid = np.array(model.model_id())
    np.savez(tmp_path / "v1.npz", memory=st.memory, written=st.written, kind=np.array("rmt"), model_id=mid)
    with pytest.raises(InputError, match="format version 1") as info:
        load_state(tmp_path / "v1.npz", model.model_id())
    assert "\n" not in str(info.value)
    np.savez(tmp_path / "half.npz", format_version=np.array(STATE_FORMAT), kind=np.array("rmt"), memory=st.memory,
             written=st.written, model_id=mid, pending_ids=np.zeros((1, 2), np.int64))
    with pytest.raises(InputError, match="part of a pending segment"):
        load_state(tmp_path / "half.npz", model.model_id())


# ------------------------------------------------------------------------------------------ model ids
def _noisy(model, group, name, scale=1e-4):
    with torch.no_grad():
        getattr(model, group)[name].view(-1)[0] += scale
    return model


@pytest.mark.parametrize("group,name", [("layers", "qkv"), ("layers", "down"), ("globals", "embed"),
                                        ("globals", "final_norm_w"), ("globals", "memory")])
def test_rmt_id_covers_every_weight(group, name):
    base = tiny_rmt("llama").model_id()
    assert tiny_rmt("llama").model_id() == base  # deterministic
    noisy = _noisy(tiny_rmt("llama"), group, name).model_id()
    assert noisy != base and noisy.split("-")[0] == base.split("-")[0]  # same config, other weights


def test_rmt_id_differs_from_the_armt_of_the_same_base():
    from tests.helpers import tiny_model
    assert tiny_rmt("llama").model_id().split("-")[0] != tiny_model("llama").model_id().split("-")[0]
    assert _noisy(tiny_rmt("gpt2"), "globals", "pos_embed").model_id() != tiny_rmt("gpt2").model_id()


def test_rmt_model_directory_records_its_id(tmp_path):
    model = tiny_rmt("gpt2", wrap_pos=True)
    save_model_dir(model, tmp_path / "m")
    loaded = load_model_dir(tmp_path / "m")
    assert recorded_model_id(tmp_path / "m") == loaded.recorded_model_id == loaded.model_id() == model.model_id()
    assert loaded.known_model_id() == model.model_id()


def _one_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_fine_tuned_rmt_refuses_the_originals_state(tmp_path, capsys):
    """Noise on one base-model weight (not the learned memory, which the old id hashed alone)."""
    original = tiny_rmt("llama")
    save_model_dir(original, tmp_path / "orig")
    save_model_dir(_noisy(tiny_rmt("llama"), "layers", "gate_up"), tmp_path / "tuned")
    np.save(tmp_path / "ids.npy", _ids(1, 9))
    assert main(["run", str(tmp_path / "orig"), "--input-ids", str(tmp_path / "ids.npy"),
                 "--state-out", str(tmp_path / "s.npz")]) == 0
    capsys.readouterr()
    code = main(["run", str(tmp_path / "tuned"), "--input-ids", str(tmp_path / "ids.npy"),
                 "--state-in", str(tmp_path / "s.npz"), "--output", str(tmp_path / "out.npy")])
    assert code == 2 and not (tmp_path / "out.npy").exists()
    tuned_id = load_model_dir(tmp_path / "tuned").model_id()
    _one_line(capsys, "another model", original.model_id(), tuned_id)


# ------------------------------------------------------------------------------------------ outputs, --strict
@pytest.fixture(scope="module")
def rmt_dir(tmp_path_factory):
    return save_model_dir(tiny_rmt("gpt2", wrap_pos=True), tmp_path_factory.mktemp("rmt-outputs") / "model")


@pytest.mark.parametrize("flags,needle", [
    (["--output", "{ids}"], "is the input --input-ids"),
    (["--output", "{model}/logits.npy"], "inside the input PATH"),
    (["--output", "{tmp}/ok.npy", "--state-out", "{tmp}/nowhere/s.npz"], "does not exist"),
])
def test_rmt_run_checks_outputs_before_computing(rmt_dir, tmp_path, flags, needle, capsys, monkeypatch):
    import runtimes.torch_runner
    monkeypatch.setattr(runtimes.torch_runner, "run_torch", lambda *a, **k: pytest.fail("ran"))
    np.save(tmp_path / "ids.npy", _ids(2, 9))
    before = (tmp_path / "ids.npy").read_bytes()
    args = [f.format(ids=tmp_path / "ids.npy", model=rmt_dir, tmp=tmp_path) for f in flags]
    assert main(["run", str(rmt_dir), "--input-ids", str(tmp_path / "ids.npy"), *args]) == 2
    _one_line(capsys, needle)
    assert (tmp_path / "ids.npy").read_bytes() == before and not (tmp_path / "ok.npy").exists()


def test_convert_rmt_over_its_own_checkpoint_is_refused(tmp_path, capsys):
    from tests.test_rmt import FIXTURES, cli_flags
    d = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "rmt-llama", d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    assert main(["convert-official", str(d / "checkpoint.pt"), "--base-config", str(d), *cli_flags("rmt-llama"),
                 "-o", str(d), "--overwrite"]) == 2
    _one_line(capsys, "input")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_overflowing_rmt_memory_warns_and_exits_1_under_strict(rmt_dir, tmp_path, caplog):
    """A finite but huge memory (x1e30) makes GPT-2's layer norms NaN: warned with tensor and segment,
    exit 1 and nothing written under --strict."""
    model = load_model_dir(rmt_dir)
    ids = _ids(2, 14, seed=3)
    with TorchRunner(model, "rmt_segment") as runner:
        state = run_schedule(runner, ids[:, :6]).state  # one whole segment: no pending part
    assert state.pending is None
    state.memory = state.memory * np.float32(1e30)
    assert np.isfinite(state.memory).all()
    save_state(tmp_path / "huge.npz", state, model.model_id())
    np.save(tmp_path / "ids.npy", ids)
    args = ["run", str(rmt_dir), "--input-ids", str(tmp_path / "ids.npy"), "--state-in", str(tmp_path / "huge.npz"),
            "--output", str(tmp_path / "l.npy"), "--state-out", str(tmp_path / "s.npz")]
    caplog.set_level(logging.WARNING)
    assert main(args + ["--strict"]) == 1
    assert not (tmp_path / "l.npy").exists() and not (tmp_path / "s.npz").exists()
    text = " ".join(_warnings(caplog))
    assert "in logits from segment 0" in text and "in memory from segment 0" in text, text
    caplog.clear()
    assert main(args) == 0  # without --strict: warned, written
    assert "in logits from segment 0" in " ".join(_warnings(caplog))
    assert not np.isfinite(np.load(tmp_path / "l.npy")).all()


def test_nan_in_the_learned_memory_is_named(tmp_path, caplog):
    model = tiny_rmt("llama")
    with torch.no_grad():
        model.globals["memory"][1, 2] = float("nan")
    save_model_dir(model, tmp_path / "m")
    np.save(tmp_path / "ids.npy", _ids(1, 8))
    caplog.set_level(logging.WARNING)
    assert main(["run", str(tmp_path / "m"), "--input-ids", str(tmp_path / "ids.npy"), "--output",
                 str(tmp_path / "l.npy"), "--strict"]) == 1
    text = " ".join(_warnings(caplog))
    assert "in logits from segment 0 (row 0, token 0" in text and "in memory from segment 0" in text, text
    assert not (tmp_path / "l.npy").exists()


# ------------------------------------------------------------------------------------------ ONNX Runtime
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(export dir, model dir) of tiny_rmt("llama"), fp32."""
    from runtimes.validation import export_model
    root = tmp_path_factory.mktemp("rmt-safety")
    model_dir = save_model_dir(tiny_rmt("llama"), root / "model")
    export_model(tiny_rmt("llama"), root / "export", precision="fp32", validate=False, decode=False)  # casts its model
    return root / "export", model_dir


def test_ort_resume_at_every_split_point_and_row_wise(exported):
    """ONNX Runtime: one call == two calls at every split point 1..N-1 (N = 14: 2 whole segments + 2),
    and batches whose rows are cut at different places in two and three calls."""
    from runtimes.ort_runner import OrtRunner
    export_dir, _ = exported
    ids = _ids(2, 14, seed=4)
    with OrtRunner(export_dir, "rmt_segment") as runner:
        run = lambda x, m, s: run_schedule(runner, x, m, state=s)  # noqa: E731
        whole = run(ids, None, None)
        assert list(whole.state.pending.lengths) == [2, 2]
        for cut in range(1, 14):
            _check_against_whole(_chain(run, ids, [[cut, cut]]), whole, _ort_close)
        for cuts in ([[2, 9]], [[5, 12], [7, 12]], [[0, 6], [13, 8]]):
            _check_against_whole(_chain(run, ids, cuts), whole, _ort_close)
        assert _amnesic_miss(run, ids, 8) > 1e-3


def test_torch_state_file_continues_on_ort_inside_a_segment(exported, tmp_path):
    """`armt run` on torch (model dir) cut inside a segment, then `--state-in` on ORT: equals one run."""
    export_dir, model_dir = exported
    ids = _ids(2, 17, seed=5)
    np.save(tmp_path / "a.npy", ids[:, :8])
    np.save(tmp_path / "b.npy", ids[:, 8:])
    np.save(tmp_path / "all.npy", ids)
    run = lambda path, *a: main(["run", str(path), "--no-progress", *map(str, a)])  # noqa: E731
    assert run(model_dir, "--input-ids", tmp_path / "all.npy", "--output", tmp_path / "whole.npy",
               "--state-out", tmp_path / "whole.npz") == 0
    assert run(model_dir, "--input-ids", tmp_path / "a.npy", "--output", tmp_path / "a_out.npy",
               "--state-out", tmp_path / "s.npz") == 0
    assert load_state(tmp_path / "s.npz", load_model_dir(model_dir).model_id()).pending is not None  # 8 = 6 + 2
    assert run(export_dir, "--backend", "ort", "--input-ids", tmp_path / "b.npy", "--state-in", tmp_path / "s.npz",
               "--output", tmp_path / "b_out.npy", "--state-out", tmp_path / "s2.npz") == 0
    got = np.concatenate([np.load(tmp_path / "a_out.npy"), np.load(tmp_path / "b_out.npy")], 1)
    _ort_close(got, np.load(tmp_path / "whole.npy"), "logits")
    mid = load_manifest(export_dir).model_id
    _same_state(load_state(tmp_path / "s2.npz", mid), load_state(tmp_path / "whole.npz", mid), _ort_close)


def test_export_records_the_rmt_models_id(exported):
    export_dir, model_dir = exported
    m = load_manifest(export_dir)
    assert m.model_id == recorded_model_id(model_dir) == load_model_dir(model_dir).model_id()
    meta = read_metadata_props(export_dir / "rmt_segment.onnx")
    assert meta["armt.model_id"] == m.model_id and meta["armt.role"] == "rmt_segment"
    assert meta["armt.roles"] == "rmt_segment,lm_head" and json.loads(meta["armt.dims"]) == m.dims
    assert check_export(export_dir)[1] == []


def test_verify_model_refuses_a_fine_tuned_rmt(exported, tmp_path, capsys):
    """`armt verify EXPORT --model COPY`, noise on the base weights and the original's id left in the
    header: another model (exit 2, both ids), not a parity miss (exit 1)."""
    export_dir, model_dir = exported
    copy = tmp_path / "tuned"
    shutil.copytree(model_dir, copy)
    model = load_model_dir(copy)
    with torch.no_grad():
        for p in model.layers.values():
            p.add_(1e-3 * torch.randn_like(p))
    from safetensors.torch import save_file
    from graphs.hf_layout import hf_from_params
    save_file(hf_from_params(model), str(copy / WEIGHTS),
              metadata={"format": "pt", "armt_model_id": recorded_model_id(model_dir)})
    assert main(["verify", str(export_dir), "--model", str(copy)]) == 2
    _one_line(capsys, "another model", model.model_id(), recorded_model_id(model_dir))


EDITS = {  # name -> (edit of the manifest dict, the field the refusal names)
    "segment_size": (lambda m: m["model"]["armt_config"].update(segment_size=7), "model.armt_config"),
    "num_mem_tokens": (lambda m: m["model"]["armt_config"].update(num_mem_tokens=2), "model.armt_config"),
    "wrap_pos": (lambda m: m["model"]["armt_config"].update(wrap_pos=True), "model.armt_config"),
    "base config": (lambda m: m["model"]["config"].update(rms_norm_eps=1e-2), "model.config"),
    "dims": (lambda m: m["dims"].update(mem_tokens=2), "dims"),
    "model id": (lambda m: m["model"].update(model_id="0123456789abcdef-0123456789abcdef"), "model.model_id"),
    "precision": (lambda m: m.update(precision="fp16"), "precision"),
    "graph inputs": (lambda m: m["graphs"]["rmt_segment"]["inputs"][4].update(shape=["batch", 2, 32]),
                     "graphs.rmt_segment"),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_each_rmt_manifest_edit_is_refused(exported, tmp_path, name, capsys):
    d = tmp_path / "export"
    shutil.copytree(exported[0], d)
    raw = json.loads((d / "manifest.json").read_text())
    EDITS[name][0](raw)
    (d / "manifest.json").write_text(json.dumps(raw, indent=2))
    field = EDITS[name][1]
    with pytest.raises(ExportError, match=f"field '{field}'") as info:
        load_manifest(d, verify_checksums=False)
    assert "\n" not in str(info.value)
    np.save(tmp_path / "ids.npy", np.zeros((1, 7), np.int64))
    assert main(["run", str(d), "--backend", "ort", "--input-ids", str(tmp_path / "ids.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"field '{field}'" in err, err
    assert main(["inspect", str(d), "--verify"]) == 2
    assert f"{field}: " in capsys.readouterr().out
