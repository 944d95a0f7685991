"""The RMT (Recurrent Memory Transformer) next to the ARMT, on torch: official parity, the memory's
effect, padded batches, resume, the diagonal refusal, model directories, conversion errors, state
files, the bench.

The fixtures tests/fixtures/official/rmt-* were made by running the official RecurrentWrapper(
MemoryCell(...)) (tools/make_official_fixtures.py): batch 2, several segments, a short last one;
logits, hidden states, the memory after every segment. ONNX Runtime: tests/test_rmt_ort.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from armt.cli import main
from graphs.checkpoint import convert_official, load_official_rmt
from graphs.config import ModelConfig, RmtConfig, parse_base_config, wrapper_config_from_dict
from graphs.contracts import DIAGONAL_REFUSAL, contract, role_for
from graphs.errors import ConfigError, InputError
from graphs.modeldir import load_config, load_model_dir, save_model_dir
from graphs.rmt import RmtModel
from graphs.state import MemoryState, RmtState, load_state, save_state
from runtimes.execute import run_schedule
from runtimes.torch_runner import TorchRunner, run_torch
from tests.helpers import TINY_BASES, rel_err, tiny_model, tiny_rmt
from tests.precision import fp32_bound
from tests.precision import LazyBound, model_bound

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "official"
NAMES = ("rmt-llama", "rmt-gpt2", "rmt-gpt2-wrap-pos")
# fp32: derived on the module's models (the three official RMT fixtures and the tiny RMTs), tests/precision.py
TOL = LazyBound(lambda: max([model_bound(load(n)) for n in NAMES]
                            + [model_bound(tiny_rmt(a, **kw)) for a, kw in (("llama", {}), ("gpt2", {"wrap_pos": True}))]))


def settings(name: str) -> dict:
    return json.loads((FIXTURES / name / "armt.json").read_text())


def official(name: str, what: str) -> np.ndarray:
    return np.load(FIXTURES / name / f"{what}.npy")


def load(name: str) -> RmtModel:
    s = settings(name)
    return load_official_rmt(FIXTURES / name / "checkpoint.pt", FIXTURES / name, s["segment_size"],
                             s["num_mem_tokens"], wrap_pos=s["wrap_pos"])


def cli_flags(name: str) -> list[str]:
    s = settings(name)
    return ["--kind", "rmt", "--segment-size", str(s["segment_size"]), "--num-mem-tokens", str(s["num_mem_tokens"]),
            *(["--wrap-pos"] if s["wrap_pos"] else [])]


def one_line_error(capsys, *expect: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "Traceback" not in err[0], err
    for e in expect:
        assert e in err[0], err[0]
    return err[0]


def test_rmt_fixtures_present_and_shaped():
    rmt = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()
                 and json.loads((p / "armt.json").read_text()).get("kind") == "rmt")
    assert rmt == sorted(NAMES)
    for name in NAMES:
        ids, T = official(name, "input_ids"), settings(name)["segment_size"]
        assert ids.shape[0] == 2 and ids.shape[1] // T >= 2 and ids.shape[1] % T != 0


# ------------------------------------------------------------------------------- official parity
@pytest.mark.parametrize("name", NAMES)
def test_model_matches_official_per_segment(name):
    """Logits, hidden states and the memory after every segment, against the official code."""
    model = load(name)
    assert isinstance(model, RmtModel) and model.cfg.kind == "rmt"
    ids = torch.from_numpy(official(name, "input_ids"))
    with torch.no_grad():
        out = model(ids, trace=True)
    assert rel_err(out.logits, official(name, "logits")) < TOL
    assert rel_err(out.hidden, official(name, "hidden")) < TOL
    assert rel_err(out.state.memory, official(name, "memory")) < TOL
    per_segment = official(name, "memory_per_segment")
    assert len(out.segment_states) == per_segment.shape[0]
    for s, st in enumerate(out.segment_states):
        assert rel_err(st.memory, per_segment[s]) < TOL, s
    assert bool(out.state.written.all())


@pytest.mark.parametrize("name", NAMES)
def test_runner_loop_matches_official(name):
    """The graph-shaped cell through the one schedule loop (what the exporter traces)."""
    model = load(name)
    with TorchRunner(model, role_for(model.cfg, "sequential")) as runner:
        assert runner.role == "rmt_segment"
        res = run_schedule(runner, official(name, "input_ids"), trace=True)
    assert rel_err(res.logits, official(name, "logits")) < TOL
    assert rel_err(res.hidden, official(name, "hidden")) < TOL
    assert isinstance(res.state, RmtState) and rel_err(res.state.memory, official(name, "memory")) < TOL
    for s, st in enumerate(res.segment_states):
        assert rel_err(st.memory, official(name, "memory_per_segment")[s]) < TOL


@pytest.mark.parametrize("name", ["rmt-llama", "rmt-gpt2-wrap-pos"])
def test_cli_convert_and_run_match_official(name, tmp_path, capsys):
    d = FIXTURES / name
    model_dir = tmp_path / "model"
    assert main(["convert-official", str(d / "checkpoint.pt"), "--base-config", str(d), *cli_flags(name),
                 "-o", str(model_dir)]) == 0
    assert json.loads((model_dir / "armt_config.json").read_text())["kind"] == "rmt"
    out, state = tmp_path / "logits.npy", tmp_path / "state.npz"
    # no --schedule: an RMT runs sequential by default
    assert main(["run", str(model_dir), "--input-ids", str(d / "input_ids.npy"), "--output", str(out),
                 "--hidden-output", str(tmp_path / "hidden.npy"), "--state-out", str(state)]) == 0
    assert rel_err(np.load(out), official(name, "logits")) < TOL
    assert rel_err(np.load(tmp_path / "hidden.npy"), official(name, "hidden")) < TOL
    st = load_state(state, load_model_dir(model_dir).model_id())
    assert isinstance(st, RmtState) and st.memory.dtype == np.float32
    assert rel_err(st.memory, official(name, "memory")) < TOL
    assert "error" not in capsys.readouterr().err


def test_python_api_directory_round_trip(tmp_path):
    model = load("rmt-gpt2-wrap-pos")
    s = settings("rmt-gpt2-wrap-pos")
    out = convert_official(FIXTURES / "rmt-gpt2-wrap-pos" / "checkpoint.pt", FIXTURES / "rmt-gpt2-wrap-pos",
                           tmp_path / "m", kind="rmt", segment_size=s["segment_size"],
                           num_mem_tokens=s["num_mem_tokens"], wrap_pos=True)
    reloaded = load_model_dir(out)
    assert reloaded.cfg == model.cfg and reloaded.model_id() == model.model_id()
    for (ka, a), (kb, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "rmt.memory" in keys and "transformer.wpe.weight" in keys
    assert not any(k.startswith("armt.") for k in keys)  # no ARMT memory weights
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("transformer.wpe.weight").shape[0] == 24 + 2 * 3  # n_positions + 2M


def test_armt_directories_keep_loading():
    """A directory written before the kind existed (no "kind" key) is an ARMT."""
    assert "kind" not in json.loads((ROOT / "models" / "armt-recall" / "armt_config.json").read_text())
    assert load_config(ROOT / "models" / "armt-recall").kind == "armt"
    assert wrapper_config_from_dict({"kind": "armt", "architecture": "llama", "segment_size": 4,
                                     "num_mem_tokens": 2, "d_mem": 3}).d_key == 18


# ------------------------------------------------------------------------------- the memory matters
@pytest.mark.parametrize("name", NAMES)
def test_zeroing_the_carried_memory_changes_late_logits(name):
    """Resume after segment 0 from the true memory: equal to one call. From the memory zeroed (still
    marked written, so the zeros are read): segment 1 on move far beyond the tolerance."""
    model = load(name)
    T = settings(name)["segment_size"]
    ids = torch.from_numpy(official(name, "input_ids"))
    with torch.no_grad():
        whole = model(ids)
        first = model(ids[:, :T])
        rest = model(ids[:, T:], state=first.state)
        zeroed = model(ids[:, T:], state=RmtState(torch.zeros_like(first.state.memory), first.state.written))
    assert rel_err(first.logits, whole.logits[:, :T]) < TOL
    assert rel_err(rest.logits, whole.logits[:, T:]) < TOL
    assert rel_err(zeroed.logits, whole.logits[:, T:]) > 0.1
    assert rel_err(zeroed.logits[:, -2:], whole.logits[:, -2:]) > 0.05  # still at the last segment


def test_fresh_state_reads_the_learned_memory():
    """written=False rows read the learned memory whatever `memory` holds; written=True rows read it."""
    model = tiny_rmt("llama", seed=1)
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(0))
    junk = torch.randn(2, 3, 32)
    with torch.no_grad():
        fresh = model(ids)
        ignored = model(ids, state=RmtState(junk, torch.zeros(2, dtype=torch.bool)))
        read = model(ids, state=RmtState(junk, torch.ones(2, dtype=torch.bool)))
    assert torch.equal(fresh.logits, ignored.logits)
    assert rel_err(read.logits, fresh.logits) > 0.05


# ------------------------------------------------------------------------------- batches, resume
@pytest.mark.parametrize("arch, wrap", [("llama", False), ("gpt2", False), ("gpt2", True)])
def test_padded_batch_equals_single_rows(arch, wrap):
    model = tiny_rmt(arch, seed=2, wrap_pos=wrap)
    T = model.cfg.armt.segment_size
    lengths = [3 * T + 2, T, 2, 2 * T - 1]
    N = max(lengths)
    ids = torch.randint(0, 61, (4, N), generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(N)[None] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        batch = model(ids, mask, trace=True)
        for b, n in enumerate(lengths):
            alone = model(ids[b:b + 1, :n])
            assert rel_err(batch.logits[b, :n], alone.logits[0]) < TOL, b
            assert rel_err(batch.hidden[b, :n], alone.hidden[0]) < TOL, b
            assert rel_err(batch.state.memory[b], alone.state.memory[0]) < TOL, b
            assert torch.all(batch.logits[b, n:] == 0)
            # a row that ended keeps its memory bit for bit through the later segments
            last = -(-n // T) - 1
            for st in batch.segment_states[last:]:
                assert torch.equal(st.memory[b], batch.segment_states[last].memory[b])


def test_resume_at_a_segment_boundary_via_state_files(tmp_path):
    model = tiny_rmt("gpt2", seed=4, wrap_pos=True)
    model_dir = save_model_dir(model, tmp_path / "m")
    T = model.cfg.armt.segment_size
    ids = np.random.default_rng(5).integers(0, 61, (2, 3 * T + 2))
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "a.npy", ids[:, :2 * T])
    np.save(tmp_path / "b.npy", ids[:, 2 * T:])
    run = lambda *a: main(["run", str(model_dir), "--no-progress", *map(str, a)])  # noqa: E731
    assert run("--input-ids", tmp_path / "ids.npy", "--output", tmp_path / "whole.npy", "--state-out", tmp_path / "w.npz") == 0
    assert run("--input-ids", tmp_path / "a.npy", "--output", tmp_path / "a_out.npy", "--state-out", tmp_path / "s.npz") == 0
    assert run("--input-ids", tmp_path / "b.npy", "--state-in", tmp_path / "s.npz", "--output", tmp_path / "b_out.npy",
               "--state-out", tmp_path / "s2.npz") == 0
    whole = np.load(tmp_path / "whole.npy")
    parts = np.concatenate([np.load(tmp_path / "a_out.npy"), np.load(tmp_path / "b_out.npy")], axis=1)
    assert rel_err(parts, whole) < TOL
    mid = model.model_id()
    assert rel_err(load_state(tmp_path / "s2.npz", mid).memory, load_state(tmp_path / "w.npz", mid).memory) < TOL
    # without the state the second part is another computation
    assert run("--input-ids", tmp_path / "b.npy", "--output", tmp_path / "b_fresh.npy") == 0
    assert rel_err(np.load(tmp_path / "b_fresh.npy"), whole[:, 2 * T:]) > 0.05


# ------------------------------------------------------------------------------- refusals
def test_diagonal_is_refused_with_one_line(tmp_path, capsys):
    model = tiny_rmt("llama")
    model_dir = save_model_dir(model, tmp_path / "m")
    np.save(tmp_path / "ids.npy", np.zeros((1, 8), np.int64))
    assert main(["run", str(model_dir), "--input-ids", str(tmp_path / "ids.npy"), "--schedule", "diagonal"]) == 2
    one_line_error(capsys, "diagonal batching does not apply to an RMT", "--schedule sequential")
    assert main(["bench", str(model_dir), "--schedules", "full,diagonal", "--lengths", "8"]) == 2
    one_line_error(capsys, "diagonal batching does not apply to an RMT")
    with pytest.raises(InputError, match="does not apply to an RMT"):
        role_for(model.cfg, "diagonal")
    with pytest.raises(InputError, match="does not apply to an RMT"):
        contract(model.cfg, "diagonal_step")
    with pytest.raises(InputError, match="does not apply to an RMT"):
        model(torch.zeros(1, 8, dtype=torch.int64), schedule="diagonal")
    with pytest.raises(InputError, match="does not apply to an RMT"):
        run_torch(model, np.zeros((1, 8), np.int64), schedule="diagonal")
    assert DIAGONAL_REFUSAL.count("\n") == 0


def test_states_of_the_other_kind_are_refused(tmp_path, capsys):
    rmt, armt = tiny_rmt("llama"), tiny_model("llama")
    with pytest.raises(InputError, match="ARMT state; this model is an RMT"):
        rmt(torch.zeros(2, 4, dtype=torch.int64), state=armt.zero_state(2))
    with pytest.raises(InputError, match="RMT state; this model is an ARMT"):
        armt(torch.zeros(2, 4, dtype=torch.int64), state=rmt.zero_state(2), schedule="sequential")
    with pytest.raises(InputError, match="memory has shape"):
        rmt(torch.zeros(2, 4, dtype=torch.int64), state=rmt.zero_state(3))
    model_dir = save_model_dir(rmt, tmp_path / "m")
    np.save(tmp_path / "ids.npy", np.zeros((2, 4), np.int64))
    save_state(tmp_path / "armt.npz", armt.zero_state(2), armt.model_id())
    assert main(["run", str(model_dir), "--input-ids", str(tmp_path / "ids.npy"), "--state-in",
                 str(tmp_path / "armt.npz")]) == 2
    one_line_error(capsys, "another model")


def test_state_file_round_trip_keeps_kind_and_stores_bf16_as_float32(tmp_path):
    mem = torch.randn(2, 3, 32).to(torch.bfloat16)
    state = RmtState(mem, torch.tensor([True, False]))
    save_state(tmp_path / "s.npz", state, "model-x")
    back = load_state(tmp_path / "s.npz", "model-x")
    assert isinstance(back, RmtState) and back.memory.dtype == np.float32
    assert np.array_equal(back.memory, mem.float().numpy()) and back.written.tolist() == [True, False]
    save_state(tmp_path / "a.npz", MemoryState.zeros(2, 1, 4, 8), "model-y")
    with np.load(tmp_path / "a.npz") as data:
        assert "kind" not in data.files  # ARMT state files keep their format
    assert isinstance(load_state(tmp_path / "a.npz", "model-y"), MemoryState)


def test_config_checks():
    with pytest.raises(ConfigError, match="keys an RMT does not have: d_mem"):
        wrapper_config_from_dict({"kind": "rmt", "architecture": "llama", "segment_size": 4,
                                  "num_mem_tokens": 2, "d_mem": 3})
    with pytest.raises(ConfigError, match="kind must be one of armt, rmt"):
        wrapper_config_from_dict({"kind": "lstm", "architecture": "llama"})
    with pytest.raises(ConfigError, match="wrap_pos applies to GPT-2"):
        RmtConfig("llama", 4, 2, wrap_pos=True)
    base = parse_base_config(dict(TINY_BASES["gpt2"], n_positions=12))
    with pytest.raises(ConfigError, match="segment_size \\+ 2 \\* num_mem_tokens = 14 exceeds"):
        ModelConfig(base, RmtConfig("gpt2", 8, 3))
    assert ModelConfig(base, RmtConfig("gpt2", 8, 3, wrap_pos=True)).pos_table_rows == 12 + 6


@pytest.mark.parametrize("ckpt, flags, expect", [
    ("rmt-llama", ["--kind", "rmt", "--segment-size", "5", "--num-mem-tokens", "3", "--d-mem", "4"],
     "--d-mem: ARMT settings"),
    ("rmt-llama", ["--segment-size", "5", "--num-mem-tokens", "3", "--d-mem", "4"], "pass --kind rmt"),
    ("rmt-llama", ["--segment-size", "5", "--num-mem-tokens", "3"], "--d-mem is required"),
    ("llama", ["--kind", "rmt", "--segment-size", "5", "--num-mem-tokens", "3"], "convert it with --kind armt"),
    ("rmt-gpt2-wrap-pos", ["--kind", "rmt", "--segment-size", "6", "--num-mem-tokens", "3"], "pass --wrap-pos"),
    ("rmt-gpt2", ["--kind", "rmt", "--segment-size", "6", "--num-mem-tokens", "2", "--wrap-pos"], "drop --wrap-pos"),
    ("rmt-llama", ["--kind", "rmt", "--segment-size", "5", "--num-mem-tokens", "4"], "3 memory tokens"),
])
def test_convert_errors_one_line_nothing_written(ckpt, flags, expect, tmp_path, capsys):
    d = FIXTURES / ckpt
    code = main(["convert-official", str(d / "checkpoint.pt"), "--base-config", str(d), *flags,
                 "-o", str(tmp_path / "out")])
    assert code == 2
    one_line_error(capsys, expect)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- bench
def test_bench_rmt_full_and_sequential(tmp_path, capsys):
    model_dir = save_model_dir(tiny_rmt("llama", seed=6), tmp_path / "m")
    out = tmp_path / "bench.json"
    assert main(["bench", str(model_dir), "--precision", "fp32", "--lengths", "14,20", "--warmup", "0",
                 "--repeats", "1", "--parity-length", "20", "--output", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["meta"]["kind"] == "rmt"
    assert {(r["backend"], r["schedule"]) for r in rec["results"]} == {("torch", "full"), ("torch", "sequential")}
    assert all(r["median_ms"] > 0 and r["nonfinite"] == [] for r in rec["results"])
    assert {p["tensor"] for p in rec["parity"]} == {"hidden", "memory"}
    bound = fp32_bound(tiny_rmt("llama", seed=6), torch.randint(0, 61, (1, 20), generator=torch.Generator().manual_seed(0)))
    assert all(p["finite"] and p["max_rel"] < bound for p in rec["parity"]), (rec["parity"], bound)
    assert main(["bench", str(model_dir), "--backends", "torch-ref", "--lengths", "8"]) == 2
    one_line_error(capsys, "an RMT is benched on the backends torch, ort")
