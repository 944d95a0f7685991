"""Non-finite detection: which tensor of a run holds NaN or Inf first, and from which segment.

    find_nonfinite(result, T)     logits / hidden: the first segment with a NaN/Inf at a real token;
                                  last_logits: the row and the segment of its last token
                                  (row and token named); the memory state (A / z of an ARMT, memory
                                  of an RMT: graphs.state.RecurrentState.memory_tensors): the first
                                  segment after which the state holds one (from result.segment_states
                                  when traced, else "the final state", segment None)
    locate_state(runner, ...)     the same run again with trace=True, to name the segment for the
                                  state (only when the final state is non-finite: the happy path pays nothing)

`armt run` and `armt bench` warn with these lines and exit 1 under --strict; `armt verify` (always
strict: NaN never passes a comparison) names them too. Segments are those of the call's effective
input (a resumed call's segment 0 is the one its state left unfinished). No torch here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from graphs.state import STATE_CLASSES, RecurrentState, to_numpy

log = logging.getLogger("armt.run")

@dataclass(frozen=True)
class NonFinite:
    tensor: str  # "logits", "last_logits", "hidden", or a state tensor: "A", "z" (ARMT), "memory" (RMT)
    segment: int | None  # the first segment where it appears (None: not localized)
    detail: str = ""

    def line(self, where: str = "") -> str:
        seg = f"from segment {self.segment}" if self.segment is not None else "in the final memory state"
        return (f"{where}{': ' if where else ''}non-finite values (NaN/Inf) in {self.tensor} {seg}"
                + (f" ({self.detail})" if self.detail else ""))


def _finite(x) -> bool:
    return bool(np.isfinite(to_numpy(x)).all())


def first_bad_token(values: np.ndarray, segment_size: int, skip: np.ndarray | None = None) -> NonFinite | None:
    """(B, N, ...) per-token outputs: the earliest segment with a non-finite entry (None: all finite)."""
    values = to_numpy(values)
    if values.size == 0 or np.isfinite(values).all():
        return None
    bad = ~np.isfinite(values.reshape(values.shape[0], values.shape[1], -1)).all(-1)  # (B, N)
    rows, tokens = np.nonzero(bad)
    offset = np.zeros(values.shape[0], np.int64) if skip is None else np.asarray(skip, np.int64)
    segments = (tokens + offset[rows]) // segment_size
    i = int(np.lexsort((tokens, segments))[0])
    return NonFinite("", int(segments[i]), f"row {int(rows[i])}, token {int(tokens[i])} of this call")


def first_bad_segment_state(states: list[RecurrentState], name: str) -> int | None:
    for s, st in enumerate(states):
        if not _finite(getattr(st, name)):
            return s
    return None


def find_nonfinite(result, segment_size: int) -> list[NonFinite]:
    """Every non-finite tensor of a runtimes.execute.RunResult, with where it first appears."""
    found = []
    for name in ("logits", "hidden"):
        values = getattr(result, name)
        if values is not None:
            hit = first_bad_token(values, segment_size, getattr(result, "skip", None))
            if hit is not None:
                found.append(NonFinite(name, hit.segment, hit.detail))
    last = getattr(result, "last_logits", None)
    if last is not None and not np.isfinite(to_numpy(last)).all():
        row = int(np.flatnonzero(~np.isfinite(to_numpy(last)).all(-1))[0])
        pos = int(result.last_index[row])
        skip = 0 if getattr(result, "skip", None) is None else int(result.skip[row])
        found.append(NonFinite("last_logits", (pos + skip) // segment_size,
                               f"row {row}, its last token {pos} of this call"))
    for name in type(result.state).memory_tensors():
        if not _finite(getattr(result.state, name)):
            seg = first_bad_segment_state(result.segment_states, name) if result.segment_states else None
            found.append(NonFinite(name, seg))
    return found


def locate_state(runner, input_ids, attention_mask, state, found: list[NonFinite]) -> list[NonFinite]:
    """Name the first segment of the non-finite state tensors in `found` by running again, traced."""
    names = STATE_CLASSES[runner.cfg.kind].memory_tensors()
    if not any(f.tensor in names and f.segment is None for f in found):
        return found
    from runtimes.execute import run_schedule
    traced = run_schedule(runner, input_ids, attention_mask, state=state, collect=(), trace=True)
    return [NonFinite(f.tensor, first_bad_segment_state(traced.segment_states, f.tensor), f.detail)
            if f.tensor in names and f.segment is None else f for f in found]
