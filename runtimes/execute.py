"""The one schedule loop: drives any runner through the schedule its graph role belongs to.

    ids, mask, state --continue_input--> the call's effective input (a state's pending tokens first)
      --make_slots--> slots --build_schedule--> steps --step_feeds--> per-step host feeds
    carried inputs start from the state (and, for the diagonal step, a zero hidden buffer)
    for step in steps:                                   (iter_steps: one graph call per step)
        out = runner.infer(step feeds + carried)
        carried <- out's buffers                         (contract.recurrent: output -> next input)
        step.leaving is not None -> the finished segment's hidden rows asked for -> host; logits of them
                                    through the lm_head runner (logits on demand: all / each row's last)
        a cell (s, l) that ends a row's last complete segment -> keep layer l's state of that row
    the final state (host), with each row's unfinished segment (graphs.state.Pending)

`plan_run` makes the host side once (slots, schedule, feeds); `iter_steps` runs it on one runner and
yields every call (validation walks several runners through the same plan side by side);
`run_schedule` is the whole run. The runner's role picks the schedule (graphs.contracts). Nothing
here needs torch: inputs may be numpy arrays or torch tensors, results are numpy.

Exact resume (the mechanism, for every backend): a row of a call that ends inside a segment leaves
its tokens of that segment and the state before it in `state.pending`. The next call from that
state prepends those tokens to the row's new ones and starts from the state before them
(`continue_input`), so the unfinished segment runs again whole; the results hold only the new
positions (`Continuation.take_new`), and the final state records the new unfinished segments
(`Continuation.resume_state`). The state before a row's unfinished segment is the state after its
last complete segment: for an ARMT per layer, taken at the step where that layer finishes that
segment; for an RMT (one memory of the whole model, batch on axis 0) at the step where that segment
leaves the last layer (the Schedule's cells either way, no index arithmetic here). The state
classes say where their rows and layers are (graphs.state.RecurrentState), so the same code serves
both kinds. runtimes.torch_runner.run_torch uses the same Continuation around the fast executor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from graphs.errors import InputError
from graphs.schedule import Schedule, Step, build_schedule, step_feeds
from graphs.segments import Slot, check_ids, make_slots
from graphs.dtypes import numpy_dtype
from graphs.state import (STATE_CLASSES, MemoryState, Pending, RecurrentState, RmtState, check_state, empty_state,
                          to_numpy)
from runtimes.base import Runner
from graphs.progress import Progress

log = logging.getLogger("armt.run")

COLLECTABLE = ("logits", "last_logits", "hidden")
LOGITS_MODES = ("all", "last", "none")  # armt run --logits
HEAD_ROWS_PER_CALL = 1024  # hidden rows per lm_head call when all logits are asked for


def collect_for(logits: str = "all", hidden: bool = False) -> tuple[str, ...]:
    """The `collect` of run_schedule for `armt run --logits MODE [--hidden-out]`: all -> "logits"
    (B, N, V), last -> "last_logits" (B, V), none -> nothing; `hidden` adds "hidden" (B, N, d)."""
    if logits not in LOGITS_MODES:
        raise InputError(f"--logits must be one of {', '.join(LOGITS_MODES)}, got {logits!r}")
    want = {"all": ("logits",), "last": ("last_logits",), "none": ()}[logits]
    return want + (("hidden",) if hidden else ())


def wants_head(collect: tuple[str, ...]) -> bool:
    return "logits" in collect or "last_logits" in collect


def head_logits(head: Runner, hidden: np.ndarray, rows_per_call: int = HEAD_ROWS_PER_CALL) -> np.ndarray:
    """Logits of final-norm hidden rows on an active lm_head runner: hidden (B, R, d) float32 ->
    (B, R, V) float32, `rows_per_call` rows of every batch row per graph call."""
    hidden = np.ascontiguousarray(hidden, dtype=np.float32)
    B, R = hidden.shape[:2]
    out = np.zeros((B, R, head.cfg.base.vocab_size), np.float32)
    for lo in range(0, R, rows_per_call):
        hi = min(R, lo + rows_per_call)
        out[:, lo:hi] = head.to_numpy(head.infer({"hidden": hidden[:, lo:hi]})["logits"])
    return out
PROGRESS_MIN_STEPS = 16  # shorter runs draw no progress bar


@dataclass
class Continuation:
    """One call's input as the model sees it: each row's pending tokens (from the state), then the
    call's own tokens, starting from the state before the pending segment.

        row b:  | pending (skip[b]) | the call's tokens (new_lengths[b]) | padding |"""

    ids: np.ndarray  # (B, N') int64, the effective input, right-padded with 0
    lengths: np.ndarray  # (B,) effective lengths: skip + new_lengths
    skip: np.ndarray  # (B,) pending tokens run again at the start of each row (not returned)
    new_lengths: np.ndarray  # (B,) the call's own tokens per row
    new_width: int  # N of the call's (B, N) input
    start: RecurrentState | None  # the state the effective input starts from (None: empty memory)
    segment_size: int

    @property
    def resumed(self) -> bool:
        return bool(self.skip.any())

    @property
    def complete(self) -> np.ndarray:
        """(B,) complete segments of each row's effective input."""
        return self.lengths // self.segment_size

    @property
    def unfinished(self) -> np.ndarray:
        """(B,) tokens of each row's unfinished last segment (0: it ends on a segment boundary)."""
        return self.lengths % self.segment_size

    def mask(self) -> np.ndarray | None:
        """(B, N') right-padded 0/1 mask of the effective input, None when every row is full."""
        N = self.ids.shape[1]
        if bool(np.all(self.lengths == N)):
            return None
        return (np.arange(N)[None, :] < self.lengths[:, None]).astype(np.int64)

    def take_new(self, full: np.ndarray | None) -> np.ndarray | None:
        """(B, N', ...) results of the effective input -> (B, N, ...) of the call's own positions."""
        if full is None or not self.resumed:
            return full
        out = np.zeros((full.shape[0], self.new_width, *full.shape[2:]), dtype=full.dtype)
        for b, (k, n) in enumerate(zip(self.skip.tolist(), self.new_lengths.tolist())):
            out[b, :n] = full[b, k:k + n]
        return out

    def rows_to_record(self) -> dict[int, np.ndarray]:
        """segment -> rows whose last complete segment it is and that end inside a later one (their
        state before the unfinished segment is the state right after this one)."""
        want = (self.unfinished > 0) & (self.complete > 0)
        rows: dict[int, list[int]] = {}
        for b in np.flatnonzero(want).tolist():
            rows.setdefault(int(self.complete[b]) - 1, []).append(b)
        return {s: np.array(r, dtype=np.int64) for s, r in rows.items()}

    def resume_state(self, final: RecurrentState, recorded: RecurrentState | None) -> RecurrentState:
        """The call's final state (host, either kind) with the rows' unfinished segments. `recorded`: a
        state whose rows of `rows_to_record` hold the state after their last complete segment (other
        rows unused)."""
        cls = type(final)
        final = final.without_pending().numpy()
        u, k, T = self.unfinished, self.complete, self.segment_size
        if not u.any():
            return final
        B = len(u)
        start = self.start.numpy() if self.start is not None else cls(
            **{name: np.zeros_like(t) for name, t in final.tensors().items()})  # a fresh memory
        from_start, from_recorded = cls.index((u > 0) & (k == 0)), cls.index((u > 0) & (k > 0))
        before = {}
        for name, t in final.tensors().items():  # rows on the class's BATCH_AXIS
            b_t = t.copy()  # rows without an unfinished segment continue from the final state
            b_t[from_start] = getattr(start, name)[from_start]
            if recorded is not None:
                b_t[from_recorded] = getattr(recorded, name)[from_recorded]
            before[name] = b_t
        width = int(u.max())
        ids = np.zeros((B, width), dtype=np.int64)
        for b in range(B):
            ids[b, :u[b]] = self.ids[b, k[b] * T:k[b] * T + u[b]]
        final.pending = Pending(ids, u.astype(np.int64), cls(**before))
        return final


def continue_input(cfg, input_ids, attention_mask=None, state: RecurrentState | None = None,
                   segment_size: int | None = None) -> Continuation:
    """Check the call's ids/mask (and the state's pending segment) and make the effective input."""
    if not hasattr(input_ids, "shape") or not hasattr(input_ids, "dtype"):
        raise InputError("input ids must be an array (numpy or torch)")
    lengths = check_ids(input_ids, cfg.base.vocab_size, attention_mask)  # (B,)
    ids = to_numpy(input_ids).astype(np.int64)
    B, N = ids.shape
    T = segment_size or cfg.armt.segment_size
    pending = state.pending if state is not None else None
    start = state.without_pending() if state is not None else None
    if pending is None:
        return Continuation(ids, lengths, np.zeros(B, np.int64), lengths, N, start, T)
    pending.check_fits(B, T, cfg.base.vocab_size)
    skip = to_numpy(pending.lengths).astype(np.int64)
    p_ids = to_numpy(pending.ids).astype(np.int64)
    eff_lengths = skip + lengths
    eff = np.zeros((B, int(eff_lengths.max(initial=0))), dtype=np.int64)
    for b in range(B):
        eff[b, :skip[b]] = p_ids[b, :skip[b]]
        eff[b, skip[b]:eff_lengths[b]] = ids[b, :lengths[b]]
    return Continuation(eff, eff_lengths, skip, lengths, N, pending.before, T)


@dataclass
class RunPlan:
    """The host side of one run: what every call is fed apart from the carried inputs."""

    ids: np.ndarray  # (B, N') int64, the effective input (continuation.ids)
    lengths: np.ndarray  # (B,)
    slots: list[Slot]
    schedule: Schedule
    feeds: list[dict[str, np.ndarray]]  # per step
    initial: dict[str, Any]  # the carried inputs of the first call (host arrays)
    final: dict[str, Any] = field(default_factory=dict)  # the carried values after the run (iter_steps)
    continuation: Continuation | None = None


@dataclass
class StepCall:
    step: Step
    feeds: dict[str, Any]  # host arrays and carried handles, by input name
    outputs: dict[str, Any]  # the runner's handles, by output name


@dataclass
class RunResult:
    logits: np.ndarray | None  # (B, N, V) fp32, zero at padding places (None if not collected)
    hidden: np.ndarray | None  # (B, N, d) fp32, after the final norm (None if not collected)
    state: MemoryState | RmtState  # final memory state (numpy), of the model's kind, with the rows' unfinished segments
    schedule: Schedule
    seconds: float  # wall time of the loop, synchronized
    # segment_states[s]: the state right after segment s (every layer's, for an ARMT; trace=True); segments
    # of the effective input (a resumed call's segment 0 is the one its state left unfinished)
    segment_states: list[MemoryState | RmtState] = field(default_factory=list)
    skip: np.ndarray | None = None  # (B,) pending tokens each row ran again before the call's own
    # "last_logits": (B, V) fp32, each row's last real position of this call (zeros for a row without tokens)
    last_logits: np.ndarray | None = None
    last_index: np.ndarray | None = None  # (B,) that position in the call's input, -1 for a row without tokens


def plan_run(runner: Runner, input_ids, attention_mask=None, state: MemoryState | RmtState | None = None,
             segment_size: int | None = None) -> RunPlan:
    """Check the inputs and lay out the run of `runner`'s graph over a right-padded batch (B, N),
    continuing the state's unfinished segments. `segment_size` overrides the model's (the graphs do
    not depend on it; export samples use less)."""
    cfg = runner.cfg
    cont = continue_input(cfg, input_ids, attention_mask, state, segment_size)
    ids, lengths = cont.ids, cont.lengths
    B = ids.shape[0]
    b = cfg.base
    start = cont.start if cont.start is not None else empty_state(cfg, B)
    check_state(cfg, start, B)  # of the model's kind (the state before a pending segment, if any)
    contract = runner.contract
    T = cont.segment_size
    slots = make_slots(cfg, ids, lengths, uniform=(contract.schedule == "diagonal"), segment_size=T)
    schedule = build_schedule(contract.schedule, b.n_layers, len(slots))
    initial: dict[str, Any] = contract.initial_carry(B, T)
    initial.update({inp: to_numpy(getattr(start, name)).astype(numpy_dtype(contract.input(inp).dtype), copy=False)
                    for name, inp in type(start).INPUTS.items()})  # an RMT's memory: to the compute dtype
    return RunPlan(ids, lengths, slots, schedule, step_feeds(schedule, slots), initial, continuation=cont)


def iter_steps(runner: Runner, plan: RunPlan) -> Iterator[StepCall]:
    """Run `plan` on `runner` (active), one call per step, feeding each call's carried outputs to the next."""
    carried = dict(plan.initial)
    recurrent = runner.contract.recurrent
    for step, fresh in zip(plan.schedule.steps, plan.feeds):
        feeds = {**fresh, **carried}
        outputs = runner.infer(feeds)
        yield StepCall(step, feeds, outputs)
        carried = {inp: outputs[out] for out, inp in recurrent.items()}
    plan.final = carried  # the last call's carried outputs (or the initial ones for an empty run)


def run_schedule(runner: Runner, input_ids, attention_mask=None, state: MemoryState | RmtState | None = None,
                 collect: tuple[str, ...] = ("logits", "hidden"), trace: bool = False, progress: bool = False,
                 segment_size: int | None = None, head: Runner | None = None) -> RunResult:
    """Run `runner` (active) over a right-padded batch of token ids (B, N), from `state` (default:
    empty), continuing its unfinished segments: two calls equal one call at any split point.

    `collect`: what to gather of this call's positions: "logits" (B, N, V), "last_logits" (B, V:
    each row's last real position), "hidden" (B, N, d) (see collect_for); () gathers nothing.
    Logits come from `head`, an active lm_head runner (default: the runner's companion lm_head
    runner, opened for this call); only the rows asked for are fed to it.
    `trace`: also keep the state after every segment (for per-segment comparisons)."""
    bad = sorted(set(collect) - set(COLLECTABLE))
    if bad:
        raise InputError(f"cannot collect {bad}; choose from {COLLECTABLE}")
    if wants_head(collect) and head is None:
        from graphs.contracts import LM_HEAD
        with runner.companion(LM_HEAD) as own_head:
            return run_schedule(runner, input_ids, attention_mask, state, collect, trace, progress, segment_size,
                                own_head)
    plan = plan_run(runner, input_ids, attention_mask, state, segment_size)
    cont = plan.continuation
    cfg = runner.cfg
    B, N = plan.ids.shape[0], cont.new_width
    L = cfg.base.n_layers
    hidden_all = "hidden" in collect or "logits" in collect
    result = {"hidden": np.zeros((B, N, cfg.base.d_model), np.float32) if hidden_all else None}
    last = _LastRows(cont, cfg.base.d_model) if "last_logits" in collect else None
    cls = STATE_CLASSES[cfg.kind]
    per_layer = cls.LAYER_AXIS is not None  # an RMT's state is not per layer: one state per segment
    traced: list = [[None] * L if per_layer else None for _ in plan.slots] if trace else []
    wanted = cont.rows_to_record()  # segment -> rows whose state before their unfinished segment it ends
    recorded = {name: np.zeros(spec_shape, dtype) for name, (spec_shape, dtype) in
                _state_shapes(plan, cls).items()} if wanted else {}
    start = time.perf_counter()
    show = progress and len(plan.schedule.steps) >= PROGRESS_MIN_STEPS
    with Progress(len(plan.schedule.steps), f"{plan.schedule.kind} steps", enabled=show) as bar:
        for call in iter_steps(runner, plan):
            if call.step.leaving is not None:
                slot = plan.slots[call.step.leaving]
                _emit(runner, slot, call.outputs, result, cont.skip)
                if last is not None:
                    last.take(runner, slot, call.outputs)
            if trace:
                _record(runner, call, traced, cls)
            if wanted:
                _record_before(runner, call, wanted, recorded, cls)
            bar.update()
    runner.synchronize()
    logits = _all_logits(head, result["hidden"], cont) if "logits" in collect else None
    last_logits = last.logits(head) if last is not None else None
    final = plan.final
    state_out = cls(**{name: _host(runner, final[inp]) for name, inp in cls.INPUTS.items()})
    state_out = cont.resume_state(state_out, cls(**recorded) if wanted else None)
    seg_states = [cls(**({name: np.stack([cell[name] for cell in row], axis=cls.LAYER_AXIS) for name in cls.INPUTS}
                         if per_layer else row)) for row in traced]
    seconds = time.perf_counter() - start
    log.debug("%s: %d %s steps in %.3f s", runner.name, len(plan.schedule.steps), plan.schedule.kind, seconds)
    return RunResult(logits, result["hidden"] if "hidden" in collect else None, state_out, plan.schedule, seconds,
                     seg_states, cont.skip, last_logits, last.index if last is not None else None)


def last_positions(cont: Continuation) -> np.ndarray:
    """(B,) each row's last real position in the call's own input, -1 for a row without tokens."""
    return cont.new_lengths.astype(np.int64) - 1


class _LastRows:
    """Each row's final-norm hidden state at its last real position of the call, taken from the
    step whose leaving segment holds it (one (B, d) array, never (B, N, d))."""

    def __init__(self, cont: Continuation, d: int):
        self.index = last_positions(cont)  # (B,) in the call's positions
        self.effective = np.where(self.index >= 0, cont.skip + self.index, -1)  # (B,) in the effective input
        self.hidden = np.zeros((len(self.index), d), np.float32)  # (B, d)

    def take(self, runner: Runner, slot: Slot, out: dict[str, Any]) -> None:
        rows = [b for b, c in enumerate(slot.counts.tolist())
                if c and slot.start <= self.effective[b] < slot.start + c]
        if not rows:
            return
        src = runner.to_numpy(out["hidden"])  # (B, W, d)
        for b in rows:
            self.hidden[b] = src[b, self.effective[b] - slot.start]

    def logits(self, head: Runner) -> np.ndarray:
        """(B, V) fp32; zeros for a row without tokens in this call."""
        out = head_logits(head, self.hidden[:, None, :])[:, 0]  # (B, V)
        out[self.index < 0] = 0.0
        return out


def _all_logits(head: Runner, hidden: np.ndarray, cont: Continuation) -> np.ndarray:
    """(B, N, V) logits of the collected hidden rows, zero at padding places (as the rows are)."""
    logits = head_logits(head, hidden)
    real = np.arange(hidden.shape[1])[None, :] < cont.new_lengths[:, None]  # (B, N)
    logits[~real] = 0.0
    return logits


def _state_shapes(plan: RunPlan, cls: type[RecurrentState]) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shape and dtype of each recurrent state tensor of the run (from its initial carried inputs)."""
    return {name: (plan.initial[inp].shape, plan.initial[inp].dtype) for name, inp in cls.INPUTS.items()}


def _host(runner: Runner, value: Any) -> np.ndarray:
    """A host copy of a carried value: the runner's handle, or an initial host array."""
    if isinstance(value, np.ndarray):
        return value.copy()
    return np.array(runner.to_numpy(value))


def _emit(runner: Runner, slot: Slot, out: dict[str, Any], result: dict[str, np.ndarray | None],
          skip: np.ndarray) -> None:
    """Copy a finished segment's real tokens into the (B, N, ...) host results: effective position
    p of row b is the call's position p - skip[b] (pending tokens, p < skip[b], are not returned)."""
    counts = slot.counts.tolist()
    for name in ("hidden",):
        dst = result[name]
        if dst is None or not max(counts, default=0):
            continue
        src = runner.to_numpy(out[name])  # (B, W, ...)
        for row, c in enumerate(counts):
            k = int(skip[row])
            lo = max(slot.start, k)  # first effective position to return
            if slot.start + c > lo:
                dst[row, lo - k:slot.start + c - k] = src[row, lo - slot.start:c]


def _finished_cells(call: StepCall, cls: type[RecurrentState], n_layers: int) -> list[tuple[int, int]]:
    """The cells (s, l) of this step after which the state of segment s can be read: every cell for a
    state per layer (layer l's part), the last layer's cell for a state of the whole model (an RMT's
    memory is the model's output: complete once segment s has left the last layer)."""
    if cls.LAYER_AXIS is not None:
        return list(call.step.cells)
    return [(s, l) for s, l in call.step.cells if l == n_layers - 1]


def _record(runner: Runner, call: StepCall, traced: list, cls: type[RecurrentState]) -> None:
    """Keep the state after every cell this step finished: traced[segment][layer] = {tensor: layer l's
    part} (a state per layer), traced[segment] = {tensor: array} (a state of the whole model)."""
    cells = _finished_cells(call, cls, runner.cfg.base.n_layers)
    if not cells:
        return
    host = {name: runner.to_numpy(call.outputs[out]) for name, out in cls.OUTPUTS.items()}
    for s, l in cells:
        if cls.LAYER_AXIS is None:
            traced[s] = {name: np.array(h) for name, h in host.items()}
        else:
            traced[s][l] = {name: np.take(h, l, axis=cls.LAYER_AXIS).copy() for name, h in host.items()}


def _record_before(runner: Runner, call: StepCall, wanted: dict[int, np.ndarray], recorded: dict[str, np.ndarray],
                   cls: type[RecurrentState]) -> None:
    """For every cell (s, l) of this step that ends the last complete segment s of some rows, keep
    those rows' state (layer l's part of it, for a state per layer): recorded[name][cls.index(rows, l)]
    (the state before their unfinished segment)."""
    cells = [(s, l) for s, l in _finished_cells(call, cls, runner.cfg.base.n_layers) if s in wanted]
    if not cells:
        return
    host = {name: runner.to_numpy(call.outputs[out]) for name, out in cls.OUTPUTS.items()}
    for s, l in cells:
        idx = cls.index(wanted[s], l)
        for name, dst in recorded.items():
            dst[idx] = host[name][idx]
