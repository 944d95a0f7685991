"""The bench's RMT workloads: the base model's full attention vs the sequential RMT, side by side.

    backend   full attention                         sequential RMT
    torch     the base model over all N tokens,      graphs.rmt.RmtModel segment by segment (fused SDPA
              one pass (fused SDPA, causal mask)     attention), the memory carried on the device
    ort       -                                      the export's rmt_segment graph (OrtRunner, run_schedule)

An RMT has no diagonal schedule (graphs/rmt.py: segment s+1's first layer needs segment s's last
layer) and no fast executor (runtimes/fast_torch.py is the ARMT's); the torch rows use the reference
cells with PyTorch's fused attention. Full attention builds an explicit (N, N) causal mask, so its
memory grows with N^2 as well as its time; GPT-2's learned positions limit it to n_positions tokens.

Every callable returns an armt.bench.workloads.Outcome: the last segment's hidden states (fp32,
after the final norm) and the final RmtState (torch), so a run can be checked for non-finite values.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable

import numpy as np
import torch

from armt.bench.workloads import PRECISIONS, Outcome
from graphs.config import ModelConfig, RmtConfig, parse_base_config
from graphs.contracts import DIAGONAL_REFUSAL, RMT_SEGMENT
from graphs.errors import InputError
from graphs.rmt import RmtModel
from graphs.segments import make_slots
from graphs.state import RmtState

log = logging.getLogger("armt.bench")

SCHEDULES = ("full", "sequential")
BACKENDS = ("torch", "ort")


def build_rmt_model(synthetic: str, segment: int, memory: int, init_std: float, seed: int,
                    overrides: dict | None = None, wrap_pos: bool = False) -> RmtModel:
    """An fp32 RmtModel on the CPU with random weights in the shape of a synthetic preset."""
    from graphs.synthetic import PRESETS, synthetic_config
    synthetic_config(synthetic)  # refuses an unknown preset
    base = parse_base_config(dict(PRESETS[synthetic], **(overrides or {})))
    cfg = ModelConfig(base, RmtConfig(base.architecture, segment, memory, wrap_pos=wrap_pos))
    return RmtModel(cfg, init_std=init_std, seed=seed).eval()


def rmt_on_device(model: RmtModel, device: torch.device, precision: str) -> RmtModel:
    """A copy of the model on `device` in `precision`."""
    return copy.deepcopy(model).to(device).cast(PRECISIONS[precision]).eval()


def full_attention(model: RmtModel, ids: torch.Tensor) -> torch.Tensor:
    """The base model over the whole input in one pass (no memory): (B, N) -> normed hidden (B, N, d)."""
    cfg = model.cfg
    B, N = ids.shape
    if cfg.base.architecture == "gpt2" and N > cfg.base.n_positions:
        raise InputError(f"GPT-2's full attention covers n_positions = {cfg.base.n_positions} tokens, not {N}")
    offset = cfg.armt.num_mem_tokens if cfg.armt.wrap_pos else 0  # wrap_pos: the original rows sit at M..
    pos = (torch.arange(N, device=model.device) + offset)[None].expand(B, N)  # (B, N)
    with torch.no_grad():
        h = model.globals["embed"][ids]  # (B, N, d)
        if cfg.base.architecture == "gpt2":
            h = h + model.globals["pos_embed"][pos]
        rope, allowed = model.geometry(pos[None], torch.ones(1, B, N, dtype=torch.bool, device=model.device))
        h = h[None]
        for l in range(cfg.base.n_layers):
            h = model.layer(l, h, rope, allowed, fused=True)
        return model.final_norm(h[0])


def sequential(model: RmtModel, ids: torch.Tensor, head: bool = False, collect: bool = False
               ) -> tuple[Outcome, torch.Tensor | None]:
    """The sequential RMT (fused attention), from a fresh memory: (Outcome, hidden (B, N, d) fp32 or None).
    `head`: also compute every segment's logits (the bench's --lm-head)."""
    B, N = ids.shape
    slots = make_slots(model.cfg, ids.cpu(), torch.full((B,), N, dtype=torch.int64), uniform=False)
    state = model.zero_state(B)
    memory, written = state.memory, state.written
    hidden = torch.empty(B, N, model.cfg.base.d_model, device=model.device) if collect else None
    last = None
    with torch.no_grad():
        for slot in slots:
            t = model._slot_tensors(slot)
            _, hid, memory, written = model.segment(*t, memory, written, fused=True, head=head)
            c = int(slot.counts[0])
            if collect:
                hidden[:, slot.start: slot.start + c] = hid[:, :c].float()
            last = hid[:, :c].float()
    if last is None:
        last = torch.zeros(B, 0, model.cfg.base.d_model)
    return Outcome(last, RmtState(memory, written)), hidden


class RmtWorkloads:
    """The RMT counterpart of armt.bench.workloads.Workloads (same interface for `armt bench`)."""

    def __init__(self, model: RmtModel, device: torch.device, precision: str, lm_head: bool = False,
                 export_dir: str | None = None):
        self.fp32_model = model
        self.device, self.precision, self.lm_head = device, precision, lm_head
        self.export_dir = export_dir
        self._model: RmtModel | None = None
        self._ort = None

    @property
    def model(self) -> RmtModel:
        if self._model is None:
            self._model = rmt_on_device(self.fp32_model, self.device, self.precision)
        return self._model

    def supports(self, backend: str, schedule: str) -> bool:
        return schedule in SCHEDULES and not (schedule == "full" and backend != "torch")

    def callable(self, backend: str, schedule: str, ids: torch.Tensor) -> Callable[[], Outcome]:
        if schedule == "diagonal":
            raise InputError(DIAGONAL_REFUSAL)
        if backend not in BACKENDS:
            raise InputError(f"an RMT is benched on the backends {', '.join(BACKENDS)}, not {backend!r}")
        ids = ids.to(self.device)
        model = self.model
        if backend == "torch" and schedule == "full":
            return lambda: Outcome(full_attention(model, ids)[:, -1:].float(), None)
        if backend == "torch":
            return lambda: sequential(model, ids, head=self.lm_head)[0]
        return self._ort_callable(ids)

    def ensure_export(self, where: str | None) -> None:
        """For the ort backend without --export-dir: export the bench's own model (validation skipped)."""
        if self.export_dir:
            return
        if not where:
            raise InputError("the ort backend needs --export-dir (an `armt export` of the same model) "
                             "or --export-to DIR (the bench exports its model there)")
        from exporter.export import export_model
        log.info("exporting the RMT (%s) to %s for the ort backend ...", self.precision, where)
        export_model(copy.deepcopy(self.fp32_model), where, precision=self.precision, overwrite=True,
                     source="armt bench", decode=False)
        self.export_dir = where

    def ort_runner(self):
        if not self.export_dir:
            raise InputError("the ort backend needs --export-dir (an `armt export` of the same model) "
                             "or --export-to DIR (the bench exports its model there)")
        if self._ort is None:
            from runtimes.base import make_runner
            runner = make_runner("ort", self.export_dir, RMT_SEGMENT, device=str(self.device))
            runner.activate()
            if runner.precision != self.precision:
                raise InputError(f"export {self.export_dir} is {runner.precision}, the bench runs {self.precision}")
            self._ort = runner
        return self._ort

    def _ort_callable(self, ids: torch.Tensor) -> Callable[[], Outcome]:
        from runtimes.execute import run_schedule
        runner = self.ort_runner()
        T = runner.cfg.armt.segment_size
        N = ids.shape[1]
        c = N - (-(-N // T) - 1) * T
        host = ids.cpu().numpy()

        def ort_run():
            r = run_schedule(runner, host, collect=("hidden",))
            memory = r.state.memory.astype(np.float32) if r.state.memory.dtype != np.float32 else r.state.memory
            return Outcome(torch.from_numpy(r.hidden[:, N - c:]),
                           RmtState(torch.from_numpy(memory), torch.from_numpy(r.state.written)))
        return ort_run

    def close(self) -> None:
        if self._ort is not None:
            self._ort.deactivate()
            self._ort = None


def run_rmt_parity(work: RmtWorkloads, backends: list[str], length: int, batch: int, seed: int) -> list[dict]:
    """Rows of {backend, schedule, tensor, max_rel, norm_rel, finite} against the fp32 sequential reference:
    the whole run's hidden states and the final memory."""
    from armt.bench.parity import errors
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, work.fp32_model.cfg.base.vocab_size, (batch, length), generator=gen)
    ref_out, ref_hidden = sequential(rmt_on_device(work.fp32_model, work.device, "fp32"), ids.to(work.device),
                                     collect=True)
    ref = {"hidden": ref_hidden, "memory": ref_out.state.memory}
    rows = []

    def add(backend: str, got: dict) -> None:
        for name, t in got.items():
            rows.append({"backend": backend, "schedule": "sequential", "tensor": name, "tokens": length,
                         "batch": batch, "precision": work.precision, **errors(t, ref[name])})

    out, hidden = sequential(work.model, ids.to(work.device), collect=True)
    add("torch", {"hidden": hidden, "memory": out.state.memory})
    if "ort" in backends:
        from runtimes.execute import run_schedule
        r = run_schedule(work.ort_runner(), ids.numpy(), collect=("hidden",))
        add("ort", {"hidden": r.hidden, "memory": r.state.memory.astype(np.float32)})
    return rows
