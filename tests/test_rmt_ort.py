"""RMT exports: one rmt_segment graph with the memory (B, M, d) as input and output, on ONNX Runtime CPU
against the official implementation; padded batches, resume through state files, `armt verify`,
`inspect`, `build` (TensorRT-RTX), fp16, the diagonal refusal, and a host without torch.

Three exports, made once for this module (tracing is the slow part): the official rmt-llama and
rmt-gpt2-wrap-pos fixtures in fp32 (validated at export), and a tiny LLaMA RMT in fp16."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from armt.cli import main
from exporter.manifest import load_manifest
from graphs.modeldir import load_model_dir, save_model_dir
from graphs.state import RmtState, load_state
from runtimes.execute import run_schedule
from runtimes.ort_runner import OrtRunner
from runtimes.validation import export_model
from tests.helpers import rel_err, tiny_rmt
from tests.test_rmt import FIXTURES, TOL, load, official, one_line_error, settings
from tests.test_runtime_ort import rechecksum

ROOT = Path(__file__).resolve().parent.parent
OFFICIAL = ("rmt-llama", "rmt-gpt2-wrap-pos")


def _fresh(kind: str):
    return tiny_rmt("llama", seed=7) if kind == "tiny-fp16" else load(kind)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """kind -> (export dir, model dir)."""
    root = tmp_path_factory.mktemp("rmt-exports")
    out = {}
    for kind, precision in (("rmt-llama", "fp32"), ("rmt-gpt2-wrap-pos", "fp32"), ("tiny-fp16", "fp16")):
        model_dir = save_model_dir(_fresh(kind), root / kind / "model")
        export_model(_fresh(kind), root / kind / "export", precision=precision, validate=True, decode=False)
        out[kind] = (root / kind / "export", model_dir)
    return out


def test_export_holds_one_rmt_segment_graph(exports):
    d, _ = exports["rmt-llama"]
    m = load_manifest(d)
    s = settings("rmt-llama")
    M = s["num_mem_tokens"]
    assert list(m.graphs) == ["rmt_segment", "lm_head"] and (d / "rmt_segment.onnx").is_file()
    assert "logits" not in [t.name for t in m.graph("rmt_segment").outputs]  # logits on demand: lm_head
    assert not (d / "segment.onnx").exists() and not (d / "diagonal_step.onnx").exists()
    assert m.model["armt_config"]["kind"] == "rmt" and m.model_config().kind == "rmt"
    assert "d_key" not in m.dims and m.dims["mem_tokens"] == M
    g = m.graph("rmt_segment")
    specs = {t.name: t for t in (*g.inputs, *g.outputs)}
    assert specs["memory_in"].shape == ("batch", M, 32) and specs["memory_in"].dtype == "float32"
    assert specs["memory_out"].shape == ("batch", M, 32) and specs["written_in"].shape == ("batch",)
    assert "A_in" not in specs and "hidden_in" not in specs
    assert m.validation["status"] == "passed"
    rows = {r["name"]: r for r in m.validation["graphs"]["rmt_segment"]["outputs"]}
    assert rows["memory_out"]["ok"] and rows["memory_out"]["rel"] < TOL
    script = (d / "polygraphy_data_loader.py").read_text()
    assert "'rmt_segment': 'rmt_segment.onnx'" in script and "diagonal_step.onnx'" not in script
    fp16 = load_manifest(exports["tiny-fp16"][0]).graph("rmt_segment")
    assert {t.name: t.dtype for t in fp16.inputs}["memory_in"] == "float16"  # the compute dtype


@pytest.mark.parametrize("name", OFFICIAL)
def test_ort_reproduces_official_per_segment(exports, name):
    d, _ = exports[name]
    with OrtRunner(d, "rmt_segment") as runner:
        got = run_schedule(runner, official(name, "input_ids"), trace=True)
    assert rel_err(got.logits, official(name, "logits")) < TOL
    assert rel_err(got.hidden, official(name, "hidden")) < TOL
    assert isinstance(got.state, RmtState) and rel_err(got.state.memory, official(name, "memory")) < TOL
    per_segment = official(name, "memory_per_segment")
    assert len(got.segment_states) == per_segment.shape[0]
    for s, st in enumerate(got.segment_states):
        assert rel_err(st.memory, per_segment[s]) < TOL, s


def test_ort_padded_batch_equals_single_rows(exports):
    d, _ = exports["rmt-gpt2-wrap-pos"]
    T = settings("rmt-gpt2-wrap-pos")["segment_size"]
    lengths = [3 * T + 2, T, 2]
    N = max(lengths)
    ids = np.random.default_rng(8).integers(0, 64, (3, N))
    mask = (np.arange(N)[None] < np.array(lengths)[:, None]).astype(np.int64)
    with OrtRunner(d, "rmt_segment") as runner:
        batch = run_schedule(runner, ids, mask, trace=True)
        for b, n in enumerate(lengths):
            alone = run_schedule(runner, ids[b:b + 1, :n])
            assert rel_err(batch.logits[b, :n], alone.logits[0]) < TOL, b
            assert rel_err(batch.state.memory[b], alone.state.memory[0]) < TOL, b
            last = -(-n // T) - 1
            for st in batch.segment_states[last:]:  # an ended row keeps its memory bit for bit
                assert np.array_equal(st.memory[b], batch.segment_states[last].memory[b])
    with torch.no_grad():
        ref = load("rmt-gpt2-wrap-pos")(torch.from_numpy(ids), torch.from_numpy(mask))
    assert rel_err(batch.logits, ref.logits) < TOL and rel_err(batch.state.memory, ref.state.memory) < TOL


def test_cli_run_resume_and_diagonal_refusal(exports, tmp_path, capsys):
    d, _ = exports["rmt-llama"]
    T = settings("rmt-llama")["segment_size"]
    ids = official("rmt-llama", "input_ids")
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "a.npy", ids[:, :2 * T])
    np.save(tmp_path / "b.npy", ids[:, 2 * T:])
    run = lambda *a: main(["run", str(d), "--backend", "ort", "--no-progress", *map(str, a)])  # noqa: E731
    assert run("--input-ids", tmp_path / "ids.npy", "--output", tmp_path / "whole.npy") == 0
    assert run("--input-ids", tmp_path / "a.npy", "--output", tmp_path / "a_out.npy", "--state-out", tmp_path / "s.npz") == 0
    assert run("--input-ids", tmp_path / "b.npy", "--state-in", tmp_path / "s.npz", "--output", tmp_path / "b_out.npy",
               "--state-out", tmp_path / "s2.npz", "--schedule", "sequential") == 0
    whole = np.load(tmp_path / "whole.npy")
    assert rel_err(whole, official("rmt-llama", "logits")) < TOL
    parts = np.concatenate([np.load(tmp_path / "a_out.npy"), np.load(tmp_path / "b_out.npy")], axis=1)
    assert rel_err(parts, whole) < TOL
    final = load_state(tmp_path / "s2.npz", load_manifest(d).model_id)
    assert rel_err(final.memory, official("rmt-llama", "memory")) < TOL
    capsys.readouterr()
    assert run("--input-ids", tmp_path / "ids.npy", "--schedule", "diagonal") == 2
    one_line_error(capsys, "diagonal batching does not apply to an RMT")


def test_fp16_run_and_resume_through_a_state_file(exports, tmp_path):
    d, model_dir = exports["tiny-fp16"]
    ids = np.random.default_rng(9).integers(0, 61, (2, 20))
    with OrtRunner(d, "rmt_segment") as runner:
        whole = run_schedule(runner, ids)
        first = run_schedule(runner, ids[:, :12])
        assert first.state.memory.dtype == np.float16
        from graphs.state import save_state
        save_state(tmp_path / "s.npz", first.state, runner.model_id)
        second = run_schedule(runner, ids[:, 12:], state=load_state(tmp_path / "s.npz", runner.model_id))
    # fp16 memory stored as float16 and fed back unchanged: the resumed run is the same computation
    assert np.array_equal(np.concatenate([first.logits, second.logits], 1), whole.logits)
    assert main(["verify", str(d), "--model", str(model_dir), "--precision", "fp16"]) == 0


def test_verify_passes_and_refuses_diagonal(exports, capsys):
    d, model_dir = exports["rmt-llama"]
    assert main(["verify", str(d), "--model", str(model_dir), "--per-graph"]) == 0
    out = capsys.readouterr().out
    assert "20/20 comparisons within bounds (fp32)" in out  # 4 cases x 4 tensors + 4 per-graph outputs
    assert "memory" in out and "graph rmt_segment" in out and "diagonal" not in out
    assert main(["verify", str(d)]) == 0  # the reference rebuilt from the export's own weights
    capsys.readouterr()
    assert main(["verify", str(d), "--schedule", "sequential,diagonal"]) == 2
    one_line_error(capsys, "diagonal batching does not apply to an RMT")


def test_altered_weight_fails_verify(exports, tmp_path, capsys):
    """One weight of the graph changed by 0.01 in weights.data, checksums recomputed: only parity catches it."""
    from tests.test_verify import _largest_external_tensor
    d0, model_dir = exports["rmt-llama"]
    d = tmp_path / "altered"
    shutil.copytree(d0, d)
    _, location, offset, length = _largest_external_tensor(d / "rmt_segment.onnx")
    with open(d / location, "r+b") as f:
        f.seek(offset + 4 * (length // 8))  # a float32 in the middle of the tensor
        value = np.frombuffer(f.read(4), np.float32)[0]
        f.seek(offset + 4 * (length // 8))
        f.write(np.float32(value + 0.01).tobytes())
    rechecksum(d)
    assert main(["verify", str(d), "--model", str(model_dir), "--per-graph"]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "polygraphy: mismatch" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("armt verify: error:") and "missed" in err[0]


def test_inspect_shows_the_rmt_graph(exports, capsys):
    assert main(["inspect", str(exports["rmt-gpt2-wrap-pos"][0])]) == 0
    out = capsys.readouterr().out
    assert "RMT segment 6, 3 memory tokens" in out and "wrap_pos" in out
    assert "memory_in" in out and "(batch, 3, 32)" in out and "diagonal_step" not in out
    assert "fused ops" in out and "lm_head" in out  # fp32: attention written out, no fused op ("-")


def test_ort_rmt_last_logits_and_none(exports, tmp_path):
    """Logits on demand for the RMT: each row's last real position (padded batch, and a resumed call)
    equals the all-positions logits there; --logits none computes no logits."""
    d, _ = exports["rmt-llama"]
    ids = official("rmt-llama", "input_ids").astype(np.int64)
    B, N = ids.shape
    mask = np.ones((B, N), np.int64)
    mask[-1, N // 2:] = 0
    lengths = mask.sum(1)
    with OrtRunner(d, "rmt_segment") as runner:
        full = run_schedule(runner, ids, mask, collect=("logits",))
        last = run_schedule(runner, ids, mask, collect=("last_logits",))
        none = run_schedule(runner, ids, mask, collect=())
        first = run_schedule(runner, ids[:, :5], collect=("last_logits",))
        rest = run_schedule(runner, ids[:, 5:], state=first.state, collect=("last_logits",))
        whole = run_schedule(runner, ids, collect=("logits",))
    want = np.stack([full.logits[b, n - 1] for b, n in enumerate(lengths)])
    assert rel_err(last.last_logits, want) < TOL and none.logits is None and none.last_logits is None
    assert rel_err(rest.last_logits, whole.logits[:, -1]) < TOL
    assert rel_err(first.last_logits, whole.logits[:, 4]) < TOL


def _have_trt_rtx() -> bool:
    try:
        import tensorrt_rtx  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.trt
@pytest.mark.skipif(not _have_trt_rtx(), reason="tensorrt_rtx is not installed (pip install '.[trt]')")
def test_build_engine_and_trt_is_not_run_here(exports, tmp_path, capsys):
    d = tmp_path / "export"
    shutil.copytree(exports["rmt-llama"][0], d)
    assert main(["build", str(d), "--builder", "tensorrt_rtx", "--max-batch", "4"]) == 0
    m = load_manifest(d, verify_checksums=True)
    (e,) = m.graph("rmt_segment").engines
    T, M = settings("rmt-llama")["segment_size"], settings("rmt-llama")["num_mem_tokens"]
    prof = e.profiles[0]
    assert prof["input_ids"].max == (4, T) and prof["positions"].max == (4, T + 2 * M)  # slot = width + 2M
    assert prof["positions"].min == (1, 1 + 2 * M) and prof["memory_in"].max == (4, M, 32)
    assert (d / e.file).stat().st_size > 1000
    code = main(["verify", str(d), "--backend", "ort,trt"])
    captured = capsys.readouterr()
    if code == 3:  # no GPU TensorRT-RTX runs on: reported, never counted as passed
        assert "NOT RUN" in captured.out and "trt" in captured.out
    else:
        assert code == 0, captured.out


def test_host_without_torch_runs_an_rmt_export(exports, tmp_path):
    """The ORT path of an RMT (contract, slots, state, loop, CLI) imports no torch."""
    d, _ = exports["rmt-gpt2-wrap-pos"]
    ids_path = tmp_path / "ids.npy"
    np.save(ids_path, official("rmt-gpt2-wrap-pos", "input_ids"))
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
            "from armt.cli import main\n"
            "rc = main(sys.argv[1:])\n"
            "assert not any(k == 'torch' or k.startswith('torch.') for k in sys.modules if sys.modules[k]), 'torch'\n"
            "sys.exit(rc)")
    args = ["run", str(d), "--backend", "ort", "--input-ids", str(ids_path), "--output", str(tmp_path / "l.npy"),
            "--state-out", str(tmp_path / "s.npz"), "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert rel_err(np.load(tmp_path / "l.npy"), official("rmt-gpt2-wrap-pos", "logits")) < TOL
    with np.load(tmp_path / "s.npz") as st:
        assert str(st["kind"]) == "rmt"
