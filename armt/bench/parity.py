"""Error of each backend's schedules against the fp32 reference (graphs.model, sequential) on one input.

The bench precision (fp16/bf16) cannot match fp32 bit for bit; the table shows, next to each
backend, what the plain reference in the same precision gets, so a fast path is judged against
the error its precision already has. Metrics per tensor: max |a - b| / max |b| and ||a - b|| / ||b||
over the whole run's hidden states (B, N, d), the last position's logits (B, V) (the head on the
last hidden row: torch in the compute dtype, ONNX Runtime through the export's lm_head graph) and
the final memory A (L, B, K, d) and z (L, B, K).
"""

from __future__ import annotations

import logging

import torch

from armt.bench.workloads import Workloads, last_logits_of, on_device, reference_run
from graphs.contracts import LM_HEAD, ROLE_OF_SCHEDULE
from graphs.state import to_numpy

log = logging.getLogger("armt.bench")


def errors(got, ref) -> dict[str, float | bool]:
    """got, ref: torch tensors or numpy arrays."""
    g, r = (torch.as_tensor(to_numpy(x)).double() for x in (got, ref))
    finite = bool(torch.isfinite(g).all())
    if not finite:
        return {"finite": False, "max_rel": float("inf"), "norm_rel": float("inf")}
    return {"finite": True,
            "max_rel": float((g - r).abs().max() / r.abs().max().clamp_min(1e-30)),
            "norm_rel": float((g - r).norm() / r.norm().clamp_min(1e-30))}


def run_parity(work: Workloads, backends: list[str], length: int, batch: int, seed: int) -> list[dict]:
    """Rows of {backend, schedule, tensor, max_rel, norm_rel, finite} against the fp32 reference."""
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, work.fp32_model.cfg.base.vocab_size, (batch, length), generator=gen)
    ref_model = on_device(work.fp32_model, work.device, "fp32")
    ref_out, ref_hidden = reference_run(ref_model, ids.to(work.device), "sequential", collect=True)
    if not torch.isfinite(ref_hidden).all():
        log.warning("the fp32 reference itself is not finite at %d tokens", length)
    ref = {"hidden": ref_hidden, "last_logits": last_logits_of(ref_model, ref_hidden),
           "A": ref_out.state.A, "z": ref_out.state.z}
    del ref_model
    rows = []

    def add(backend: str, schedule: str, got: dict) -> None:
        for name, t in got.items():
            rows.append({"backend": backend, "schedule": schedule, "tensor": name, "tokens": length,
                         "batch": batch, "precision": work.precision, **errors(t, ref[name])})

    dev_ids = ids.to(work.device)
    for schedule in ("sequential", "diagonal"):
        out, hidden = reference_run(work.model, dev_ids, schedule, collect=True)
        add("torch-ref", schedule, {"hidden": hidden, "last_logits": last_logits_of(work.model, hidden),
                                    "A": out.state.A, "z": out.state.z})
    if "torch" in backends:
        for schedule in ("sequential", "diagonal"):
            r = work.fast.run(dev_ids, schedule, collect=True)
            add("torch", schedule, {"hidden": r.hidden, "last_logits": last_logits_of(work.model, r.hidden),
                                    "A": r.state.A, "z": r.state.z})
    if "ort" in backends:
        from graphs.errors import ArmtError
        from runtimes.execute import run_schedule
        for schedule in ("sequential", "diagonal"):
            if not work.export_has(ROLE_OF_SCHEDULE[schedule]):
                log.info("ort %s parity not run: the export has no %s graph", schedule, ROLE_OF_SCHEDULE[schedule])
                continue
            try:
                r = run_schedule(work.ort_runner(ROLE_OF_SCHEDULE[schedule]), ids.numpy(),
                                 collect=("hidden", "last_logits"), head=work.ort_runner(LM_HEAD))
            except ArmtError as exc:  # e.g. no bf16 kernels on the CPU provider: a row that says so
                log.warning("ort %s parity not run: %s", schedule, exc)
                rows.append({"backend": "ort", "schedule": schedule, "tensor": "*", "tokens": length,
                             "batch": batch, "precision": work.precision, "error": str(exc),
                             "finite": False, "max_rel": float("nan"), "norm_rel": float("nan")})
                continue
            add("ort", schedule, {"hidden": r.hidden, "last_logits": r.last_logits, "A": r.state.A, "z": r.state.z})
    return rows
