"""Checkpoints of the official ARMT code convert, and `armt run` reproduces the official logits.

The fixtures under tests/fixtures/official/ were produced by running the official implementation
(RodkinIvan/associative-recurrent-memory-transformer, transformers 4.46.3, fp32, eager attention) with
tools/make_official_fixtures.py: batch 2, several segments, a short last one. Each holds the wrapper's
state_dict, the base config, the settings, the input ids and the official logits, last hidden state
and final memory (A, z) of every layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from graphs.checkpoint import convert_official, load_official
from graphs.modeldir import load_model_dir
from armt.cli import main as armt
from tests.helpers import rel_err
from tests.precision import fp32_bounds

FIXTURES = Path(__file__).parent / "fixtures" / "official"
NAMES = ("llama", "llama-nocorr-bias", "gpt2", "gpt2-wrap-pos")
SCHEDULES = ("sequential", "diagonal")


def test_all_fixtures_present():
    armt = [p.name for p in FIXTURES.iterdir() if p.is_dir()
            and json.loads((p / "armt.json").read_text()).get("kind", "armt") == "armt"]
    assert sorted(armt) == sorted(NAMES)


def settings(name: str) -> dict:
    return json.loads((FIXTURES / name / "armt.json").read_text())


def cli_flags(name: str) -> list[str]:
    s = settings(name)
    flags = ["--segment-size", str(s["segment_size"]), "--num-mem-tokens", str(s["num_mem_tokens"]),
             "--d-mem", str(s["d_mem"])]
    if s["wrap_pos"]:
        flags.append("--wrap-pos")
    if not s["correction"]:
        flags.append("--no-correction")
    return flags


def official(name: str, what: str) -> torch.Tensor:
    return torch.from_numpy(np.load(FIXTURES / name / f"{what}.npy"))


def load(name: str):
    s, d = settings(name), FIXTURES / name
    return load_official(d / "checkpoint.pt", d, s["segment_size"], s["num_mem_tokens"], s["d_mem"],
                         wrap_pos=s["wrap_pos"], correction=s["correction"])


def tol(name: str) -> dict[str, float]:
    """fp32 bounds per tensor kind, derived on the fixture's model and its own inputs (tests/precision.py);
    the official outputs are another fp32 realisation of the same computation. Keys also in the
    fixtures' names (memory_A, memory_z)."""
    b = fp32_bounds(load(name), official(name, "input_ids"))
    return dict(b, memory_A=b["A"], memory_z=b["z"])


@pytest.mark.parametrize("name", NAMES)
def test_fixture_shape(name):
    """The fixtures really have batch 2, several segments and a short last one."""
    s, ids = settings(name), official(name, "input_ids")
    T = s["segment_size"]
    assert ids.shape[0] == 2 and ids.dtype == torch.int64
    assert ids.shape[1] // T >= 2 and ids.shape[1] % T != 0


@pytest.mark.parametrize("name", NAMES)
def test_cli_convert_and_run_match_official(name, tmp_path, capsys):
    d = FIXTURES / name
    model_dir = tmp_path / "model"
    assert armt(["convert-official", str(d / "checkpoint.pt"), "--base-config", str(d), *cli_flags(name),
                 "-o", str(model_dir)]) == 0
    ref, bound = official(name, "logits"), tol(name)
    for schedule in SCHEDULES:
        out, state = tmp_path / f"logits-{schedule}.npy", tmp_path / f"state-{schedule}.npz"
        assert armt(["run", str(model_dir), "--input-ids", str(d / "input_ids.npy"), "--output", str(out),
                     "--schedule", schedule, "--state-out", str(state)]) == 0
        logits = torch.from_numpy(np.load(out))
        assert logits.dtype == torch.float32 and logits.shape == ref.shape
        assert rel_err(logits, ref) < bound["logits"], (schedule, rel_err(logits, ref))
        with np.load(state, allow_pickle=False) as st:
            assert rel_err(torch.from_numpy(st["A"]), official(name, "memory_A")) < bound["A"]
            assert rel_err(torch.from_numpy(st["z"]), official(name, "memory_z")) < bound["z"]
    assert capsys.readouterr().err.count("error") == 0


@pytest.mark.parametrize("name", NAMES)
def test_python_api_matches_official_per_tensor(name, tmp_path):
    model = load(name)
    ids = official(name, "input_ids")
    ref = {k: official(name, k) for k in ("logits", "hidden", "memory_A", "memory_z")}
    bound = tol(name)
    for schedule in SCHEDULES:
        with torch.no_grad():
            out = model(ids, schedule=schedule)
        got = {"logits": out.logits, "hidden": out.hidden, "memory_A": out.state.A, "memory_z": out.state.z}
        for key, value in got.items():
            assert rel_err(value, ref[key]) < bound[key], (schedule, key, rel_err(value, ref[key]), bound[key])
    # the directory written by the Python API loads to the same model, bit for bit
    s, d = settings(name), FIXTURES / name
    convert_official(d / "checkpoint.pt", d, tmp_path / "m", segment_size=s["segment_size"],
                     num_mem_tokens=s["num_mem_tokens"], d_mem=s["d_mem"], wrap_pos=s["wrap_pos"],
                     correction=s["correction"])
    reloaded = load_model_dir(tmp_path / "m")
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_memory_matters_in_fixture(name):
    """With the memory silenced (W_mv = 0, so A stays 0 and every read adds 0) the first segment is
    unchanged and the later ones move far beyond the tolerance: the fixtures test the memory."""
    model = load(name)
    ids, ref = official(name, "input_ids"), official(name, "logits")
    T = settings(name)["segment_size"]
    with torch.no_grad():
        model.mem["w_v"].zero_()
        out = model(ids, schedule="sequential")
    assert rel_err(out.logits[:, :T], ref[:, :T]) < tol(name)["logits"]
    assert rel_err(out.logits[:, T:], ref[:, T:]) > 0.05
