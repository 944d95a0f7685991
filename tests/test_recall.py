"""The associative-recall task: generation is well formed and deterministic, scoring is exact."""

import numpy as np
import pytest

from graphs.errors import InputError
from graphs.recall import QUERY, RecallTask, accuracy, make_batch, predictions, score

TASK = RecallTask()


@pytest.mark.parametrize("segments,pairs", [(2, 2), (4, 6), (16, 6), (4, (1, 6))])
def test_batch_is_well_formed(segments, pairs):
    b = make_batch(TASK, 64, segments, pairs, np.random.default_rng(0))
    T = TASK.segment_size
    assert b.input_ids.shape == (64, segments * T) and b.input_ids.dtype == np.int64
    assert b.input_ids.min() >= QUERY and b.input_ids.max() < TASK.vocab_size  # no PAD anywhere
    for row in range(64):
        ids = b.input_ids[row]
        ctx, query = ids[:-T], ids[-T:]
        n = int(b.query_valid[row].sum())
        assert (query >= TASK.value_lo).sum() == 0, "the query segment must hold no value"
        assert (query == QUERY).sum() == n
        is_key = (ctx >= TASK.key_lo) & (ctx < TASK.value_lo)
        assert is_key.sum() == n and (ctx >= TASK.value_lo).sum() == n
        for s in range(segments - 1):  # at most pairs_per_segment per context segment
            assert is_key[s * T:(s + 1) * T].sum() <= TASK.pairs_per_segment
        for q, ans in zip(b.query_pos[row][:n], b.answers[row][:n]):
            assert ids[q - 1] == QUERY and q >= (segments - 1) * T
            at = np.flatnonzero(ctx == ids[q])
            assert len(at) == 1 and ctx[at[0] + 1] == ans  # the key appears once, followed by its value
            assert at[0] // T == (at[0] + 1) // T  # a pair never crosses a segment boundary
        assert not b.query_valid[row][n:].any()


def test_batch_is_deterministic_and_pairs_spread_over_long_inputs():
    a = make_batch(TASK, 200, 16, 6, np.random.default_rng(7))
    b = make_batch(TASK, 200, 16, 6, np.random.default_rng(7))
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.answers, b.answers)
    T = TASK.segment_size
    is_key = (a.input_ids[:, :-T] >= TASK.key_lo) & (a.input_ids[:, :-T] < TASK.value_lo)
    used = is_key.reshape(200, 15, T).any(-1).mean(0)  # how often each context segment holds a pair
    assert used.min() > 0.15  # every context segment is used, the first ones too


def test_score_is_exact():
    b = make_batch(TASK, 4, 3, (1, 4), np.random.default_rng(1))
    logits = np.zeros(b.input_ids.shape + (TASK.vocab_size,), dtype=np.float32)
    rows = np.arange(4)[:, None]
    logits[rows, b.query_pos, b.answers] = 1.0  # every answer right
    assert score(logits, b) == (b.n_queries, b.n_queries) and accuracy(logits, b) == 1.0
    first = np.argmax(b.query_valid[0])
    logits[0, b.query_pos[0, first], (b.answers[0, first] + 1 - TASK.value_lo) % TASK.n_values + TASK.value_lo] = 2.0
    assert score(logits, b) == (b.n_queries - 1, b.n_queries)
    assert predictions(logits, b).shape == b.answers.shape


def test_last_segment_keeps_the_queries():
    b = make_batch(TASK, 8, 4, 6, np.random.default_rng(2))
    last = b.last_segment()
    assert last.input_ids.shape == (8, TASK.segment_size)
    v = b.query_valid
    assert np.array_equal(last.input_ids[np.arange(8)[:, None], last.query_pos][v],
                          b.input_ids[np.arange(8)[:, None], b.query_pos][v])


def test_bad_requests_are_refused():
    with pytest.raises(InputError):
        make_batch(TASK, 2, 1, 1, np.random.default_rng(0))  # no context segment
    with pytest.raises(InputError):
        make_batch(TASK, 2, 2, 3, np.random.default_rng(0))  # 3 pairs do not fit one context segment
    b = make_batch(TASK, 2, 2, 1, np.random.default_rng(0))
    with pytest.raises(InputError):
        score(np.full(b.input_ids.shape + (TASK.vocab_size,), np.nan, dtype=np.float32), b)
    with pytest.raises(InputError):
        RecallTask.from_dict({"segment_size": 16, "unknown": 1})
