"""The Python API (armt.load, armt/api.py) on torch: the same results as the runtime functions the CLI
calls, state in and out, text in and out, bad input as typed errors. (ONNX Runtime: tests/test_demo.py,
on the demo model's export.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import armt
from graphs.errors import InputError
from graphs.modeldir import save_model_dir
from runtimes.torch_runner import run_torch
from tests.helpers import rel_err, tiny_model

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "armt-recall"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tiny_model(seed=4), tmp_path_factory.mktemp("api") / "model")


def ragged_ids(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(2, 17)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    ids[1, 11:] = 0
    return ids, mask


def test_call_equals_run_torch(model_dir):
    m = armt.load(model_dir)
    ids, mask = ragged_ids(m.config.base.vocab_size)
    out = m(ids, attention_mask=mask)
    for schedule in ("diagonal", "sequential"):
        ref = run_torch(m._model, ids, mask, schedule=schedule, collect=("logits", "hidden"))
        assert rel_err(out.logits, ref.logits) < 1e-5 and rel_err(out.hidden, ref.hidden) < 1e-5
    assert np.array_equal(out.logits, run_torch(m._model, ids, mask, schedule="diagonal").logits)


def test_state_in_and_out_continues_exactly(model_dir):
    m = armt.load(model_dir, schedule="sequential")
    ids, _ = ragged_ids(m.config.base.vocab_size, seed=1)
    whole = m(ids)
    first = m(ids[:, :8])
    rest = m(ids[:, 8:], state=first.state)
    assert rel_err(np.concatenate([first.logits, rest.logits], axis=1), whole.logits) < 1e-5
    assert rel_err(rest.state.A, whole.state.A) < 1e-5


def test_generate_equals_the_generation_loop(model_dir):
    from graphs.sampling import SamplingConfig
    from runtimes.generate import generate
    m = armt.load(model_dir)
    ids, mask = ragged_ids(m.config.base.vocab_size, seed=2)
    for policy in ("frozen", "recurrent"):
        got = m.generate(ids, max_new_tokens=9, policy=policy, attention_mask=mask)
        ref = generate(m._model, ids, mask, max_new_tokens=9, policy=policy, sampling=SamplingConfig())
        assert np.array_equal(got.tokens, ref.tokens) and np.array_equal(got.scores, ref.scores)
        assert got.text is None and got.tokens.shape == (2, 9)
    sampled = [m.generate(ids[:1], max_new_tokens=6, temperature=0.7, top_k=5, seed=3).tokens for _ in range(2)]
    ref = generate(m._model, ids[:1], None, max_new_tokens=6,
                   sampling=SamplingConfig(greedy=False, temperature=0.7, top_k=5, seed=3))
    assert np.array_equal(sampled[0], sampled[1]) and np.array_equal(sampled[0], ref.tokens)
    eos = int(ref.tokens[0, 2])
    stopped = m.generate(ids[:1], max_new_tokens=6, temperature=0.7, top_k=5, seed=3, eos_id=eos)
    first = int(np.flatnonzero(ref.tokens[0] == eos)[0])
    assert int(stopped.lengths[0]) == first + 1 and np.array_equal(stopped.tokens[0, :first + 1], ref.tokens[0, :first + 1])


def test_text_in_and_out_on_the_demo_model():
    m = armt.load(DEMO)
    assert m.tokenizer is not None and m.tokenizer.vocab_size == m.config.base.vocab_size
    prompt = "the apple red of a bear blue so it is at by on or in and ? apple"  # pair in segment 1, query in 2
    pieces: list[str] = []
    gen = m.generate(prompt, max_new_tokens=3, on_text=pieces.append)
    ids, _ = m.encode(prompt)
    assert np.array_equal(gen.tokens, m.generate(ids, max_new_tokens=3).tokens)
    assert gen.text == [m.tokenizer.decode(gen.tokens[0])] and "".join(pieces) == gen.text[0]
    assert gen.text[0].split()[0] == "red"  # the trained model recalls through its memory
    two = m.generate([prompt, "a of"], max_new_tokens=1)  # rows of different lengths
    assert len(two.text) == 2 and two.text[0] == gen.text[0].split()[0]


def test_bad_input(model_dir, tmp_path):
    with pytest.raises(InputError, match="backend must be one of"):
        armt.load(model_dir, backend="tensorflow")
    with pytest.raises(InputError, match="is a model directory"):
        armt.load(model_dir, backend="ort")
    m = armt.load(model_dir)
    assert m.tokenizer is None
    with pytest.raises(InputError, match="holds no tokenizer"):
        m.generate("some text")
    with pytest.raises(InputError, match="policy"):
        m.generate([[1, 2]], policy="forever")
    with pytest.raises(InputError, match="max-new-tokens"):
        m.generate([[1, 2]], max_new_tokens=0)
    with pytest.raises(InputError, match="2-D integer"):
        m(np.zeros((1, 2, 3), dtype=np.int64))
    with pytest.raises(InputError):
        m([[1, 10_000]])  # outside the vocabulary


def test_import_armt_does_not_import_torch():
    code = "import sys, armt; assert callable(armt.load); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_generate_equals_the_cli(model_dir, tmp_path):
    from armt.cli import main
    m = armt.load(model_dir)
    ids, mask = ragged_ids(m.config.base.vocab_size, seed=5)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask)
    for policy in ("frozen", "recurrent"):
        out, scores = tmp_path / f"{policy}.npy", tmp_path / f"{policy}-scores.npy"
        assert main(["generate", str(model_dir), "--input-ids", str(tmp_path / "ids.npy"), "--attention-mask",
                     str(tmp_path / "mask.npy"), "--max-new-tokens", "8", "--memory-policy", policy,
                     "--output", str(out), "--scores-out", str(scores)]) == 0
        got = m.generate(ids, max_new_tokens=8, policy=policy, attention_mask=mask)
        assert np.array_equal(got.tokens, np.load(out)) and np.array_equal(got.scores, np.load(scores))
