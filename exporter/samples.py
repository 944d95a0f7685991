"""Realistic graph inputs: the call sequences of real multi-segment runs.

A *plan* is what a runtime feeds one graph over a run: per call the fresh inputs (ids, positions,
masks, flags; no arithmetic needed to make them), plus the carried inputs (memory state, and for the
diagonal step the hidden buffer) that come from the previous call's outputs. Running a plan on a
backend (torch cell or ONNX Runtime session) gives a *chain* of calls with their outputs. The sample
batch has a full row and a short row, so it exercises everything the memory path has:

    row 0: | seg 0 full   | seg 1 full   | seg 2 short |   three segments, memory written each time
    row 1: | seg 0 padded |   (ended)    |   (ended)   |   padded slot, then write = False

Validation runs each exported graph along its plan on ONNX Runtime and on the torch cell side by
side (exporter.validate). `sample_feeds.npz` stores one call per graph from inside such a run
(non-zero state in every layer, padding, mixed write/active flags) for Polygraphy and users.

The graphs do not depend on the segment size (positions and masks are inputs), so samples use a
smaller width (default min(T, 32)) to keep CPU runs affordable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from graphs.cells import DiagonalStep, SegmentCell, diagonal_feeds
from graphs.config import ModelConfig
from graphs.model import ArmtModel
from graphs.segments import make_slots, row_lengths

DEFAULT_MAX_WIDTH = 32
SEGMENTS = 3
SEGMENT_OUT = ("logits", "hidden", "A_out", "z_out", "written_out")
DIAGONAL_OUT = ("hidden_out", "logits", "hidden", "A_out", "z_out", "written_out")
STATE_FEEDBACK = {"A_out": "A_in", "z_out": "z_in", "written_out": "written_in"}


@dataclass
class Plan:
    role: str
    fresh: list[dict[str, torch.Tensor]]  # per call: inputs that do not come from the previous call
    initial: dict[str, torch.Tensor]  # the carried inputs of the first call
    feedback: dict[str, str]  # output name -> input name of the next call
    sample_index: int  # the call stored in sample_feeds.npz


@dataclass
class Call:
    feeds: dict[str, object]  # torch tensors or numpy arrays, by input name
    outputs: dict[str, object]  # by output name


@dataclass
class Chain:
    role: str
    calls: list[Call]
    sample_index: int


def sample_batch(cfg: ModelConfig, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (2, N) and a right-padded mask: row 0 spans SEGMENTS segments (last one short), row 1
    fills part of segment 0 only."""
    n = (SEGMENTS - 1) * width + max(1, width // 2)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.base.vocab_size, (2, n), generator=gen)
    lengths = torch.tensor([n, max(1, (2 * width) // 3)])
    mask = (torch.arange(n)[None] < lengths[:, None]).to(torch.int64)
    return ids, mask


def sample_config(cfg: ModelConfig, width: int) -> ModelConfig:
    """The same model with segment size `width` (slot layout only; the graphs are width-agnostic)."""
    return ModelConfig(cfg.base, dataclasses.replace(cfg.armt, segment_size=width))


def sample_width(cfg: ModelConfig, max_width: int = DEFAULT_MAX_WIDTH) -> int:
    return max(2, min(cfg.armt.segment_size, max_width))


def segment_plan(model: ArmtModel, width: int, seed: int = 0) -> Plan:
    """Sequential schedule: one call per segment (widest-row widths: the last slot is narrower)."""
    cfg = sample_config(model.cfg, width)
    ids, mask = sample_batch(cfg, width, seed)
    slots = make_slots(cfg, ids, row_lengths(ids, mask), uniform=False)
    st = model.zero_state(ids.shape[0])
    fresh = [{"input_ids": s.ids, "positions": s.positions, "key_valid": s.key_valid, "write": s.write} for s in slots]
    return Plan("segment", fresh, {"A_in": st.A, "z_in": st.z, "written_in": st.written}, dict(STATE_FEEDBACK),
                sample_index=1)


def diagonal_plan(model: ArmtModel, width: int, seed: int = 0) -> Plan:
    """Diagonal schedule: S + L - 1 steps (ramp-up, full, ramp-down)."""
    cfg = sample_config(model.cfg, width)
    ids, mask = sample_batch(cfg, width, seed)
    slots = make_slots(cfg, ids, row_lengths(ids, mask), uniform=True)
    L, B = cfg.base.n_layers, ids.shape[0]
    P = width + cfg.armt.num_mem_tokens
    st = model.zero_state(B)
    fresh = []
    for t in range(len(slots) + L - 1):
        f = diagonal_feeds(model, slots, t)
        fresh.append({k: f[k] for k in ("input_ids", "positions", "key_valid", "active", "write")})
    initial = {"hidden_in": torch.zeros(L, B, P, cfg.base.d_model, dtype=model.dtype),
               "A_in": st.A, "z_in": st.z, "written_in": st.written}
    # step L: the last layer works on segment 1 (its memory holds segment 0, so the logits depend on
    # memory), every layer's state is non-zero, and early layers are idle (ramp-down) when S <= L
    return Plan("diagonal_step", fresh, initial, {"hidden_out": "hidden_in", **STATE_FEEDBACK},
                sample_index=min(L, len(fresh) - 1))


def plans(model: ArmtModel, width: int, roles: tuple[str, ...], seed: int = 0) -> dict[str, Plan]:
    builders = {"segment": segment_plan, "diagonal_step": diagonal_plan}
    return {r: builders[r](model, width, seed) for r in roles}


INPUT_ORDER = {"segment": ("input_ids", "positions", "key_valid", "write", "A_in", "z_in", "written_in"),
               "diagonal_step": ("input_ids", "hidden_in", "positions", "key_valid", "active", "write",
                                 "A_in", "z_in", "written_in")}


def run_plan(plan: Plan, step: Callable[[dict], dict], convert: Callable = lambda x: x,
             stop: int | None = None, keep: set[int] | None = None) -> Chain:
    """Run `plan` with `step(feeds) -> outputs by name`, feeding each call's carried outputs to the
    next; `convert` maps plan tensors to the backend's type; `stop` limits the number of calls;
    `keep` names the calls whose feeds/outputs are kept (None: all; big models keep only the sample)."""
    carried = {k: convert(v) for k, v in plan.initial.items()}
    calls: list[Call | None] = []
    for i, fresh in enumerate(plan.fresh[:stop]):
        feeds = {name: (carried[name] if name in carried else convert(fresh[name])) for name in INPUT_ORDER[plan.role]}
        outputs = step(feeds)
        calls.append(Call(feeds, outputs) if keep is None or i in keep else None)
        carried = {inp: outputs[out] for out, inp in plan.feedback.items()}
    return Chain(plan.role, calls, plan.sample_index)


def torch_step(model: ArmtModel, role: str, fused: bool = False) -> Callable[[dict], dict]:
    """The torch cell of `role` as a feeds -> outputs-by-name function (the reference; `fused`: its
    fused-attention twin, used to measure the reference's own rounding spread)."""
    cell = (SegmentCell(model, fused) if role == "segment" else DiagonalStep(model, fused)).eval()
    names = SEGMENT_OUT if role == "segment" else DIAGONAL_OUT

    @torch.no_grad()
    def step(feeds: dict) -> dict:
        return dict(zip(names, cell(**feeds)))
    return step


def run_torch(model: ArmtModel, plan: Plan, stop: int | None = None, keep: set[int] | None = None) -> Chain:
    """The plan on the torch cell."""
    return run_plan(plan, torch_step(model, plan.role), stop=stop, keep=keep)


def to_numpy(t) -> np.ndarray:
    """bf16 has no numpy dtype: stored as float32 (exact); the reader casts back (see polygraphy script)."""
    if isinstance(t, np.ndarray):
        return t
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def save_samples(path: Path, calls: dict[str, Call]) -> None:
    """sample_feeds.npz: key "<role>/<input name>" for one call of each graph."""
    arrays = {f"{role}/{name}": to_numpy(value) for role, call in calls.items() for name, value in call.feeds.items()}
    with open(path, "wb") as f:  # written inside the export's staging directory (atomic as a whole)
        np.savez(f, **arrays)


def load_samples(path: Path, role: str) -> dict[str, np.ndarray]:
    """One graph's sample feeds (as stored: bf16 inputs come back as float32)."""
    with np.load(path, allow_pickle=False) as data:
        prefix = f"{role}/"
        return {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}
