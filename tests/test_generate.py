"""Generation on torch (issue 11): the official generate fixtures, the exact `recurrent` policy against
`armt run`, padded batches, EOS, sampling, the state file, and `armt generate`'s bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from armt.cli import main
from exporter.bounds import compare, widen
from graphs.checkpoint import load_official, load_official_rmt
from graphs.errors import InputError, NonFiniteError
from graphs.modeldir import save_model_dir
from graphs.sampling import Sampler, SamplingConfig
from runtimes.generate import generate
from runtimes.torch_runner import run_torch
from tests.helpers import rel_err, tiny_model, tiny_rmt

FIXTURES = Path(__file__).parent / "fixtures" / "official"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "generate.json").is_file())
CASES = ("multi", "boundary", "single")
FP32 = 1e-5  # the fixtures' own cached-vs-reforward spread is <= 2e-6 (generate.json): 5x margin


def official_model(name: str):
    d = FIXTURES / name
    s = json.loads((d / "armt.json").read_text())
    if s.get("kind") == "rmt":
        return load_official_rmt(d / "checkpoint.pt", d, s["segment_size"], s["num_mem_tokens"], wrap_pos=s["wrap_pos"])
    return load_official(d / "checkpoint.pt", d, s["segment_size"], s["num_mem_tokens"], s["d_mem"],
                         correction=s["correction"], wrap_pos=s["wrap_pos"])


def test_every_fixture_has_generate_cases():
    assert len(NAMES) == 7
    for name in NAMES:
        for case in CASES:
            assert (FIXTURES / name / f"generate_{case}.npz").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_frozen_matches_official_generate(name):
    model = official_model(name)
    for case in CASES:
        ref = np.load(FIXTURES / name / f"generate_{case}.npz")
        for schedule in (("diagonal", "sequential") if model.cfg.kind == "armt" else ("sequential",)):
            out = generate(model, ref["prompt_ids"], max_new_tokens=8, prefill_schedule=schedule)
            assert out.tokens.dtype == np.int64 and out.scores.dtype == np.float32
            np.testing.assert_array_equal(out.tokens, ref["tokens"], err_msg=f"{name}/{case}/{schedule}")
            assert rel_err(out.scores, ref["scores"]) <= FP32, (name, case, schedule)


def within_fp32(got, ref, twin) -> bool:
    """The project's fp32 rule (exporter/bounds.py): 1e-5, widened to 4x the reference's own spread
    (`twin`: the reference with fused attention, equally valid rounding) where the memory read amplifies
    rounding (tiny random ARMTs: a 6e-7 difference in A moves late logits by ~1e-5), never beyond 5e-5."""
    c = compare("scores", "logits", "fp32", got, ref)
    return widen(c, compare("twin", "logits", "fp32", twin, ref)).ok


def _recurrent_vs_run(model, ids, n_new, schedule=None):
    out = generate(model, ids, max_new_tokens=n_new, policy="recurrent", prefill_schedule=schedule)
    full = torch.from_numpy(np.concatenate([ids, out.tokens], axis=1))
    cut = slice(ids.shape[1] - 1, ids.shape[1] - 1 + n_new)
    with torch.no_grad():
        ref = model(full, schedule="sequential").logits[:, cut].numpy()
        twin = model(full, schedule="sequential", fused=True).logits[:, cut].numpy()
    assert within_fp32(out.scores, ref, twin), (rel_err(out.scores, ref), rel_err(twin, ref))
    np.testing.assert_array_equal(out.tokens, ref.argmax(-1))
    return out


MODELS = {
    "armt-llama": lambda: tiny_model("llama", segment_size=5),
    "armt-gpt2-wrap": lambda: tiny_model("gpt2", segment_size=5, wrap_pos=True),
    "rmt-llama": lambda: tiny_rmt("llama", segment_size=5),
    "rmt-gpt2-wrap": lambda: tiny_rmt("gpt2", segment_size=5, wrap_pos=True),
}


@pytest.mark.parametrize("which", sorted(MODELS))
def test_recurrent_equals_run_on_the_concatenation(which):
    """Several boundaries crossed while generating; prompts of one segment, ending on a boundary, mid-segment."""
    model = MODELS[which]()
    ids = np.random.default_rng(1).integers(0, 61, (2, 10)).astype(np.int64)
    schedules = ("diagonal", "sequential") if model.cfg.kind == "armt" else ("sequential",)
    for n in (3, 5, 7, 10):
        for schedule in schedules:
            _recurrent_vs_run(model, ids[:, :n], 12, schedule)


def test_frozen_never_writes_and_differs_from_recurrent_after_a_boundary():
    model = MODELS["armt-llama"]()
    ids = np.random.default_rng(2).integers(0, 61, (1, 8)).astype(np.int64)
    fr = generate(model, ids, max_new_tokens=6, policy="frozen")
    rc = generate(model, ids, max_new_tokens=6, policy="recurrent")
    # segment 1 holds 3 prompt tokens: both agree until it is full (2 new tokens), then recurrent writes
    assert rel_err(fr.scores[:, :3], rc.scores[:, :3]) <= FP32
    assert rel_err(fr.scores[:, 3:], rc.scores[:, 3:]) > 1e-3
    before = run_torch(model, ids[:, :5], schedule="sequential").state
    np.testing.assert_array_equal(fr.state.A, before.A)  # frozen read the state after segment 0, never wrote


@pytest.mark.parametrize("which", sorted(MODELS))
@pytest.mark.parametrize("policy", ["frozen", "recurrent"])
def test_padded_batch_equals_single_rows(which, policy):
    model = MODELS[which]()
    rng = np.random.default_rng(3)
    lengths = [11, 4, 5]
    ids = np.zeros((3, 11), dtype=np.int64)
    mask = np.zeros((3, 11), dtype=np.int64)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(0, 61, n)
        mask[b, :n] = 1
    n_new = 7 if policy == "frozen" else 9  # frozen: GPT-2's position table bounds the growing segment
    batch = generate(model, ids, mask, max_new_tokens=n_new, policy=policy)
    for b, n in enumerate(lengths):
        alone = generate(model, ids[b:b + 1, :n], max_new_tokens=n_new, policy=policy)
        np.testing.assert_array_equal(batch.tokens[b], alone.tokens[0])
        assert rel_err(batch.scores[b], alone.scores[0]) <= FP32


def test_eos_stops_rows_at_different_steps():
    model = MODELS["armt-llama"]()
    ids = np.random.default_rng(4).integers(0, 61, (2, 7)).astype(np.int64)
    free = generate(model, ids, max_new_tokens=8)

    def stop_at(eos: int) -> list[int]:  # new tokens of each row when `eos` ends rows
        return [int(np.flatnonzero(row == eos)[0]) + 1 if eos in row else 8 for row in free.tokens]

    eos = next(int(t) for t in free.tokens[0] if len(set(stop_at(int(t)))) == 2 and max(stop_at(int(t))) > 1)
    want = stop_at(eos)
    out = generate(model, ids, max_new_tokens=8, eos_ids=[eos])
    assert out.lengths.tolist() == want
    assert out.tokens.shape[1] == max(want)  # stops when every row has stopped
    for b, n in enumerate(want):
        np.testing.assert_array_equal(out.tokens[b, :n], free.tokens[b, :n])
        assert rel_err(out.scores[b, :n], free.scores[b, :n]) <= FP32
        assert (out.tokens[b, n:] == 0).all() and (out.scores[b, n:] == 0).all()


def test_sampling_reproducible_with_a_seed():
    model = MODELS["rmt-llama"]()
    ids = np.random.default_rng(5).integers(0, 61, (2, 8)).astype(np.int64)
    cfg = SamplingConfig(greedy=False, temperature=1.5, top_k=20, top_p=0.95, seed=7)
    a = generate(model, ids, max_new_tokens=12, sampling=cfg, policy="recurrent")
    b = generate(model, ids, max_new_tokens=12, sampling=cfg, policy="recurrent")
    np.testing.assert_array_equal(a.tokens, b.tokens)
    other = SamplingConfig(False, 1.5, 20, 0.95, seed=8)
    c = generate(model, ids, max_new_tokens=12, sampling=other, policy="recurrent")
    assert not np.array_equal(a.tokens, c.tokens)  # 24 draws among >= 2 choices each: equal by chance ~never
    greedy = generate(model, ids, max_new_tokens=12, policy="recurrent")
    assert not np.array_equal(a.tokens, greedy.tokens)


def test_sampler_limits():
    logits = np.random.default_rng(6).normal(size=(3, 50)).astype(np.float32)
    best = logits.argmax(-1)
    for cfg in (SamplingConfig(False, 1.0, top_k=1, seed=1), SamplingConfig(False, 1.0, top_p=1e-6, seed=1)):
        s = Sampler(cfg, 3)
        for _ in range(5):
            np.testing.assert_array_equal(s(logits), best)
    s = Sampler(SamplingConfig(False, 1.0, top_k=3, seed=2), 3)
    top3 = np.argsort(-logits, -1)[:, :3]
    for _ in range(20):
        assert all(t in top3[b] for b, t in enumerate(s(logits)))
    with pytest.raises(InputError):
        Sampler(SamplingConfig(False, temperature=0.0), 1)
    with pytest.raises(InputError):
        Sampler(SamplingConfig(False, top_p=1.5), 1)
    with pytest.raises(NonFiniteError, match="NaN"):
        Sampler(SamplingConfig(), 1)(np.full((1, 4), np.nan, np.float32))


def test_generate_continues_a_state():
    """A state from `armt run` (with an unfinished segment) continues: same as generating after the whole prompt."""
    model = MODELS["armt-llama"]()
    ids = np.random.default_rng(7).integers(0, 61, (2, 13)).astype(np.int64)
    whole = generate(model, ids, max_new_tokens=6, policy="recurrent")
    first = run_torch(model, ids[:, :7], schedule="diagonal")
    rest = generate(model, ids[:, 7:], max_new_tokens=6, policy="recurrent", state=first.state)
    np.testing.assert_array_equal(rest.tokens, whole.tokens)
    assert rel_err(rest.scores, whole.scores) <= FP32


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(MODELS["armt-llama"](), tmp_path_factory.mktemp("gen") / "model")


def _gen(*args):
    return main(["generate", *map(str, args)])


def _one_line(capsys, match):
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert "Traceback" not in err and len(lines) == 1 and match in lines[0], err
    assert lines[0].startswith("armt generate: error:")


def test_cli_writes_tokens_and_scores(model_dir, tmp_path):
    ids = np.random.default_rng(8).integers(0, 61, (2, 9)).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    assert _gen(model_dir, "--input-ids", tmp_path / "ids.npy", "--max-new-tokens", 5, "--memory-policy", "recurrent",
                "--output", tmp_path / "t.npy", "--scores-out", tmp_path / "s.npy") == 0
    ref = generate(MODELS["armt-llama"](), ids, max_new_tokens=5, policy="recurrent")
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), ref.tokens)
    assert rel_err(np.load(tmp_path / "s.npy"), ref.scores) <= FP32


@pytest.mark.parametrize("flags,match", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be a positive integer"),
    (["--greedy", "--temperature", "0.7"], "--greedy contradicts --temperature"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--top-p", "2"], "--top-p must lie in (0, 1]"),
    (["--eos-id", "99"], "--eos-id must lie in [0, 61)"),
])
def test_cli_bad_flags(model_dir, tmp_path, capsys, flags, match):
    np.save(tmp_path / "ids.npy", np.zeros((1, 4), np.int64))
    assert _gen(model_dir, "--input-ids", tmp_path / "ids.npy", *flags) == 2
    _one_line(capsys, match)


def test_cli_ids_out_of_vocab(model_dir, tmp_path, capsys):
    np.save(tmp_path / "ids.npy", np.array([[1, 2, 61]], np.int64))
    assert _gen(model_dir, "--input-ids", tmp_path / "ids.npy") == 2
    _one_line(capsys, "input ids must lie in [0, 61)")


def test_cli_needs_a_prompt(model_dir, capsys):
    assert _gen(model_dir) == 2
    _one_line(capsys, "--input-ids")


def test_cli_export_without_decode_graphs(tmp_path, capsys):
    from runtimes.validation import export_model
    export_model(tiny_rmt("llama", segment_size=5), tmp_path / "export", precision="fp32", validate=False, decode=False)
    np.save(tmp_path / "ids.npy", np.zeros((1, 4), np.int64))
    assert _gen(tmp_path / "export", "--backend", "ort", "--input-ids", tmp_path / "ids.npy") == 2
    _one_line(capsys, "has no decode graphs (rmt_decode, rmt_memory_write; it has: rmt_segment, lm_head): "
              "export it again without --no-decode")
    assert _gen(tmp_path / "export", "--input-ids", tmp_path / "ids.npy") == 2  # torch needs the model dir
    _one_line(capsys, "is an export directory")


@pytest.mark.parametrize("which", ["armt-llama", "rmt-gpt2-wrap"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_recurrent_equals_run_at_that_precision(which, precision):
    """The reference of a precision is torch at that precision (exporter/bounds.py): the cached path
    against `armt run` on prompt + generated, within the precision's logits bound; the ARMT memory fp32."""
    from exporter.bounds import bound_for
    model = MODELS[which]()
    ids = np.random.default_rng(9).integers(0, 61, (2, 9)).astype(np.int64)
    out = generate(model, ids, max_new_tokens=8, policy="recurrent", precision=precision)
    full = np.concatenate([ids, out.tokens], axis=1)
    ref = run_torch(model, full, schedule="sequential", precision=precision).logits[:, 8:16]
    assert np.isfinite(out.scores).all()
    assert rel_err(out.scores, ref) <= bound_for(precision, "logits").rel
    if model.cfg.kind == "armt":
        assert out.state.A.dtype == np.float32 and out.state.z.dtype == np.float32


def test_on_token_streams_every_step():
    model = MODELS["rmt-llama"]()
    ids = np.random.default_rng(10).integers(0, 61, (2, 6)).astype(np.int64)
    seen = []
    out = generate(model, ids, max_new_tokens=5, on_token=lambda t, tok, stopped: seen.append((t, tok.copy())))
    assert [t for t, _ in seen] == list(range(5))
    np.testing.assert_array_equal(np.stack([tok for _, tok in seen], 1), out.tokens)


def test_frozen_past_the_position_table_is_one_line(tmp_path, capsys):
    """GPT-2's learned positions bound the frozen policy's growing segment (n_positions 40 here)."""
    d = save_model_dir(tiny_model("gpt2", segment_size=5), tmp_path / "gpt2")
    np.save(tmp_path / "ids.npy", np.zeros((1, 7), np.int64))
    assert _gen(d, "--input-ids", tmp_path / "ids.npy", "--max-new-tokens", 60) == 2
    _one_line(capsys, "the model's position table has 40 rows")
    assert _gen(d, "--input-ids", tmp_path / "ids.npy", "--max-new-tokens", 60, "--memory-policy", "recurrent",
                "--output", tmp_path / "t.npy") == 0
    assert np.load(tmp_path / "t.npy").shape == (1, 60)


def test_cli_state_in_and_eos(model_dir, tmp_path):
    ids = np.random.default_rng(11).integers(0, 61, (2, 12)).astype(np.int64)
    np.save(tmp_path / "a.npy", ids[:, :7])
    np.save(tmp_path / "b.npy", ids[:, 7:])
    np.save(tmp_path / "ids.npy", ids)
    assert main(["run", str(model_dir), "--input-ids", str(tmp_path / "a.npy"),
                 "--state-out", str(tmp_path / "s.npz")]) == 0
    assert _gen(model_dir, "--input-ids", tmp_path / "b.npy", "--state-in", tmp_path / "s.npz", "--max-new-tokens", 6,
                "--output", tmp_path / "rest.npy") == 0
    assert _gen(model_dir, "--input-ids", tmp_path / "ids.npy", "--max-new-tokens", 6,
                "--output", tmp_path / "all.npy") == 0
    whole = np.load(tmp_path / "all.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "rest.npy"), whole)
    eos = int(whole[0, 0])
    assert _gen(model_dir, "--input-ids", tmp_path / "ids.npy", "--max-new-tokens", 6, "--eos-id", eos,
                "--output", tmp_path / "e.npy") == 0
    assert np.load(tmp_path / "e.npy")[0, 0] == eos and (np.load(tmp_path / "e.npy")[0, 1:] == 0).all()
