"""`armt bench --backends torch,ort` on the CPU (tiny synthetic model, one export shared by the
tests): the same job on both backends (--logits last|none), the steady step, last-logits parity,
the targets in the record, and the bench's bad input. Speed itself is not tested (benchmarks are
not tests); the H200 run is results/run_h200_issue10.sh."""

from __future__ import annotations

import json
import math

import numpy as np

import pytest
import torch

from armt.bench import targets
from armt.cli import main
from tests.helpers import rel_err

TINY = ["--synthetic", "tiny", "--segment-size", "16", "--memory-tokens", "4", "--d-mem", "8",
        "--layers", "3", "--precision", "fp32", "--mem-std", "0.001", "--warmup", "0", "--repeats", "2"]
SIDE_BY_SIDE = ["--backends", "torch,ort", "--schedules", "diagonal"]


@pytest.fixture(scope="module")
def bench_export(tmp_path_factory):
    """(export dir, the first bench's record): the bench exports its own model (no validation) once."""
    root = tmp_path_factory.mktemp("bench-ort")
    out = root / "bench.json"
    rc = main(["bench", *TINY, *SIDE_BY_SIDE, "--lengths", "40", "--logits", "last", "--export-to",
               str(root / "export"), "--steady-step", "--step-calls", "2", "--parity-length", "40",
               "--output", str(out)])
    assert rc == 0
    return root / "export", json.loads(out.read_text())


def test_side_by_side_record(bench_export):
    _, rec = bench_export
    assert rec["complete"] and rec["meta"]["logits"] == "last"
    rows = {r["backend"]: r for r in rec["results"]}
    assert set(rows) == {"torch", "ort"}
    for r in rows.values():
        assert not r.get("error") and r["median_ms"] > 0 and r["nonfinite"] == [] and r["logits"] == "last"
    assert rows["ort"]["cuda_graph"] is False  # CPU: no CUDA graphs
    steps = {s["backend"]: s for s in rec["steady_step"]}
    assert set(steps) == {"torch", "ort"} and all(s["step_ms"] > 0 and len(s["times_ms"]) == 3 for s in steps.values())
    # parity: every backend's hidden, last logits, A, z against the fp32 reference (fp32: to rounding)
    got = {(p["backend"], p["schedule"], p["tensor"]) for p in rec["parity"]}
    for backend in ("torch-ref", "torch", "ort"):
        for tensor in ("hidden", "last_logits", "A", "z"):
            assert (backend, "diagonal", tensor) in got
    for p in rec["parity"]:
        assert p["finite"] and p["max_rel"] < 1e-4, p
    # the bench's own export holds the benched schedule's graphs only: no ort sequential parity row
    assert not any(b == "ort" and s == "sequential" for b, s, _ in got)
    from exporter.manifest import load_manifest
    assert set(load_manifest(bench_export[0], verify_checksums=False).graphs) == {"diagonal_step", "lm_head"}
    t = {x["target"]: x for x in rec["targets"]}
    time_t = t["ort / torch time, diagonal, 40 tokens, batch 1"]
    assert time_t["value"] == pytest.approx(rows["ort"]["median_ms"] / rows["torch"]["median_ms"])
    assert time_t["met"] == (time_t["value"] <= 1.25)
    step_t = t["ort / torch steady diagonal step"]
    assert step_t["value"] == pytest.approx(steps["ort"]["step_ms"] / steps["torch"]["step_ms"])
    parity_t = [x for x in rec["targets"] if x["target"].startswith("parity")]
    assert parity_t and all(x["met"] is None for x in parity_t)  # fp32: the target is for fp16/bf16


def test_same_job_same_last_logits(bench_export):
    """--logits last: ort (the export's lm_head graph) and torch give the same (B, V) logits of the
    last position, and the same final memory."""
    from armt.bench.workloads import Workloads, build_model
    export_dir, _ = bench_export
    model = build_model("tiny", None, 16, 4, 8, 0.02, 0.001, 0, {"num_hidden_layers": 3})
    work = Workloads(model, torch.device("cpu"), "fp32", export_dir=str(export_dir), logits="last")
    ids = torch.randint(0, model.cfg.base.vocab_size, (2, 37), generator=torch.Generator().manual_seed(5))
    try:
        ort = work.callable("ort", "diagonal", ids)()
        fast = work.callable("torch", "diagonal", ids)()
    finally:
        work.close()
    assert ort.last_logits.shape == (2, model.cfg.base.vocab_size) and ort.last_hidden is None
    assert rel_err(ort.last_logits, fast.last_logits) < 1e-5
    assert rel_err(ort.state.A, fast.state.A) < 1e-5 and rel_err(ort.state.z, fast.state.z) < 1e-5
    assert rel_err(fast.last_logits, fast.last_logits + 1) > 1e-5  # the comparison can fail


def test_logits_none_on_the_existing_export(bench_export, tmp_path):
    export_dir, _ = bench_export
    out = tmp_path / "b.json"
    assert main(["bench", *TINY, *SIDE_BY_SIDE, "--lengths", "33", "--logits", "none", "--export-dir",
                 str(export_dir), "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["backend"], bool(r.get("error"))) for r in rows] == [("torch", False), ("ort", False)]


@pytest.mark.parametrize("argv, message", [
    (["--backends", "torch,ort", "--logits", "all"], "--logits last or none"),
    (["--lm-head", "--logits", "last"], "--lm-head"),
    (["--cuda-graph"], "--device cuda"),
    (["--steady-step", "--schedules", "sequential"], "--steady-step"),
])
def test_bench_option_errors(argv, message, capsys):
    rc = main(["bench", *TINY, "--lengths", "32", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_export_roles_subset():
    from exporter.export import export_roles
    from graphs.errors import ExportError
    from graphs.synthetic import synthetic_config
    cfg = synthetic_config("tiny")
    assert export_roles(cfg, False) == ("segment", "diagonal_step", "lm_head")
    assert export_roles(cfg, True, ["lm_head", "diagonal_step"]) == ("diagonal_step", "lm_head")
    for bad in (["rmt_segment"], [], ["segment_causal"]):  # a causal variant only where attention is fused
        with pytest.raises(ExportError, match="cannot export only"):
            export_roles(cfg, False, bad)
    # fp16/bf16 at opset 23: each written step role with its causal variant
    assert export_roles(cfg, False, causal=True) == ("segment", "diagonal_step", "lm_head", "segment_causal",
                                                     "diagonal_step_causal")
    assert export_roles(cfg, False, ["diagonal_step", "lm_head"], causal=True) == (
        "diagonal_step", "lm_head", "diagonal_step_causal")


def test_targets_evaluation():
    rec = {"results": [
        {"backend": "torch", "schedule": "diagonal", "tokens": 1024, "batch": 1, "median_ms": 100.0},
        {"backend": "ort", "schedule": "diagonal", "tokens": 1024, "batch": 1, "median_ms": 130.0},
        {"backend": "torch", "schedule": "diagonal", "tokens": 2048, "batch": 1, "median_ms": 200.0},
        {"backend": "ort", "schedule": "diagonal", "tokens": 2048, "batch": 1, "median_ms": 240.0},
        {"backend": "torch", "schedule": "diagonal", "tokens": 4096, "batch": 1, "median_ms": 400.0},
        {"backend": "ort", "schedule": "diagonal", "tokens": 4096, "batch": 1, "error": "out of device memory"},
        {"backend": "torch", "schedule": "sequential", "tokens": 1024, "batch": 1, "median_ms": 1.0}],
        "steady_step": [{"backend": "torch", "step_ms": 4.0}, {"backend": "ort", "step_ms": 5.0}],
        "parity": [
            {"backend": "torch-ref", "schedule": "sequential", "tensor": "A", "precision": "fp16",
             "max_rel": 0.02, "finite": True},
            {"backend": "torch-ref", "schedule": "diagonal", "tensor": "A", "precision": "fp16",
             "max_rel": 0.03, "finite": True},
            {"backend": "ort", "schedule": "diagonal", "tensor": "A", "precision": "fp16",
             "max_rel": 0.025, "finite": True},
            {"backend": "ort", "schedule": "sequential", "tensor": "A", "precision": "fp16",
             "max_rel": 0.031, "finite": True},
            {"backend": "ort", "schedule": "diagonal", "tensor": "z", "precision": "fp16",
             "max_rel": math.inf, "finite": False}]}
    t = {x["target"]: x for x in targets.evaluate(rec)}
    assert t["ort / torch time, diagonal, 1024 tokens, batch 1"]["met"] is False  # 1.3 > 1.25
    assert t["ort / torch time, diagonal, 2048 tokens, batch 1"]["value"] == pytest.approx(1.2)
    assert t["ort / torch time, diagonal, 2048 tokens, batch 1"]["met"] is True
    assert t["ort / torch time, diagonal, 4096 tokens, batch 1"]["met"] is None  # an error is not a pass
    assert t["ort / torch steady diagonal step"]["value"] == pytest.approx(1.25)
    assert t["ort / torch steady diagonal step"]["met"] is True
    a_diag = t["parity A, ort diagonal vs fp32 within torch's own fp16 error"]
    assert a_diag["limit"] == 0.03 and a_diag["met"] is True
    assert t["parity A, ort sequential vs fp32 within torch's own fp16 error"]["met"] is False
    assert t["parity z, ort diagonal vs fp32 within torch's own fp16 error"]["met"] is None  # no torch-ref z
    assert "MISSED" in targets.table(list(t.values())) and "not measured" in targets.table(list(t.values()))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_steady_step_feeds_fit_the_graph(precision):
    """The steady-step feeds pass the diagonal_step contract's checks in the graph's own dtypes
    (hidden_in in the compute dtype), and each call feeds the previous outputs back."""
    from armt.bench.steady import ort_step
    from runtimes.torch_runner import TorchRunner
    from tests.helpers import tiny_model
    model = tiny_model()
    with TorchRunner(model, "diagonal_step", precision=precision) as runner:
        calls = []
        real = runner.infer

        def infer(feeds):
            calls.append(feeds)
            return real(feeds)
        runner.infer = infer
        step = ort_step(runner)
        step()
        step()
    first, second = calls
    assert isinstance(first["A_in"], np.ndarray) and not isinstance(second["A_in"], np.ndarray)
    assert str(first["hidden_in"].dtype) == {"fp32": "float32", "fp16": "float16"}[precision]


def test_bench_generate_on_ort_exports_only_what_it_runs(tmp_path):
    """`armt bench --generate --backends torch,ort --export-to DIR`: the bench exports the prefill's
    step graph, lm_head and the decode graph only (no memory write: the timed job is frozen); the ort rows (one decoder shared by the rows) generate the
    torch decoder's greedy tokens; no CUDA graphs on a CPU."""
    from exporter.manifest import load_manifest
    out = tmp_path / "gen.json"
    rc = main(["bench", "--generate", *TINY, "--repeats", "1", "--lengths", "20,40", "--batch-sizes", "1,2",
               "--new-tokens", "4", "--backends", "torch,ort", "--export-to", str(tmp_path / "export"),
               "--output", str(out)])
    assert rc == 0
    assert list(load_manifest(tmp_path / "export").graphs) == ["diagonal_step", "lm_head", "decode"]
    rows = [r for r in json.loads(out.read_text())["results"] if r["backend"] == "ort"]
    assert len(rows) == 4
    for r in rows:
        assert "error" not in r, r
        assert r["generated"] == 4 and r["same_tokens_as_torch"] == 1.0 and r["cuda_graph"] is False, r
