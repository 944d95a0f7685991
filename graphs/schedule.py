"""Schedules as plain data: which cells (segment s, layer l) each graph call runs, and its feeds.

A cell (s, l) needs (s, l-1) (its input) and (s-1, l) (layer l's memory after segment s-1).

    sequential   S steps;          step s runs cells (s, 0) .. (s, L-1)   (the segment graph)
    diagonal     S + L - 1 steps;  step t runs cells (t - l, l) for every layer l with 0 <= t - l < S
                                                                          (the diagonal-step graph)

Diagonal, L = 3 layers, S = 4 segments (`armt schedule --layers 3 --segments 4`):

    layer 2 |  .   .   0   1   2   3      a number is the segment a layer works on at that step,
    layer 1 |  .   0   1   2   3   .      '.' an idle (masked) cell: ramp-up at the start,
    layer 0 |  0   1   2   3   .   .      ramp-down at the end
            +------------------------ step
               0   1   2   3   4   5

At each step segment t enters layer 0, every other segment moves up one layer (in the graph: layer
l reads hidden_in[l-1]), and segment t - L + 1 leaves layer L-1 (its logits are emitted). The
active layers of a step are always one contiguous range `lo .. hi` (Step.lo, Step.hi), so stacked
per-layer weights are a plain slice.

This module is the only place that knows the diagonal index arithmetic: the reference model
(graphs.model), the fast executor, the training script, export samples and the runtimes' loop all
iterate `build_schedule(...).steps` and take a step's graph inputs from `step_feeds`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphs.errors import InputError

KINDS = ("sequential", "diagonal")


@dataclass(frozen=True)
class Step:
    """One graph call."""

    index: int
    layer_segments: tuple[int | None, ...]  # (L,): segment each layer works on, None = idle
    entering: int | None  # segment that enters layer 0 (its tokens are this call's input_ids)
    leaving: int | None  # segment that leaves the last layer (this call's logits belong to it)

    @property
    def active(self) -> tuple[bool, ...]:
        return tuple(s is not None for s in self.layer_segments)

    @property
    def cells(self) -> tuple[tuple[int, int], ...]:
        """(segment, layer) pairs this call computes."""
        return tuple((s, l) for l, s in enumerate(self.layer_segments) if s is not None)

    @property
    def lo(self) -> int:
        """First active layer."""
        return next(l for l, s in enumerate(self.layer_segments) if s is not None)

    @property
    def hi(self) -> int:
        """Last active layer (the active layers are lo..hi, contiguous)."""
        return max(l for l, s in enumerate(self.layer_segments) if s is not None)

    @property
    def segments(self) -> tuple[int, ...]:
        """The segment of each active layer lo..hi, in layer order."""
        return tuple(s for s in self.layer_segments if s is not None)


@dataclass(frozen=True)
class Schedule:
    kind: str  # "sequential" | "diagonal"
    n_layers: int
    n_segments: int
    steps: tuple[Step, ...]


def build_schedule(kind: str, n_layers: int, n_segments: int) -> Schedule:
    if kind not in KINDS:
        raise InputError(f"schedule must be one of {', '.join(KINDS)}, got {kind!r}")
    if n_layers < 1 or n_segments < 0:
        raise InputError(f"a schedule needs at least 1 layer and 0 segments, got L={n_layers}, S={n_segments}")
    L, S = n_layers, n_segments
    if kind == "sequential":
        steps = tuple(Step(s, (s,) * L, entering=s, leaving=s) for s in range(S))
    else:
        steps = tuple(
            Step(t, tuple(t - l if 0 <= t - l < S else None for l in range(L)),
                 entering=t if t < S else None,
                 leaving=t - L + 1 if t - L + 1 >= 0 else None)
            for t in range(S + L - 1 if S else 0))
    return Schedule(kind, L, S, steps)


def step_feeds(schedule: Schedule, slots: list) -> list[dict[str, np.ndarray]]:
    """The per-step graph inputs other than the carried ones (state, hidden buffer), host arrays.

    Sequential: the entering segment's slot. Diagonal: layer l gets the slot of the segment it works
    on; an idle layer gets segment 0's geometry (any valid values do: its results are masked out in
    the graph), and when no segment enters, layer 0 gets segment 0's ids likewise."""
    if schedule.kind == "sequential":
        return [{"input_ids": slots[st.entering].ids, "positions": slots[st.entering].positions,
                 "key_valid": slots[st.entering].key_valid, "write": slots[st.entering].write}
                for st in schedule.steps]
    feeds = []
    for st in schedule.steps:
        seg = [s if s is not None else 0 for s in st.layer_segments]
        feeds.append({
            "input_ids": slots[st.entering if st.entering is not None else 0].ids,  # (B, T)
            "positions": np.stack([slots[s].positions for s in seg]),  # (L, B, P)
            "key_valid": np.stack([slots[s].key_valid for s in seg]),  # (L, B, P)
            "active": np.array(st.active, dtype=bool),  # (L,)
            "write": np.stack([slots[s].write for s in seg]),  # (L, B)
        })
    return feeds


def render(schedule: Schedule, max_steps: int = 40, graph: str = "") -> str:
    """ASCII picture: one row per layer (top = last layer), one column per step."""
    L, steps = schedule.n_layers, schedule.steps
    shown = steps[:max_steps]
    width = max(2, len(str(max(schedule.n_segments - 1, 0))), len(str(max(len(shown) - 1, 0))))
    cell = lambda text: text.rjust(width)  # noqa: E731
    label = max(len(f"layer {L - 1}"), len("step"))
    lines = [f"{schedule.kind} schedule: {L} layers x {schedule.n_segments} segments = "
             f"{L * schedule.n_segments} cells in {len(steps)} graph calls" + (f" ({graph} graph)" if graph else "")]
    for l in reversed(range(L)):
        row = [cell("." if st.layer_segments[l] is None else str(st.layer_segments[l])) for st in shown]
        lines.append(f"{f'layer {l}'.rjust(label)} | " + " ".join(row) + (" ..." if len(steps) > len(shown) else ""))
    lines.append(" " * label + " +" + "-" * (len(shown) * (width + 1)) + " step")
    lines.append(" " * label + "   " + " ".join(cell(str(st.index)) for st in shown))
    if len(steps) > len(shown):
        lines.append(f"({len(steps) - len(shown)} more steps not drawn)")
    lines.append("a number is the segment a layer works on at that step; '.' is an idle (masked) cell")
    return "\n".join(lines)
