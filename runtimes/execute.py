"""The one schedule loop: drives any runner through a sequential or diagonal schedule.

    ids, mask --make_slots--> slots --build_schedule--> steps --step_feeds--> per-step feeds (host)
    upload feeds and the start state once
    for step in steps:                                  (no host copies in here)
        out = runner.infer(step feeds + state (+ hidden))
        state (+ hidden) <- out's buffers               (passed back as the next call's inputs)
        step.leaving is not None -> copy out["logits"], out["hidden"] into the result (on the device)
    synchronize; copy the result and the final state to the host once

The runner's role picks the schedule: "segment" -> sequential, "diagonal_step" -> diagonal.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from graphs.errors import InputError
from graphs.segments import Slot, check_ids, make_slots
from graphs.state import MemoryState
from runtimes.progress import Progress
from runtimes.runner import Runner
from runtimes.schedule import Schedule, Step, build_schedule

log = logging.getLogger("armt.run")

SCHEDULE_OF_ROLE = {"segment": "sequential", "diagonal_step": "diagonal"}
ROLE_OF_SCHEDULE = {v: k for k, v in SCHEDULE_OF_ROLE.items()}
COLLECTABLE = ("logits", "hidden")
PROGRESS_MIN_STEPS = 16  # shorter runs draw no progress bar


@dataclass
class RunResult:
    logits: torch.Tensor | None  # (B, N, V) fp32 on the host, zero at padding places (None if not collected)
    hidden: torch.Tensor | None  # (B, N, d) fp32, after the final norm
    state: MemoryState  # final memory state, on the host
    schedule: Schedule
    seconds: float  # wall time of the loop, synchronized
    # segment_states[s]: every layer's state right after it processed segment s (trace=True)
    segment_states: list[MemoryState] = field(default_factory=list)


def step_feeds(schedule: Schedule, slots: list[Slot]) -> list[dict[str, torch.Tensor]]:
    """The per-step graph inputs other than the state and hidden buffers (host tensors).

    Diagonal: layer l works on segment `step.layer_segments[l]`; an idle layer gets segment 0's
    geometry (any valid values do, its results are masked out in the graph)."""
    if schedule.kind == "sequential":
        return [{"input_ids": slots[st.entering].ids, "positions": slots[st.entering].positions,
                 "key_valid": slots[st.entering].key_valid, "write": slots[st.entering].write}
                for st in schedule.steps]
    feeds = []
    for st in schedule.steps:
        seg = [s if s is not None else 0 for s in st.layer_segments]
        feeds.append({
            "input_ids": slots[st.entering if st.entering is not None else 0].ids,  # (B, T)
            "positions": torch.stack([slots[s].positions for s in seg]),  # (L, B, P)
            "key_valid": torch.stack([slots[s].key_valid for s in seg]),  # (L, B, P)
            "active": torch.tensor(st.active),  # (L,)
            "write": torch.stack([slots[s].write for s in seg]),  # (L, B)
        })
    return feeds


def check_state(runner: Runner, state: MemoryState | None, batch: int) -> MemoryState:
    b, a = runner.cfg.base, runner.cfg.armt
    if state is None:
        return MemoryState.zeros(b.n_layers, batch, a.d_key, b.d_model)
    if state.written.dtype != torch.bool:
        raise InputError(f"memory state 'written' must be bool, got {state.written.dtype}")
    state.check_fits(b.n_layers, batch, a.d_key, b.d_model)
    return state


def run_schedule(runner: Runner, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 state: MemoryState | None = None, collect: tuple[str, ...] = COLLECTABLE,
                 trace: bool = False, progress: bool = False) -> RunResult:
    """Run `runner` (active) over a right-padded batch of token ids (B, N), from `state` (default: empty).

    `collect`: which of logits/hidden to gather (each is (B, N, ...) on the device until the end);
    `trace`: also keep the state after every segment (for per-segment comparisons)."""
    cfg = runner.cfg
    bad = sorted(set(collect) - set(COLLECTABLE))
    if bad:
        raise InputError(f"cannot collect {bad}; choose from {COLLECTABLE}")
    if not isinstance(input_ids, torch.Tensor):
        raise InputError("input ids must be a torch tensor")
    ids = input_ids.cpu()
    mask = None if attention_mask is None else attention_mask.cpu()
    lengths = check_ids(ids, cfg.base.vocab_size, mask)  # (B,)
    ids = ids.to(torch.int64)
    B, N = ids.shape
    state = check_state(runner, state, B)
    kind = SCHEDULE_OF_ROLE[runner.role]
    slots = make_slots(cfg, ids, lengths, uniform=(kind == "diagonal"))
    schedule = build_schedule(kind, cfg.base.n_layers, len(slots))
    dev = runner.device
    L, V, d = cfg.base.n_layers, cfg.base.vocab_size, cfg.base.d_model
    P = cfg.armt.segment_size + cfg.armt.num_mem_tokens

    start = time.perf_counter()
    with runner.stream():
        feeds = [{k: v.to(dev) for k, v in f.items()} for f in step_feeds(schedule, slots)]
        carry = {"A_in": state.A.to(dev), "z_in": state.z.to(dev), "written_in": state.written.to(dev)}
        if kind == "diagonal":
            carry["hidden_in"] = torch.zeros(L, B, P, d, dtype=runner.compute_dtype, device=dev)
        result = {"logits": torch.zeros(B, N, V, device=dev) if "logits" in collect else None,
                  "hidden": torch.zeros(B, N, d, device=dev) if "hidden" in collect else None}
        traced: list[list[tuple[torch.Tensor, ...] | None]] = [[None] * L for _ in slots] if trace else []
        show = progress and len(schedule.steps) >= PROGRESS_MIN_STEPS
        with Progress(len(schedule.steps), f"{kind} steps", enabled=show) as bar:
            for step, feed in zip(schedule.steps, feeds):
                out = runner.infer({**feed, **carry})
                carry = {"A_in": out["A_out"], "z_in": out["z_out"], "written_in": out["written_out"]}
                if kind == "diagonal":
                    carry["hidden_in"] = out["hidden_out"]
                if step.leaving is not None:
                    _emit(slots[step.leaving], out, result)
                if trace:
                    _record(step, out, traced)
                bar.update()
        runner.synchronize()
        final = MemoryState(carry["A_in"].cpu().clone(), carry["z_in"].cpu().clone(),
                            carry["written_in"].cpu().clone())
        host = {k: (v.cpu() if v is not None else None) for k, v in result.items()}
        seg_states = [MemoryState(*(torch.stack([cell[k] for cell in row]).cpu() for k in range(3)))
                      for row in traced]
    seconds = time.perf_counter() - start
    log.debug("%s: %d %s steps in %.3f s", runner.name, len(schedule.steps), kind, seconds)
    return RunResult(host["logits"], host["hidden"], final, schedule, seconds, seg_states)


def _emit(slot: Slot, out: dict[str, torch.Tensor], result: dict[str, torch.Tensor | None]) -> None:
    """Copy a finished segment's real tokens into the (B, N, ...) results, on the device."""
    counts = slot.counts.tolist()
    for name in ("logits", "hidden"):
        dst = result[name]
        if dst is None:
            continue
        src = out[name]  # (B, W, ...)
        if min(counts) == max(counts):  # every row full (or equally short): one copy
            c = counts[0]
            if c:
                dst[:, slot.start:slot.start + c].copy_(src[:, :c])
            continue
        for row, c in enumerate(counts):
            if c:
                dst[row, slot.start:slot.start + c].copy_(src[row, :c])


def _record(step: Step, out: dict[str, torch.Tensor], traced: list[list]) -> None:
    """Keep (A, z, written) of every cell this step finished: traced[segment][layer]."""
    for s, l in step.cells:
        traced[s][l] = (out["A_out"][l].clone(), out["z_out"][l].clone(), out["written_out"][l].clone())
