"""`armt run` on the torch backend: outputs, state files, resumption, and bad input (one line, exit 2)."""

import contextlib

import numpy as np
import pytest
import torch

from graphs.modeldir import save_model_dir
from graphs.state import MemoryState, load_state, save_state
from armt.cli import main
from tests.helpers import rel_err, tiny_model
from tests.precision import fp32_bounds


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tiny_model("llama"), tmp_path_factory.mktemp("cli_run") / "model")


@pytest.fixture()
def files(tmp_path):
    ids = np.random.default_rng(0).integers(0, 61, (2, 20)).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    return tmp_path, ids


def _run(*args):
    return main(["run", *map(str, args)])


def _one_line_error(capsys, match):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("armt run: error:") and match in lines[0], err
    return lines[0]


@pytest.mark.parametrize("schedule", ["sequential", "diagonal"])
def test_run_writes_logits_hidden_and_state(model_dir, files, schedule):
    tmp, ids = files
    assert _run(model_dir, "--input-ids", tmp / "ids.npy", "--schedule", schedule, "--output", tmp / "l.npy",
                "--hidden-output", tmp / "h.npy", "--state-out", tmp / "s.npz") == 0
    model = tiny_model("llama")
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), schedule="sequential")
    bound = fp32_bounds(model, ids)  # derived on this case (tests/precision.py)
    assert rel_err(torch.from_numpy(np.load(tmp / "l.npy")), ref.logits) < bound["logits"]
    assert rel_err(torch.from_numpy(np.load(tmp / "h.npy")), ref.hidden) < bound["hidden"]
    assert rel_err(load_state(tmp / "s.npz", model.model_id()).A, ref.state.A) < bound["A"]


def test_resume_through_state_files_equals_one_run(model_dir, files):
    tmp, ids = files
    np.save(tmp / "a.npy", ids[:, :12])
    np.save(tmp / "b.npy", ids[:, 12:])
    assert _run(model_dir, "--input-ids", tmp / "ids.npy", "--output", tmp / "whole.npy") == 0
    assert _run(model_dir, "--input-ids", tmp / "a.npy", "--state-out", tmp / "s.npz") == 0
    assert _run(model_dir, "--input-ids", tmp / "b.npy", "--state-in", tmp / "s.npz",
                "--output", tmp / "b_out.npy") == 0
    whole, part = np.load(tmp / "whole.npy"), np.load(tmp / "b_out.npy")
    assert np.abs(part - whole[:, 12:]).max() <= fp32_bounds(tiny_model("llama"), ids)["logits"] * np.abs(whole).max()


def test_padded_batch_via_cli(model_dir, files):
    tmp, ids = files
    mask = (np.arange(20)[None] < np.array([20, 9])[:, None]).astype(np.int64)
    np.save(tmp / "mask.npy", mask)
    np.save(tmp / "row1.npy", ids[1:, :9])
    assert _run(model_dir, "--input-ids", tmp / "ids.npy", "--attention-mask", tmp / "mask.npy",
                "--output", tmp / "batch.npy") == 0
    assert _run(model_dir, "--input-ids", tmp / "row1.npy", "--output", tmp / "row.npy") == 0
    batch, row = np.load(tmp / "batch.npy"), np.load(tmp / "row.npy")
    bound = fp32_bounds(tiny_model("llama"), ids, [20, 9])["logits"]
    assert np.abs(batch[1, :9] - row[0]).max() <= bound * np.abs(row).max()
    assert np.all(batch[1, 9:] == 0)


def test_bad_inputs_one_line_exit_2(model_dir, files, capsys):
    tmp, ids = files
    cases = []
    np.save(tmp / "float.npy", ids.astype(np.float32))
    cases.append((["--input-ids", tmp / "float.npy"], "integer"))
    np.save(tmp / "flat.npy", ids[0])
    cases.append((["--input-ids", tmp / "flat.npy"], "2-D"))
    np.save(tmp / "big.npy", ids + 61)
    cases.append((["--input-ids", tmp / "big.npy"], "must lie in [0, 61)"))
    np.save(tmp / "neg.npy", ids - 100)
    cases.append((["--input-ids", tmp / "neg.npy"], "must lie in"))
    cases.append((["--input-ids", tmp / "missing.npy"], "does not exist"))
    (tmp / "junk.npy").write_bytes(b"not an array")
    cases.append((["--input-ids", tmp / "junk.npy"], "not a readable .npy"))
    np.save(tmp / "left.npy", (np.arange(20)[None] >= np.array([0, 5])[:, None]).astype(np.int64))
    cases.append((["--input-ids", tmp / "ids.npy", "--attention-mask", tmp / "left.npy"], "right-padded"))
    np.save(tmp / "short_mask.npy", np.ones((2, 19), np.int64))
    cases.append((["--input-ids", tmp / "ids.npy", "--attention-mask", tmp / "short_mask.npy"], "shape"))
    np.save(tmp / "float_mask.npy", np.ones((2, 20), np.float32))
    cases.append((["--input-ids", tmp / "ids.npy", "--attention-mask", tmp / "float_mask.npy"], "0/1"))
    save_state(tmp / "foreign.npz", tiny_model("llama", seed=5).zero_state(2), tiny_model("llama", seed=5).model_id())
    cases.append((["--input-ids", tmp / "ids.npy", "--state-in", tmp / "foreign.npz"], "another model"))
    model = tiny_model("llama")
    save_state(tmp / "wrong_batch.npz", model.zero_state(3), model.model_id())
    cases.append((["--input-ids", tmp / "ids.npy", "--state-in", tmp / "wrong_batch.npz"], "memory state A has shape"))
    (tmp / "junk.npz").write_bytes(b"PK-not-a-zip")
    cases.append((["--input-ids", tmp / "ids.npy", "--state-in", tmp / "junk.npz"], "not a valid ARMT state file"))
    cases.append((["--input-ids", tmp / "ids.npy", "--precision", "fp8"], None))
    for args, match in cases:
        with pytest.raises(SystemExit) if match is None else contextlib.nullcontext():  # argparse exits itself
            code = _run(model_dir, *args)
            assert code == 2, (args, code)
            _one_line_error(capsys, match)


def test_not_a_model_dir(tmp_path, files, capsys):
    tmp, _ = files
    assert _run(tmp_path / "nowhere", "--input-ids", tmp / "ids.npy") == 2
    _one_line_error(capsys, "does not exist")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "manifest.json").write_text("{}")
    assert _run(tmp_path / "export", "--input-ids", tmp / "ids.npy") == 2
    _one_line_error(capsys, "is an export directory")
    assert _run(tmp_path / "nowhere", "--backend", "ort", "--input-ids", tmp / "ids.npy") == 2
    _one_line_error(capsys, "does not exist")


def test_state_written_is_bool_and_float32(model_dir, files):
    tmp, _ = files
    assert _run(model_dir, "--input-ids", tmp / "ids.npy", "--state-out", tmp / "s.npz",
                "--precision", "bf16") == 0
    st = load_state(tmp / "s.npz", tiny_model("llama").model_id())
    assert isinstance(st, MemoryState) and st.A.dtype == np.float32 and st.written.dtype == np.bool_
