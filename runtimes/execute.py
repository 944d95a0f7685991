"""The one schedule loop: drives any runner through the schedule its graph role belongs to.

    ids, mask --make_slots--> slots --build_schedule--> steps --step_feeds--> per-step host feeds
    carried inputs start from the state (and, for the diagonal step, a zero hidden buffer)
    for step in steps:                                   (iter_steps: one graph call per step)
        out = runner.infer(step feeds + carried)
        carried <- out's buffers                         (contract.recurrent: output -> next input)
        step.leaving is not None -> copy the finished segment's logits/hidden to the host result
    the final state (host)

`plan_run` makes the host side once (slots, schedule, feeds); `iter_steps` runs it on one runner and
yields every call (validation walks several runners through the same plan side by side);
`run_schedule` is the whole run. The runner's role picks the schedule (graphs.contracts). Nothing
here needs torch: inputs may be numpy arrays or torch tensors, results are numpy.
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
from graphs.state import STATE_CLASSES, MemoryState, RmtState, check_state, empty_state, to_numpy
from runtimes.base import Runner
from runtimes.progress import Progress

log = logging.getLogger("armt.run")

COLLECTABLE = ("logits", "hidden")
PROGRESS_MIN_STEPS = 16  # shorter runs draw no progress bar


@dataclass
class RunPlan:
    """The host side of one run: what every call is fed apart from the carried inputs."""

    ids: np.ndarray  # (B, N) int64
    lengths: np.ndarray  # (B,)
    slots: list[Slot]
    schedule: Schedule
    feeds: list[dict[str, np.ndarray]]  # per step
    initial: dict[str, Any]  # the carried inputs of the first call (host arrays)
    final: dict[str, Any] = field(default_factory=dict)  # the carried values after the run (iter_steps)


@dataclass
class StepCall:
    step: Step
    feeds: dict[str, Any]  # host arrays and carried handles, by input name
    outputs: dict[str, Any]  # the runner's handles, by output name


@dataclass
class RunResult:
    logits: np.ndarray | None  # (B, N, V) fp32, zero at padding places (None if not collected)
    hidden: np.ndarray | None  # (B, N, d) fp32, after the final norm
    state: MemoryState | RmtState  # final memory state (numpy), of the model's kind
    schedule: Schedule
    seconds: float  # wall time of the loop, synchronized
    # segment_states[s]: every layer's state right after it processed segment s (trace=True)
    segment_states: list[MemoryState | RmtState] = field(default_factory=list)


def plan_run(runner: Runner, input_ids, attention_mask=None, state: MemoryState | RmtState | None = None,
             segment_size: int | None = None) -> RunPlan:
    """Check the inputs and lay out the run of `runner`'s graph over a right-padded batch (B, N).
    `segment_size` overrides the model's (the graphs do not depend on it; export samples use less)."""
    cfg = runner.cfg
    if not hasattr(input_ids, "shape") or not hasattr(input_ids, "dtype"):
        raise InputError("input ids must be an array (numpy or torch)")
    lengths = check_ids(input_ids, cfg.base.vocab_size, attention_mask)  # (B,)
    ids = to_numpy(input_ids).astype(np.int64)
    B = ids.shape[0]
    b, a = cfg.base, cfg.armt
    if state is None:
        state = empty_state(cfg, B)
    check_state(cfg, state, B)
    contract = runner.contract
    T = segment_size or a.segment_size
    slots = make_slots(cfg, ids, lengths, uniform=(contract.schedule == "diagonal"), segment_size=T)
    schedule = build_schedule(contract.schedule, b.n_layers, len(slots))
    initial: dict[str, Any] = contract.initial_carry(B, T)
    initial.update({inp: to_numpy(getattr(state, name)).astype(numpy_dtype(contract.input(inp).dtype), copy=False)
                    for name, inp in type(state).INPUTS.items()})  # an RMT's memory: to the compute dtype
    return RunPlan(ids, lengths, slots, schedule, step_feeds(schedule, slots), initial)


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
                 collect: tuple[str, ...] = COLLECTABLE, trace: bool = False, progress: bool = False,
                 segment_size: int | None = None) -> RunResult:
    """Run `runner` (active) over a right-padded batch of token ids (B, N), from `state` (default: empty).

    `collect`: which of logits/hidden to gather (host arrays (B, N, ...)); `trace`: also keep the
    state after every segment (for per-segment comparisons)."""
    bad = sorted(set(collect) - set(COLLECTABLE))
    if bad:
        raise InputError(f"cannot collect {bad}; choose from {COLLECTABLE}")
    plan = plan_run(runner, input_ids, attention_mask, state, segment_size)
    cfg = runner.cfg
    B, N = plan.ids.shape
    L = cfg.base.n_layers
    result = {"logits": np.zeros((B, N, cfg.base.vocab_size), np.float32) if "logits" in collect else None,
              "hidden": np.zeros((B, N, cfg.base.d_model), np.float32) if "hidden" in collect else None}
    per_layer = cfg.kind == "armt"  # an RMT's state is not per layer: one state per segment (= per call)
    traced: list = [[None] * L if per_layer else None for _ in plan.slots] if trace else []
    start = time.perf_counter()
    show = progress and len(plan.schedule.steps) >= PROGRESS_MIN_STEPS
    with Progress(len(plan.schedule.steps), f"{plan.schedule.kind} steps", enabled=show) as bar:
        for call in iter_steps(runner, plan):
            if call.step.leaving is not None:
                _emit(runner, plan.slots[call.step.leaving], call.outputs, result)
            if trace:
                _record(runner, call, traced)
            bar.update()
    runner.synchronize()
    final = plan.final
    cls = STATE_CLASSES[cfg.kind]
    state_out = cls(**{name: _host(runner, final[inp]) for name, inp in cls.INPUTS.items()})
    seg_states = ([MemoryState(*(np.stack([cell[k] for cell in row]) for k in range(3))) for row in traced]
                  if per_layer else traced)
    seconds = time.perf_counter() - start
    log.debug("%s: %d %s steps in %.3f s", runner.name, len(plan.schedule.steps), plan.schedule.kind, seconds)
    return RunResult(result["logits"], result["hidden"], state_out, plan.schedule, seconds, seg_states)


def _host(runner: Runner, value: Any) -> np.ndarray:
    """A host copy of a carried value: the runner's handle, or an initial host array."""
    if isinstance(value, np.ndarray):
        return value.copy()
    return np.array(runner.to_numpy(value))


def _emit(runner: Runner, slot: Slot, out: dict[str, Any], result: dict[str, np.ndarray | None]) -> None:
    """Copy a finished segment's real tokens into the (B, N, ...) host results."""
    counts = slot.counts.tolist()
    for name in COLLECTABLE:
        dst = result[name]
        if dst is None or not max(counts, default=0):
            continue
        src = runner.to_numpy(out[name])  # (B, W, ...)
        for row, c in enumerate(counts):
            if c:
                dst[row, slot.start:slot.start + c] = src[row, :c]


def _record(runner: Runner, call: StepCall, traced: list) -> None:
    """Keep (A, z, written) of every cell this step finished: traced[segment][layer]; an RMT's
    state after the step's segment: traced[segment]."""
    if runner.cfg.kind == "rmt":
        traced[call.step.entering] = RmtState(**{name: np.array(runner.to_numpy(call.outputs[out]))
                                                 for name, out in RmtState.OUTPUTS.items()})
        return
    host = {k: runner.to_numpy(call.outputs[k]) for k in ("A_out", "z_out", "written_out")}
    for s, l in call.step.cells:
        traced[s][l] = (host["A_out"][l].copy(), host["z_out"][l].copy(), host["written_out"][l].copy())
