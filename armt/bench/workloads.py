"""The models a bench runs and the timed callable of each (backend, schedule).

    backend     full attention          sequential ARMT            diagonal ARMT
    torch       FastArmt.full_attention FastArmt.run(sequential)   FastArmt.run(diagonal)
    torch-ref   -                       ArmtModel sequential       ArmtModel diagonal      (graphs.model, fused SDPA)
    ort         -                       C's OrtRunner, segment     C's OrtRunner, diagonal_step (run_schedule)

Every callable returns a `Outcome`: the last segment's hidden states (fp32, after the final norm;
torch backends), the last position's logits (`logits="last"`) and the final memory state, so a run
can be checked for non-finite values. Nothing keeps the (B, N, d) outputs of a whole run (that would
make peak memory grow with N). `logits` is the same job for every backend:

    none   no LM head anywhere (torch: hidden states only; ort: run_schedule collects nothing)
    last   the logits of each row's last position, (B, V) fp32 (torch: last hidden row @ head in the
           compute dtype; ort: the export's lm_head graph on that row, run_schedule "last_logits")
    all    every position's logits computed (torch only: per segment on the device, then dropped; ort
           would gather (B, N, V) on the host, which is not a deployment job: refused)

ONNX Runtime CUDA holds its memory in its own arena, invisible to torch's counters: an ort row's
peak is the device memory in use (cudaMemGetInfo) less torch's reserved memory, less what was in use
before the first ONNX Runtime session opened (`held_device_bytes`); it is the arena's high-water mark
since the session opened. Torch rows give torch's peak allocated bytes and its peak reserved (held)
bytes, the like-for-like figure.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
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
LOGITS = ("none", "last", "all")


@dataclass
class Outcome:
    last_hidden: torch.Tensor | None  # (B, c, d) fp32: the last segment's hidden states after the final norm
    state: MemoryState | RmtState | None  # final memory state (None for full attention)
    last_logits: torch.Tensor | np.ndarray | None = None  # (B, V) fp32 with logits="last"

    def nonfinite(self) -> list[str]:
        """The outputs that hold NaN or Inf, with where (a bench keeps only the last segment's hidden
        states, the last logits and the final memory state: that is as far as it can localize)."""
        bad = [] if self.last_hidden is None or torch.isfinite(self.last_hidden).all() else ["hidden (last segment)"]
        if self.last_logits is not None and not torch.isfinite(torch.as_tensor(self.last_logits)).all():
            bad.append("last logits")
        if self.state is not None:
            bad += [f"{n} (final memory state)" for n in type(self.state).memory_tensors()  # A, z; memory (RMT)
                    if not torch.isfinite(getattr(self.state, n)).all()]
        return bad


def held_device_bytes(device: torch.device) -> int:
    """Device memory in use by this process outside torch's caching allocator (cudaMemGetInfo less
    torch's reserved bytes): CUDA contexts, libraries' workspaces and ONNX Runtime's arena."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def head_weight(model: ArmtModel) -> torch.Tensor:
    """(d, V) the LM head in the model's compute dtype (tied: the embedding's transpose)."""
    g = model.globals
    return g["embed"].t() if model.cfg.base.tie_word_embeddings else g["lm_head"]


def last_logits_of(model: ArmtModel, last_hidden: torch.Tensor) -> torch.Tensor:
    """(B, V) fp32: the head on each row's last hidden row (fp32 in, compute dtype product), as the
    lm_head graph computes it."""
    with torch.no_grad():
        w = head_weight(model)
        return (last_hidden[:, -1].to(w.dtype) @ w).float()


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


def export_bench_model(model, where: str, precision: str, source: str, decode: bool = False,
                       schedules: Sequence[str] | None = None, memory_write: bool = True) -> None:
    """Export a copy of the bench's fp32 model to `where` for the ort backend, without validation (the
    bench's own parity rows measure the export on the real device); `decode`: with the generation graphs;
    `schedules`: only the step graphs of these schedules (+ lm_head), None: every graph of the kind;
    `memory_write=False` (with `schedules`): the decode graph without the memory write (frozen policy)."""
    from graphs.contracts import LM_HEAD, decode_roles_of, role_for
    from runtimes.validation import export_model
    only = None
    if schedules is not None:
        decode_roles = decode_roles_of(model.cfg) if decode else ()  # (decode, memory write)
        if not memory_write:
            decode_roles = decode_roles[:1]
        only = [role_for(model.cfg, s) for s in schedules] + [LM_HEAD] + list(decode_roles)
    log.info("exporting the model (%s%s) to %s for the ort backend ...", precision,
             f": {', '.join(only)}" if only else "", where)
    export_model(copy.deepcopy(model), where, precision=precision, validate=False, overwrite=True, source=source,
                 decode=decode, only=only)


class Workloads:
    """Builds each backend once per precision/device and hands out the callables to time."""

    def __init__(self, model: ArmtModel, device: torch.device, precision: str, lm_head: bool = False,
                 export_dir: str | None = None, logits: str | None = None, cuda_graph: bool | None = None):
        """`logits`: none | last | all (default: all with `lm_head`, else none). `cuda_graph`: the ort
        runners' CUDA graphs (default: on for CUDA)."""
        self.fp32_model = model
        self.logits = logits or ("all" if lm_head else "none")
        if self.logits not in LOGITS:
            raise InputError(f"--logits must be one of {', '.join(LOGITS)}, got {self.logits!r}")
        self.device, self.precision, self.lm_head = device, precision, self.logits == "all"
        self.export_dir = export_dir
        self.cuda_graph = cuda_graph
        self._model: ArmtModel | None = None
        self._fast = None
        self._ort: dict[str, object] = {}
        self._head = None
        self._held_before: int | None = None  # device memory outside torch before ONNX Runtime opened

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

            model, last = self.model, self.logits == "last"

            def fast_run():
                r = fx.run(ids, schedule, head=self.lm_head)
                return Outcome(r.last_hidden, r.state, last_logits_of(model, r.last_hidden) if last else None)
            return fast_run
        if backend == "torch-ref":
            model, last = self.model, self.logits == "last"

            def ref_run():
                out = reference_run(model, ids, schedule)[0]
                if last:
                    out.last_logits = last_logits_of(model, out.last_hidden)
                return out
            return ref_run
        if backend == "ort":
            return self._ort_callable(schedule, ids)
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")

    def ensure_export(self, where: str | None, schedules: Sequence[str] | None = None) -> None:
        """For the ort backend without --export-dir: export the bench's own model (B's exporter,
        validation skipped: the bench's parity rows measure the same thing on the real device) with
        the graphs of `schedules` only (None: all)."""
        if self.export_dir:
            return
        if not where:
            raise InputError("the ort backend needs --export-dir (an `armt export` of the same model) "
                             "or --export-to DIR (the bench exports its model there)")
        export_bench_model(self.fp32_model, where, self.precision, "armt bench", schedules=schedules)
        self.export_dir = where

    def export_has(self, role: str) -> bool:
        """Whether the export holds a `role` graph (the bench's own export holds the benched schedules')."""
        from exporter.manifest import load_manifest
        return bool(self.export_dir) and role in load_manifest(self.export_dir, verify_checksums=False).graphs

    def ort_runner(self, role: str):
        """The export's `role` graph on ONNX Runtime (opened once, kept active)."""
        if not self.export_dir:
            raise InputError("the ort backend needs --export-dir (an `armt export` of the same model) "
                             "or --export-to DIR (the bench exports its model there)")
        if role not in self._ort:
            from runtimes.base import make_runner
            if self.device.type == "cuda" and self._held_before is None:
                torch.cuda.synchronize(self.device)
                self._held_before = held_device_bytes(self.device)
            runner = make_runner("ort", self.export_dir, role, device=str(self.device), cuda_graph=self.cuda_graph)
            runner.activate()
            if runner.precision != self.precision:
                raise InputError(f"export {self.export_dir} is {runner.precision}, the bench runs {self.precision}")
            self._ort[role] = runner
        return self._ort[role]

    def ort_held_bytes(self) -> int | None:
        """Device memory ONNX Runtime holds now (its arena's high-water mark), None on the CPU."""
        if self.device.type != "cuda" or self._held_before is None:
            return None
        return max(held_device_bytes(self.device) - self._held_before, 0)

    def ort_cuda_graph(self, schedule: str) -> dict:
        """Whether the schedule's ort runner captures CUDA graphs (and why not), and how many of its
        calls so far ran the causal graph variant and how many the masked one."""
        runner = self._ort.get(ROLE_OF_SCHEDULE[schedule])
        if runner is None:
            return {}
        return {"cuda_graph": runner.cuda_graph, "cuda_graph_ids": len(runner.graphs),
                "cuda_graph_off_reason": runner.cuda_graph_reason,
                "graph_variants": dict(runner.variant_calls)}  # calls per variant so far: causal / masked

    def _ort_callable(self, schedule: str, ids: torch.Tensor) -> Callable[[], Outcome]:
        from graphs.contracts import LM_HEAD
        from runtimes.execute import run_schedule
        if self.logits == "all":
            raise InputError("the ort backend is benched with --logits last or none (all would gather "
                             "(B, N, vocab) logits on the host)")
        runner = self.ort_runner(ROLE_OF_SCHEDULE[schedule])
        head = self.ort_runner(LM_HEAD) if self.logits == "last" else None
        collect = ("last_logits",) if head is not None else ()
        host = ids.cpu().numpy()

        def ort_run():
            r = run_schedule(runner, host, collect=collect, head=head)
            return Outcome(None, torch_state(r.state, "cpu"), r.last_logits)
        return ort_run

    def close(self) -> None:
        for r in self._ort.values():
            r.deactivate()
        self._ort.clear()
