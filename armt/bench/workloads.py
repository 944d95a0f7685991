"""The models a bench runs and the timed callable of each (backend, schedule).

    backend     full attention          sequential ARMT            diagonal ARMT
    torch       FastArmt.full_attention FastArmt.run(sequential)   FastArmt.run(diagonal)
    torch-ref   -                       ArmtModel sequential       ArmtModel diagonal      (graphs.model, fused SDPA)
    ort         -                       C's OrtRunner, segment     C's OrtRunner, diagonal_step (run_schedule)

Every callable returns a `Outcome`: the last segment's hidden states (fp32, after the final norm)
and the final memory state, so a run can be checked for non-finite values. Nothing keeps the
(B, N, d) outputs of a whole run (that would make peak memory grow with N); the head (logits) is
computed per segment only with `lm_head`, and only for the torch backends (the ONNX graphs always
compute it: see docs/performance.md).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from graphs.blocks import rms_norm
from graphs.contracts import ROLE_OF_SCHEDULE
from graphs.errors import InputError
from graphs.model import ArmtModel, torch_state
from graphs.segments import make_slots
from graphs.state import MemoryState, RmtState

log = logging.getLogger("armt.bench")

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCHEDULES = ("full", "sequential", "diagonal")
BACKENDS = ("torch", "torch-ref", "ort")


@dataclass
class Outcome:
    last_hidden: torch.Tensor  # (B, c, d) fp32: the last segment's hidden states after the final norm
    state: MemoryState | RmtState | None  # final memory state (None for full attention)

    def nonfinite(self) -> list[str]:
        """The outputs that hold NaN or Inf, with where (a bench keeps only the last segment's hidden
        states and the final memory state: that is as far as it can localize)."""
        bad = [] if torch.isfinite(self.last_hidden).all() else ["hidden (last segment)"]
        if self.state is not None:
            bad += [f"{n} (final memory state)" for n in type(self.state).memory_tensors()  # A, z; memory (RMT)
                    if not torch.isfinite(getattr(self.state, n)).all()]
        return bad


def build_model(synthetic: str | None, model_dir: str | None, segment: int, memory: int, d_mem: int,
                init_std: float, mem_std: float | None, seed: int, overrides: dict | None = None) -> ArmtModel:
    """An fp32 ArmtModel on the CPU: a synthetic preset with random weights, or a model directory."""
    if model_dir:
        from graphs.modeldir import load_model_dir
        return load_model_dir(model_dir).eval()
    from graphs.synthetic import synthetic_config
    cfg = synthetic_config(synthetic, segment_size=segment, num_mem_tokens=memory, d_mem=d_mem, **(overrides or {}))
    return ArmtModel(cfg, init_std=init_std, mem_init_std=mem_std, seed=seed).eval()


def on_device(model: ArmtModel, device: torch.device, precision: str) -> ArmtModel:
    """A copy of the model on `device` in `precision` (memory weights stay fp32)."""
    m = copy.deepcopy(model).to(device)
    if precision != "fp32":
        m.cast(PRECISIONS[precision])
    return m.eval()


def reference_run(model: ArmtModel, ids: torch.Tensor, schedule: str, collect: bool = False):
    """graphs.model.ArmtModel's own schedule loop with fused attention, head-less: returns
    (Outcome, hidden (B, N, d) fp32 or None). Uses the model's schedule methods directly so that the
    (B, N, vocab) logits of `forward` are not built (they do not fit at long lengths)."""
    cfg = model.cfg
    B, N = ids.shape
    lengths = torch.full((B,), N, dtype=torch.int64)
    slots = make_slots(cfg, ids.cpu(), lengths, uniform=(schedule == "diagonal"))
    g = model.globals
    eps = cfg.base.norm_eps
    hidden = torch.empty(B, N, cfg.base.d_model, device=model.device) if collect else None
    last = []

    def emit(slot, h_last):
        if not collect and slot.index != len(slots) - 1:
            return
        c = int(slot.counts[0])
        x = rms_norm(h_last[None, :, :c], g["final_norm_w"][None], eps)[0].float()  # (B, c, d)
        if collect:
            hidden[:, slot.start: slot.start + c] = x
        if slot.index == len(slots) - 1:
            last.append(x)

    run = model._sequential if schedule == "sequential" else model._diagonal
    with torch.no_grad():
        state, _ = run(slots, model.zero_state(B), emit, True, False)
    return Outcome(last[0], state), hidden


class Workloads:
    """Builds each backend once per precision/device and hands out the callables to time."""

    def __init__(self, model: ArmtModel, device: torch.device, precision: str, lm_head: bool = False,
                 export_dir: str | None = None):
        self.fp32_model = model
        self.device, self.precision, self.lm_head = device, precision, lm_head
        self.export_dir = export_dir
        self._model: ArmtModel | None = None
        self._fast = None
        self._ort: dict[str, object] = {}

    @property
    def model(self) -> ArmtModel:
        if self._model is None:
            self._model = on_device(self.fp32_model, self.device, self.precision)
        return self._model

    @property
    def fast(self):
        if self._fast is None:
            from runtimes.fast_torch import FastArmt
            self._fast = FastArmt(self.model)
        return self._fast

    def supports(self, backend: str, schedule: str) -> bool:
        return not (schedule == "full" and backend != "torch")

    def callable(self, backend: str, schedule: str, ids: torch.Tensor) -> Callable[[], Outcome]:
        ids = ids.to(self.device)
        if backend == "torch":
            fx = self.fast
            if schedule == "full":
                return lambda: Outcome(fx.full_attention(ids)[:, -1:].float(), None)

            def fast_run():
                r = fx.run(ids, schedule, head=self.lm_head)
                return Outcome(r.last_hidden, r.state)
            return fast_run
        if backend == "torch-ref":
            model = self.model
            return lambda: reference_run(model, ids, schedule)[0]
        if backend == "ort":
            return self._ort_callable(schedule, ids)
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")

    def ensure_export(self, where: str | None) -> None:
        """For the ort backend without --export-dir: export the bench's own model (B's exporter,
        validation skipped: the bench's parity rows measure the same thing on the real device)."""
        if self.export_dir:
            return
        if not where:
            raise InputError("the ort backend needs --export-dir (an `armt export` of the same model) "
                             "or --export-to DIR (the bench exports its model there)")
        from runtimes.validation import export_model
        log.info("exporting the model (%s) to %s for the ort backend ...", self.precision, where)
        export_model(copy.deepcopy(self.fp32_model), where, precision=self.precision, validate=False,
                     overwrite=True, source="armt bench")
        self.export_dir = where

    def _ort_callable(self, schedule: str, ids: torch.Tensor) -> Callable[[], Outcome]:
        if not self.export_dir:
            raise InputError("the ort backend needs --export-dir (an `armt export` of the same model) "
                             "or --export-to DIR (the bench exports its model there)")
        from runtimes.execute import run_schedule
        from runtimes.base import make_runner
        role = ROLE_OF_SCHEDULE[schedule]
        if role not in self._ort:
            runner = make_runner("ort", self.export_dir, role, device=str(self.device))
            runner.activate()
            if runner.precision != self.precision:
                raise InputError(f"export {self.export_dir} is {runner.precision}, the bench runs {self.precision}")
            self._ort[role] = runner
        runner = self._ort[role]
        T = runner.cfg.armt.segment_size
        N = ids.shape[1]
        c = N - (-(-N // T) - 1) * T

        def ort_run():
            r = run_schedule(runner, ids.cpu(), collect=("hidden",))
            return Outcome(torch.from_numpy(r.hidden[:, N - c:]), torch_state(r.state, "cpu"))
        return ort_run

    def close(self) -> None:
        for r in self._ort.values():
            r.deactivate()
        self._ort.clear()
