"""Non-finite detection (issue 13): `armt run` and `armt bench` check their outputs; NaN/Inf gives a
warning naming the tensor and the first segment where it appears, and exit 1 under --strict (with
nothing written by run)."""

import json
import logging

import numpy as np
import pytest
import torch

from graphs.modeldir import save_model_dir
from graphs.state import load_state, save_state
from runtimes.execute import run_schedule
from runtimes.finite import find_nonfinite, locate_state
from runtimes.torch_runner import TorchRunner
from armt.cli import main
from tests.helpers import tiny_model

T = 6  # tiny_model's segment size


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A model dir, 2 x 20 ids (4 segments), and a state with finite but huge A (x1e30) for them."""
    root = tmp_path_factory.mktemp("nonfinite")
    model = tiny_model("llama")
    save_model_dir(model, root / "model")
    ids = np.random.default_rng(0).integers(0, 61, (2, 20))
    np.save(root / "ids.npy", ids)
    with TorchRunner(model, "segment") as runner:
        state = run_schedule(runner, ids[:, :12]).state  # two whole segments: no pending part
    state.A = state.A * np.float32(1e30)
    assert np.isfinite(state.A).all()
    save_state(root / "huge.npz", state, model.model_id())
    return root, model


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_overflowing_state_warns_and_exits_1_under_strict(setup, backend, caplog, tmp_path):
    root, model = setup
    if backend == "ort":
        from tests.test_runtime_ort import exported
        path = exported("llama-fp16")[0]  # an export of tiny_model("llama") (in fp16; the state stays fp32)
    else:
        path = root / "model"
    args = ["run", str(path), "--backend", backend, "--input-ids", str(root / "ids.npy"),
            "--state-in", str(root / "huge.npz"), "--output", str(tmp_path / "l.npy"),
            "--state-out", str(tmp_path / "s.npz")]
    caplog.set_level(logging.WARNING)
    assert main(args + ["--strict"]) == 1
    assert not (tmp_path / "l.npy").exists() and not (tmp_path / "s.npz").exists()  # nothing written
    lines = _warnings(caplog)
    assert any("non-finite values (NaN/Inf) in logits from segment 0" in line for line in lines), lines
    caplog.clear()
    assert main(args) == 0  # without --strict: warned, written
    assert any("in logits from segment 0" in line for line in _warnings(caplog))
    assert (tmp_path / "l.npy").exists() and not np.isfinite(np.load(tmp_path / "l.npy")).all()


def test_nan_weight_gives_a_warning_and_exit_1(tmp_path, caplog):
    model = tiny_model("llama")
    with torch.no_grad():
        model.layers["down"][1, 0, 0] = float("nan")
    save_model_dir(model, tmp_path / "m")
    np.save(tmp_path / "ids.npy", np.random.default_rng(1).integers(0, 61, (1, 8)))
    caplog.set_level(logging.WARNING)
    assert main(["run", str(tmp_path / "m"), "--input-ids", str(tmp_path / "ids.npy"), "--output",
                 str(tmp_path / "l.npy"), "--strict"]) == 1
    text = " ".join(_warnings(caplog))
    assert "in logits from segment 0 (row 0, token 0" in text and "in A from segment 0" in text, text


def test_state_overflow_is_named_by_the_segment_that_wrote_it(tmp_path, caplog):
    """Memory values scaled by 1e36: segment 0 writes a finite (huge) A, segment 1's write overflows and
    its logits are NaN. Untraced, A is first seen in the final state; locate_state names segment 1."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.mem["w_v"].mul_(1e36)
    ids = np.random.default_rng(2).integers(0, 61, (1, 16))
    with TorchRunner(model, "diagonal_step") as runner:
        res = run_schedule(runner, ids)
        found = {f.tensor: f.segment for f in find_nonfinite(res, T)}
        assert found["logits"] == 1 and found["A"] is None  # not traced: A not localized yet
        located = {f.tensor: f.segment for f in locate_state(runner, ids, None, None, find_nonfinite(res, T))}
        traced = run_schedule(runner, ids, trace=True)
    assert located["A"] == 1 and located["logits"] == 1
    assert [bool(np.isfinite(s.A).all()) for s in traced.segment_states] == [True, False, False]


def test_non_finite_state_behind_finite_outputs_is_named(tmp_path, caplog):
    """An Inf memory weight: a one-segment run's logits are finite (nothing is read from an empty
    memory), its final A is not; the CLI names A and the segment that wrote it."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.mem["w_v"][0, 0, 0] = float("inf")
    save_model_dir(model, tmp_path / "m")
    np.save(tmp_path / "one.npy", np.random.default_rng(2).integers(0, 61, (1, 5)))
    caplog.set_level(logging.WARNING)
    assert main(["run", str(tmp_path / "m"), "--input-ids", str(tmp_path / "one.npy"), "--output",
                 str(tmp_path / "l.npy"), "--state-out", str(tmp_path / "s.npz"), "--strict"]) == 1
    text = " ".join(_warnings(caplog))
    assert "in A from segment 0" in text and "in logits" not in text, text
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "l.npy").exists()


def test_finite_run_reports_nothing(setup, tmp_path, caplog):
    root, model = setup
    caplog.set_level(logging.WARNING)
    assert main(["run", str(root / "model"), "--input-ids", str(root / "ids.npy"), "--strict",
                 "--state-out", str(tmp_path / "s.npz")]) == 0
    assert not _warnings(caplog) and load_state(tmp_path / "s.npz", model.model_id()).pending is not None


def test_bench_strict_exits_1_on_an_overflowing_memory(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    args = ["bench", "--synthetic", "tiny", "--segment-size", "16", "--memory-tokens", "4", "--d-mem", "8",
            "--layers", "3", "--precision", "fp32", "--warmup", "0", "--repeats", "1", "--lengths", "48",
            "--schedules", "diagonal", "--mem-std", "1e6", "--output", str(tmp_path / "b.json")]
    assert main(args + ["--strict"]) == 1
    assert any("non-finite values (NaN/Inf) in" in m for m in _warnings(caplog))
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["complete"] and record["results"][0]["nonfinite"]
