"""Export-time validation: each exported graph on ONNX Runtime (CPU) against its torch cell.

Each graph runs its plan (exporter.samples) on ONNX Runtime, on its torch cell and on the cell's
fused-attention twin side by side, each feeding back its own outputs (state, hidden buffer), so errors that build up in the memory over
segments are measured; one call's tensors are held at a time. Every output of every call is
compared over the entries that carry meaning (exporter.specs.output_mask: no padding places, no
ended rows, no idle layers); per output the worst call is reported against exporter.bounds, the
bound widened where the torch cell and its twin themselves differ (ill-conditioned memory updates).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from graphs.errors import BackendUnavailable
from graphs.model import ArmtModel

from exporter.bounds import Comparison, compare, format_table, widen
from exporter.samples import INPUT_ORDER, Call, Plan, to_numpy, torch_step
from exporter.specs import output_mask, tensor_kind

log = logging.getLogger("armt.export")


@dataclass
class GraphValidation:
    role: str
    status: str  # "passed", "failed", "not run"
    rows: list[Comparison] = field(default_factory=list)
    reason: str = ""
    calls: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "calls": self.calls,
                "outputs": [{"name": c.name, "kind": c.kind, "max_abs": c.max_abs, "rel": c.rel, "q_rel": c.q_rel,
                             "bound_rel": c.bound.rel, "bound_q_rel": c.bound.q_rel, "ok": c.ok} for c in self.rows]}

    def table(self) -> str:
        title = f"{self.role}: {self.status}" + (f" ({self.reason})" if self.reason else "") + \
            (f", {self.calls} calls on ONNX Runtime CPU vs torch" if self.rows else "")
        return format_table(self.rows, title) if self.rows else title


class NotRunnable(Exception):
    """ONNX Runtime has no kernel for some node of the graph (bf16 on CPU)."""


def ort_session(path: Path):
    """A CPU session; weight prepacking off (it would copy every weight once more)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable("onnxruntime is not installed (pip install onnxruntime)") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        _raise_if_not_runnable(exc)
        raise


def _raise_if_not_runnable(exc: Exception) -> None:
    text = str(exc)
    if "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text:
        first = text.splitlines()[0]
        start = first.find("Could not")
        raise NotRunnable(f"ONNX Runtime CPU cannot run this graph: {first[start:] if start >= 0 else first}"[:300]) \
            from None


def session_step(sess):
    """An ONNX Runtime session as a feeds -> outputs-by-name function (numpy)."""
    names = [o.name for o in sess.get_outputs()]

    def step(feeds: dict) -> dict:
        try:
            return dict(zip(names, sess.run(None, {k: to_numpy(v) for k, v in feeds.items()})))
        except Exception as exc:
            _raise_if_not_runnable(exc)
            raise
    return step


def validate_graph(path: Path, plan: Plan, model: ArmtModel, precision: str) -> tuple[GraphValidation, Call | None]:
    """Run `plan` on ONNX Runtime, on the torch cell and on its fused-attention twin side by side
    (each feeding back its own outputs) and compare every output of every call with the torch cell's,
    under the table bound widened by the twin's spread (exporter.bounds.widen). Returns the result
    and the plan's sample call (torch's feeds)."""
    t0 = time.perf_counter()
    try:
        ort_step = session_step(ort_session(path))
    except NotRunnable as exc:
        return GraphValidation(plan.role, "not run", reason=str(exc)), None
    steps = {"ref": torch_step(model, plan.role), "twin": torch_step(model, plan.role, fused=True), "got": ort_step}
    carried = {"ref": dict(plan.initial), "twin": dict(plan.initial),
               "got": {k: to_numpy(v) for k, v in plan.initial.items()}}
    worst: dict[str, Comparison] = {}
    sample: Call | None = None
    for i, fresh in enumerate(plan.fresh):
        feeds = {who: {n: carried[who][n] if n in carried[who] else (to_numpy(fresh[n]) if who == "got" else fresh[n])
                       for n in INPUT_ORDER[plan.role]} for who in steps}
        try:
            out = {who: step(feeds[who]) for who, step in steps.items()}
        except NotRunnable as exc:
            return GraphValidation(plan.role, "not run", reason=str(exc)), None
        for name, ref in out["ref"].items():
            mask = output_mask(plan.role, name, feeds["ref"])
            kind = tensor_kind(name)
            noise = compare(name, kind, precision, out["twin"][name], ref, mask)
            c = widen(compare(name, kind, precision, out["got"][name], ref, mask), noise)
            prev = worst.get(name)
            if prev is None or (prev.ok and not c.ok) or (prev.ok == c.ok and c.rel > prev.rel):
                worst[name] = c
        if i == plan.sample_index:
            sample = Call(feeds["ref"], {})
        carried = {who: {inp: out[who][o] for o, inp in plan.feedback.items()} for who in steps}
        log.debug("%s call %d/%d compared", plan.role, i + 1, len(plan.fresh))
    rows = list(worst.values())
    status = "passed" if rows and all(c.ok for c in rows) else "failed"
    return (GraphValidation(plan.role, status, rows, calls=len(plan.fresh), seconds=time.perf_counter() - t0),
            sample)
