"""`armt bench` on the CPU with a tiny synthetic model, and the fast torch executor against the reference."""

from __future__ import annotations

import json

import pytest
import torch

from graphs.blocks import attention_mask, llama_block, rms_norm, rope_tables
from graphs.errors import ConfigError, InputError
from runtimes.fast_torch import FastArmt
from armt.bench.workloads import build_model
from armt.cli import main
from tests.helpers import rel_err, tiny_model
from tests.precision import fp32_bound, fp32_bounds

TINY = ["--synthetic", "tiny", "--segment-size", "16", "--memory-tokens", "4", "--d-mem", "8",
        "--layers", "3", "--precision", "fp32", "--warmup", "0", "--repeats", "2"]


def test_bench_cli_runs_three_schedules(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", *TINY, "--lengths", "40,64", "--backends", "torch,torch-ref",
               "--parity-length", "40", "--output", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    rows = rec["results"]
    assert {(r["backend"], r["schedule"]) for r in rows} == {
        ("torch", "full"), ("torch", "sequential"), ("torch", "diagonal"),
        ("torch-ref", "sequential"), ("torch-ref", "diagonal")}
    for r in rows:
        assert r["tokens"] in (40, 64) and r["batch"] == 1
        assert len(r["times_ms"]) == 2 and r["median_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / (r["median_ms"] / 1e3))
        assert r["peak_bytes"] is None  # no device memory counter on the CPU
        assert r["nonfinite"] == []
    assert rec["meta"]["layers"] == 3 and rec["meta"]["segment_size"] == 16
    # fp32: every schedule of every backend matches the fp32 reference to rounding; the bound is
    # derived on the bench's own model (rebuilt here) at the parity length (tests/precision.py)
    model = build_model("tiny", None, 16, 4, 8, 0.02, None, 0, {"num_hidden_layers": 3})
    bound = fp32_bound(model, torch.randint(0, model.cfg.base.vocab_size, (1, 40),
                                            generator=torch.Generator().manual_seed(0)))
    assert {(p["backend"], p["schedule"]) for p in rec["parity"]} >= {("torch", "diagonal"), ("torch", "sequential")}
    for p in rec["parity"]:
        assert p["finite"] and p["max_rel"] < bound, (p, bound)
    printed = capsys.readouterr().out
    assert "diagonal" in printed and "full" in printed


def test_bench_limits_and_nonfinite_reported(tmp_path):
    out = tmp_path / "b.json"
    # a huge memory weight scale overflows the memory: the bench must still time it and say so
    rc = main(["bench", *TINY, "--lengths", "32,48", "--schedules", "full,diagonal", "--max-full", "32",
               "--mem-std", "1e6", "--output", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["schedule"], r["tokens"]) for r in rows] == [("full", 32), ("diagonal", 32), ("diagonal", 48)]
    diag = [r for r in rows if r["schedule"] == "diagonal"]
    assert all(r["median_ms"] > 0 for r in diag)
    assert any(r["nonfinite"] for r in diag)


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "0"], "positive"),
    (["--backends", "tensorflow"], "--backends"),
    (["--schedules", "diagonal,zigzag"], "--schedules"),
    (["--device", "tpu"], "device"),
])
def test_bench_bad_input_is_one_line(argv, message, capsys):
    rc = main(["bench", *TINY, *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_bench_ort_needs_an_export(tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", *TINY, "--lengths", "32", "--backends", "ort", "--schedules", "diagonal",
                 "--output", str(out)]) == 0
    assert "--export-dir" in json.loads(out.read_text())["results"][0]["error"]


@pytest.mark.parametrize("B, N", [(1, 30), (2, 34), (1, 3), (2, 12)])
def test_fast_executor_matches_reference(B, N):
    """Segment 6: full, short last segment, a single short segment; diagonal and sequential; fp32."""
    model = tiny_model("llama")
    ids = torch.randint(0, model.cfg.base.vocab_size, (B, N), generator=torch.Generator().manual_seed(N))
    with torch.no_grad():
        ref = model(ids, schedule="sequential")
    bound = fp32_bounds(model, ids)  # per tensor kind, derived on this case (tests/precision.py)
    fast = FastArmt(model)
    for schedule in ("diagonal", "sequential"):
        got = fast.run(ids, schedule, collect=True, head=True)
        assert rel_err(got.hidden, ref.hidden) < bound["hidden"]
        assert rel_err(got.logits, ref.logits) < bound["logits"]
        assert rel_err(got.state.A, ref.state.A) < bound["A"]
        assert rel_err(got.state.z, ref.state.z) < bound["z"]
        assert torch.equal(got.state.written, ref.state.written)
        c = N - (-(-N // 6) - 1) * 6
        assert rel_err(got.last_hidden, ref.hidden[:, N - c:]) < bound["hidden"]


def test_fast_executor_resumes_from_state():
    model = tiny_model("llama")
    ids = torch.randint(0, model.cfg.base.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    fast = FastArmt(model)
    whole = fast.run(ids, "diagonal", collect=True)
    first = fast.run(ids[:, :12], "diagonal")
    second = fast.run(ids[:, 12:], "diagonal", state=first.state, collect=True)
    bound = fp32_bounds(model, ids)
    assert rel_err(second.hidden, whole.hidden[:, 12:]) < bound["hidden"]
    assert rel_err(second.state.A, whole.state.A) < bound["A"]
    amnesic = fast.run(ids[:, 12:], "diagonal", collect=True)  # the memory matters on this case
    assert rel_err(amnesic.hidden, whole.hidden[:, 12:]) > 100 * bound["hidden"]


def test_fast_full_attention_is_the_base_model():
    """Full attention = the reference LLaMA block over the whole sequence, no memory."""
    model = tiny_model("llama")
    cfg = model.cfg
    ids = torch.randint(0, cfg.base.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = model.globals["embed"][ids][None]  # (1, B, N, d)
        pos = torch.arange(20)[None, None].expand(1, 2, 20)
        rope = rope_tables(pos, model.inv_freq, model.dtype)
        allowed = attention_mask(torch.ones(1, 2, 20, dtype=torch.bool))
        for l in range(cfg.base.n_layers):
            h = llama_block(cfg.base, {k: v[l:l + 1] for k, v in model.layers.items()}, h, rope, allowed)
        ref = rms_norm(h, model.globals["final_norm_w"][None], cfg.base.norm_eps)[0]
    # no memory here: the base model's rounding, within the bound of the case's hidden states
    assert rel_err(FastArmt(model).full_attention(ids), ref) < fp32_bounds(model, ids)["hidden"]


def test_fast_executor_refuses_what_it_does_not_cover():
    with pytest.raises(ConfigError):
        FastArmt(tiny_model("gpt2"))
    fast = FastArmt(tiny_model("llama"))
    with pytest.raises(InputError):
        fast.run(torch.zeros(1, 5, dtype=torch.int64), "zigzag")


def test_bench_generate_runs_and_records_targets(tmp_path, capsys):
    """`armt bench --generate` on a tiny CPU model: every backend's row, per-token clocks, the
    diagonal time next to the torch prefill, and the targets evaluated (not met on a CPU: they say so)."""
    pytest.importorskip("transformers")
    out = tmp_path / "gen.json"
    rc = main(["bench", "--generate", *TINY, "--repeats", "1", "--lengths", "20,40", "--batch-sizes", "1,2",
               "--new-tokens", "4", "--backends", "torch,torch-ref,hf", "--output", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["complete"] and rec["meta"]["generate"] and rec["meta"]["new_tokens"] == 4
    rows = rec["results"]
    assert {(r["backend"], r["batch"], r["prompt_tokens"]) for r in rows} == {
        (b, B, N) for b in ("torch", "torch-ref", "hf") for B in (1, 2) for N in (20, 40)}
    for r in rows:
        assert "error" not in r, r
        assert r["generated"] == 4 and r["prefill_ms"] > 0 and r["decode_ms"] > 0
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] * 3 / (r["decode_ms"] / 1e3))
        if r["backend"] == "torch":
            assert r["diagonal_ms"] > 0 and r["prefill_over_diagonal"] == pytest.approx(r["prefill_ms"] / r["diagonal_ms"])
    t = rec["targets"]
    assert t["decode_prompt_tokens"] == 20 and t["fastest_backend"] in ("torch", "torch-ref")
    assert t["decode_b1_fastest"]["met"] in (True, False) and t["decode_b1_fastest"]["target"] == 800
    assert t["decode_b1_ort"]["met"] is None  # ort not run: not measured, never counted as met
    assert t["fastest_vs_hf"]["measured"] > 0 and t["prefill_vs_diagonal"]["prompt_tokens"] == 40
    assert "targets" in capsys.readouterr().out


def test_hf_peer_carries_the_base_weights():
    """The hf backend is transformers' own model with our base weights: its final hidden states are
    the base model's full attention (no memory)."""
    pytest.importorskip("transformers")
    from armt.bench.generate_bench import hf_base_model
    model = tiny_model()
    hf = hf_base_model(model, torch.device("cpu"), "fp32")
    ids = torch.randint(0, model.cfg.base.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = hf(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert rel_err(got, FastArmt(model).full_attention(ids).float()) < 1e-5
