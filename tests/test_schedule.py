"""The schedules as data: step counts, each cell once, dependencies respected; the picture; the feeds."""

import numpy as np
import pytest

from armt.cli import main
from graphs.errors import InputError
from graphs.schedule import build_schedule, render, step_feeds
from graphs.segments import make_slots, row_lengths
from tests.helpers import tiny_model

SIZES = [(1, 1), (3, 1), (1, 5), (3, 2), (3, 3), (4, 9), (16, 32)]


def _when(schedule):
    """(segment, layer) -> (step index, order within the step)."""
    when = {}
    for step in schedule.steps:
        for order, cell in enumerate(step.cells):
            assert cell not in when, f"cell {cell} computed twice"
            when[cell] = (step.index, order)
    return when


@pytest.mark.parametrize("kind", ["sequential", "diagonal"])
@pytest.mark.parametrize("L,S", SIZES)
def test_each_cell_once_and_dependencies_respected(kind, L, S):
    sched = build_schedule(kind, L, S)
    assert len(sched.steps) == (S if kind == "sequential" else S + L - 1)
    when = _when(sched)
    assert set(when) == {(s, l) for s in range(S) for l in range(L)}
    for (s, l), (t, order) in when.items():
        if l > 0:  # its input: the same segment one layer down, earlier (a step before, or earlier in the call)
            t_in, o_in = when[(s, l - 1)]
            assert (t_in, o_in) < (t, order) if kind == "sequential" else t_in < t
        if s > 0:  # its memory: the previous segment through this layer, in an earlier call
            assert when[(s - 1, l)][0] < t


@pytest.mark.parametrize("L,S", SIZES)
def test_diagonal_steps_enter_shift_and_leave(L, S):
    sched = build_schedule("diagonal", L, S)
    for t, step in enumerate(sched.steps):
        lo, hi = max(0, t - S + 1), min(L - 1, t)  # the model's contiguous active range
        assert step.active == tuple(lo <= l <= hi for l in range(L))
        assert step.entering == (t if t < S else None)
        assert step.leaving == (t - L + 1 if t >= L - 1 else None)
        if t > 0:  # the shift: what layer l-1 worked on last step, layer l works on now
            prev = sched.steps[t - 1]
            for l in range(1, L):
                if step.layer_segments[l] is not None:
                    assert step.layer_segments[l] == prev.layer_segments[l - 1]
    assert [st.leaving for st in sched.steps if st.leaving is not None] == list(range(S))


def test_empty_and_bad_schedules():
    assert build_schedule("diagonal", 3, 0).steps == ()
    assert build_schedule("sequential", 3, 0).steps == ()
    with pytest.raises(InputError, match="schedule"):
        build_schedule("zigzag", 3, 2)
    with pytest.raises(InputError, match="layer"):
        build_schedule("diagonal", 0, 2)


def test_picture():
    assert render(build_schedule("diagonal", 3, 4)).splitlines()[1:6] == [
        "layer 2 |  .  .  0  1  2  3",
        "layer 1 |  .  0  1  2  3  .",
        "layer 0 |  0  1  2  3  .  .",
        "        +------------------ step",
        "           0  1  2  3  4  5",
    ]
    wide = render(build_schedule("diagonal", 2, 100), max_steps=5)
    assert "..." in wide and "96 more steps not drawn" in wide


def test_schedule_command(capsys):
    assert main(["schedule", "--layers", "2", "--segments", "3"]) == 0
    out = capsys.readouterr().out
    assert "2 layers x 3 segments = 6 cells in 4 graph calls" in out
    assert "layer 1 |  .  0  1  2" in out and "layer 0 |  0  1  2  ." in out
    assert main(["schedule", "--layers", "2", "--segments", "3", "--schedule", "sequential"]) == 0
    assert "in 3 graph calls (segment graph)" in capsys.readouterr().out
    assert main(["schedule", "--layers", "0", "--segments", "3"]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("N", [6, 17, 40])
def test_diagonal_feeds_follow_the_schedule(N):
    """Each step's feeds give every layer the slot of the segment the schedule assigns it."""
    model = tiny_model()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.cfg.base.vocab_size, size=(2, N))
    mask = (np.arange(N)[None] < np.array([N, max(N - 7, 1)])[:, None]).astype(np.int64)
    slots = make_slots(model.cfg, ids, row_lengths(ids, mask), uniform=True)
    sched = build_schedule("diagonal", model.cfg.base.n_layers, len(slots))
    for step, feed in zip(sched.steps, step_feeds(sched, slots)):
        assert np.array_equal(feed["active"], step.active)
        assert np.array_equal(feed["input_ids"], slots[step.entering if step.entering is not None else 0].ids)
        for l, s in enumerate(step.layer_segments):
            slot = slots[s if s is not None else 0]
            assert np.array_equal(feed["positions"][l], slot.positions)
            assert np.array_equal(feed["key_valid"][l], slot.key_valid)
            assert np.array_equal(feed["write"][l], slot.write)
