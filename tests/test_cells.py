"""The graph-shaped cells (what gets exported) reproduce the model's reference schedules."""

import pytest
import torch

from graphs.cells import DiagonalStep, LmHeadCell, SegmentCell
from graphs.schedule import build_schedule, step_feeds
from graphs.segments import make_slots, row_lengths
from tests.helpers import rel_err, tiny_model
from tests.precision import fp32_bounds


def _t(feeds):
    return {k: torch.from_numpy(v) for k, v in feeds.items()}


def _run_cells(model, ids, mask, schedule):
    """Drive a cell module call by call, as a runtime would."""
    cfg = model.cfg
    B = ids.shape[0]
    L, V = cfg.base.n_layers, cfg.base.vocab_size
    lengths = row_lengths(ids, mask)
    slots = make_slots(cfg, ids, lengths, uniform=(schedule == "diagonal"))
    st = model.zero_state(B)
    A, z, wr = st.A, st.z, st.written
    logits = torch.zeros(B, ids.shape[1], V)

    def emit(slot, lg):
        for r in range(B):
            c = int(slot.counts[r])
            logits[r, slot.start:slot.start + c] = lg[r, :c]

    head = LmHeadCell(model)  # the step cells output hidden states; logits come from the lm_head cell
    if schedule == "sequential":
        cell = SegmentCell(model)
        for slot in slots:
            f = _t({"ids": slot.ids, "positions": slot.positions, "key_valid": slot.key_valid, "write": slot.write})
            hid, A, z, wr = cell(f["ids"], f["positions"], f["key_valid"], f["write"], A, z, wr)
            emit(slot, head(hid)[0])
    else:
        step = DiagonalStep(model)
        P = cfg.armt.segment_size + cfg.armt.num_mem_tokens
        hidden = torch.zeros(L, B, P, cfg.base.d_model)
        sched = build_schedule("diagonal", L, len(slots))
        for st, feeds in zip(sched.steps, step_feeds(sched, slots)):
            f = _t(feeds)
            hidden, hid, A, z, wr = step(f["input_ids"], hidden, f["positions"], f["key_valid"],
                                         f["active"], f["write"], A, z, wr)
            if st.leaving is not None:
                emit(slots[st.leaving], head(hid)[0])
    return logits, A, z, wr


@pytest.mark.parametrize("arch,kw", [("llama", {}), ("gpt2", {"wrap_pos": True})])
@pytest.mark.parametrize("schedule", ["sequential", "diagonal"])
def test_cells_reproduce_reference(arch, kw, schedule):
    model = tiny_model(arch, **kw)
    ids = torch.randint(0, model.cfg.base.vocab_size, (3, 20), generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(20)[None] < torch.tensor([20, 7, 13])[:, None]).long()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, schedule="sequential")
        logits, A, z, wr = _run_cells(model, ids, mask, schedule)
    bound = fp32_bounds(model, ids, [20, 7, 13])  # derived on this case (tests/precision.py)
    assert rel_err(logits, ref.logits) < bound["logits"]
    assert rel_err(A, ref.state.A) < bound["A"] and rel_err(z, ref.state.z) < bound["z"]
    assert torch.equal(wr, ref.state.written)


def test_idle_layers_cannot_leak_nan():
    """Garbage (NaN) in an idle layer's hidden slot never reaches live state or outputs."""
    model = tiny_model("llama")
    ids = torch.randint(0, model.cfg.base.vocab_size, (1, 6))
    slots = make_slots(model.cfg, ids, row_lengths(ids, None), uniform=True)
    L = model.cfg.base.n_layers
    st = model.zero_state(1)
    hidden = torch.full((L, 1, 9, model.cfg.base.d_model), float("nan"))
    sched = build_schedule("diagonal", L, len(slots))
    f = _t(step_feeds(sched, slots)[0])  # step 0: only layer 0 active
    with torch.no_grad():
        out, hid, A, z, wr = DiagonalStep(model)(f["input_ids"], hidden, f["positions"], f["key_valid"],
                                                     f["active"], f["write"], st.A, st.z, st.written)
    assert torch.isfinite(A).all() and torch.isfinite(z).all()
    assert torch.isfinite(out[0]).all()
    assert wr[0].all() and not wr[1:].any()
