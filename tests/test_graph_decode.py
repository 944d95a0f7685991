"""runtimes/graph_decode.py: the torch decoder whose one-token steps run as a CUDA graph. Its static
step (the graph's body, run eagerly on a CPU) gives the eager decoder's tokens and scores exactly;
on a GPU the replayed graph gives the same as the static step run eagerly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphs.sampling import SamplingConfig
from runtimes.generate import generate
from runtimes.graph_decode import GraphDecoder
from tests.helpers import rel_err, tiny_model


def ragged(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 61, size=(3, 20)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 14:] = 0
    return ids * mask, mask


@pytest.mark.parametrize("policy", ["frozen", "recurrent"])
def test_static_step_equals_the_eager_decoder(policy):
    """Ragged rows, several segment boundaries (recurrent: memory replaced between steps), rows that
    stop at EOS at different steps, sampling: identical tokens, scores equal to rounding."""
    model = tiny_model(seed=3)
    ids, mask = ragged()
    dec = GraphDecoder(model, use_graph=False)
    for eos, sampling in (((), SamplingConfig()), (None, SamplingConfig(greedy=False, temperature=0.9, seed=4))):
        ref = generate(model, ids, mask, max_new_tokens=15, policy=policy, sampling=sampling)
        eos = (int(ref.tokens[0, 3]),) if eos is None else eos
        ref = generate(model, ids, mask, max_new_tokens=15, policy=policy, sampling=sampling, eos_ids=eos)
        got = generate(dec, ids, mask, max_new_tokens=15, policy=policy, sampling=sampling, eos_ids=eos)
        assert dec.static_steps == got.tokens.shape[1] - 1  # every step after the prompt's went through it
        assert np.array_equal(got.tokens, ref.tokens) and np.array_equal(got.lengths, ref.lengths)
        assert rel_err(got.scores, ref.scores) < 1e-6


def test_other_models_use_the_eager_step():
    from tests.helpers import tiny_rmt
    dec = GraphDecoder(tiny_rmt(), use_graph=False)
    ids, mask = ragged(1)
    ref = generate(tiny_rmt(), ids, mask, max_new_tokens=5)
    got = generate(dec, ids, mask, max_new_tokens=5)
    assert dec.static_steps == 0 and np.array_equal(got.tokens, ref.tokens)


@pytest.mark.gpu
def test_cuda_graph_replay_equals_the_eager_decoder():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = tiny_model(seed=3)
    ids, mask = ragged()
    for policy in ("frozen", "recurrent"):
        ref = generate(model, ids, mask, max_new_tokens=15, policy=policy, device="cuda")
        dec = GraphDecoder(model, device="cuda")
        for _ in range(2):  # the second call reuses the captured graph
            got = generate(dec, ids, mask, max_new_tokens=15, policy=policy)
            assert dec.replays == got.tokens.shape[1] - 1
            assert np.array_equal(got.tokens, ref.tokens) and rel_err(got.scores, ref.scores) < 1e-5


@pytest.mark.parametrize("policy", ["frozen", "recurrent"])
def test_greedy_on_the_device_without_scores(policy):
    """scores=False under greedy: every step after the prompt's picks its token in the static step
    (step_greedy); the tokens are the ones chosen on the host from the logits."""
    model = tiny_model(seed=3)
    ids, mask = ragged()
    ref = generate(model, ids, mask, max_new_tokens=15, policy=policy, eos_ids=(7,))
    dec = GraphDecoder(model, use_graph=False)
    calls = []
    original = dec.step_greedy
    dec.step_greedy = lambda *a: calls.append(1) or original(*a)
    got = generate(dec, ids, mask, max_new_tokens=15, policy=policy, eos_ids=(7,), scores=False)
    assert got.scores is None and len(calls) == got.tokens.shape[1] - 1 == dec.static_steps
    assert np.array_equal(got.tokens, ref.tokens) and np.array_equal(got.lengths, ref.lengths)


def test_greedy_on_the_device_refuses_non_finite_logits():
    from graphs.errors import NonFiniteError
    model = tiny_model(seed=3)
    ids, mask = ragged()
    dec = GraphDecoder(model, use_graph=False)

    def poison(t, *_):  # after the first token (chosen on the host): NaN logits in the static step
        if t == 0:
            with torch.no_grad():
                dec.model.globals["final_norm_w"][0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        generate(dec, ids, mask, max_new_tokens=4, on_token=poison, scores=False)
    assert dec.static_steps == 0  # refused at the first static step
