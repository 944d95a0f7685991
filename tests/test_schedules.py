"""The diagonal schedule, padding and resumption reproduce the sequential reference to fp32 rounding."""

import pytest
import torch

from graphs.errors import InputError
from tests.helpers import rel_err, tiny_model
from tests.precision import model_bound

ARCHS = [("llama", {}), ("gpt2", {}), ("gpt2", {"wrap_pos": True})]
# fp32 bounds: derived per model (tests/precision.py, model_bound)


def _ids(model, B, N, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.base.vocab_size, (B, N), generator=g)


def _assert_same(a, b, tol):
    assert rel_err(a.logits, b.logits) < tol
    assert rel_err(a.hidden, b.hidden) < tol
    assert rel_err(a.state.A, b.state.A) < tol
    assert rel_err(a.state.z, b.state.z) < tol
    assert torch.equal(a.state.written, b.state.written)


@pytest.mark.parametrize("arch,kw", ARCHS)
@pytest.mark.parametrize("B,N", [(1, 6), (3, 12), (1, 18), (3, 17), (2, 61)])  # S < L, S = L, S >> L; short last
def test_diagonal_equals_sequential(arch, kw, B, N):
    model = tiny_model(arch, **kw)  # 3 layers, segment 6
    ids = _ids(model, B, N)
    with torch.no_grad():
        seq = model(ids, schedule="sequential", trace=True)
        diag = model(ids, schedule="diagonal", trace=True)
    _assert_same(diag, seq, model_bound(model))
    assert len(seq.segment_states) == len(diag.segment_states) == -(-N // 6)
    for s_seq, s_diag in zip(seq.segment_states, diag.segment_states):
        assert rel_err(s_diag.A, s_seq.A) < model_bound(model) and rel_err(s_diag.z, s_seq.z) < model_bound(model)


@pytest.mark.parametrize("arch,kw", ARCHS)
@pytest.mark.parametrize("schedule", ["sequential", "diagonal"])
def test_padded_batch_equals_single_rows(arch, kw, schedule):
    model = tiny_model(arch, **kw)
    lengths = [23, 6, 14, 1]
    ids = _ids(model, len(lengths), max(lengths))
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, schedule=schedule)
        for row, n in enumerate(lengths):
            alone = model(ids[row:row + 1, :n], schedule="sequential")
            assert rel_err(batch.logits[row, :n], alone.logits[0]) < model_bound(model)
            assert rel_err(batch.state.A[:, row], alone.state.A[:, 0]) < model_bound(model)
            assert rel_err(batch.state.z[:, row], alone.state.z[:, 0]) < model_bound(model)
            assert torch.all(batch.logits[row, n:] == 0)


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_resume_equals_one_call(arch, kw):
    model = tiny_model(arch, **kw)
    ids = _ids(model, 2, 30)
    with torch.no_grad():
        whole = model(ids, schedule="sequential")
        first = model(ids[:, :12], schedule="diagonal")
        second = model(ids[:, 12:], state=first.state, schedule="diagonal")
    assert rel_err(torch.cat([first.logits, second.logits], 1), whole.logits) < model_bound(model)
    assert rel_err(second.state.A, whole.state.A) < model_bound(model)


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_memory_matters(arch, kw):
    """Zeroing the memory before the last segment changes its logits: the tests above are not vacuous."""
    model = tiny_model(arch, **kw)
    ids = _ids(model, 2, 30)
    with torch.no_grad():
        full = model(ids, schedule="diagonal")
        head = model(ids[:, :24], schedule="diagonal")
        amnesic = model(ids[:, 24:], state=model.zero_state(2), schedule="diagonal")
        kept = model(ids[:, 24:], state=head.state, schedule="diagonal")
    assert rel_err(kept.logits, full.logits[:, 24:]) < model_bound(model)
    assert rel_err(amnesic.logits, full.logits[:, 24:]) > 0.05


def test_no_correction_differs_and_still_matches():
    a = tiny_model("llama", correction=False)
    b = tiny_model("llama", correction=True)
    ids = _ids(a, 2, 24)
    with torch.no_grad():
        seq, diag, corr = (a(ids, schedule="sequential"), a(ids, schedule="diagonal"), b(ids, schedule="sequential"))
    _assert_same(diag, seq, model_bound(a))
    assert rel_err(seq.logits, corr.logits) > 10 * model_bound(a)  # the correction is visible above rounding


@pytest.mark.parametrize("bad,match", [
    (lambda m: torch.tensor([1, 2, 3]), "2-D"),
    (lambda m: torch.zeros(1, 4), "int64"),
    (lambda m: torch.full((1, 4), m.cfg.base.vocab_size), "lie in"),
    (lambda m: torch.full((1, 4), -1), "lie in"),
])
def test_bad_ids(bad, match):
    model = tiny_model()
    with pytest.raises(InputError, match=match):
        model(bad(model))


def test_bad_masks_and_state():
    model = tiny_model()
    ids = _ids(model, 2, 8)
    with pytest.raises(InputError, match="right-padded"):
        model(ids, attention_mask=torch.tensor([[0, 1] * 4, [1] * 8]))
    with pytest.raises(InputError, match="only 0 and 1"):
        model(ids, attention_mask=torch.full((2, 8), 2))
    with pytest.raises(InputError, match="shape"):
        model(ids, attention_mask=torch.ones(2, 7))
    with pytest.raises(InputError, match="memory state"):
        model(ids, state=model.zero_state(3))
    with pytest.raises(InputError, match="schedule"):
        model(ids, schedule="zigzag")
