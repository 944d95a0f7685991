"""`armt verify`: the backends against the PyTorch sequential reference, per segment and per tensor.

    checksums (load_manifest)  ->  torch reference (the model at the export's precision, its own
                                   sequential loop, traced per segment)
    for backend in ort, trt:  for schedule in sequential, diagonal (an RMT: sequential):  for case in cases:
        run the schedule loop, compare every segment's logits, hidden and memory state
        (ARMT: A, z, written; RMT: memory, written)
    table -> exit 0 all passed | 1 a miss (ParityFailure) | 3 nothing missed but a backend could not run
    always strict: NaN/Inf never passes a comparison, and each non-finite tensor is named with the
    first segment where it appears (runtimes/finite.py)

Generated cases (unless --input-ids): one row of 2.5 segments, a batch with one short segment,
a right-padded batch of three lengths, and a run resumed inside a segment from the state of its first
part (the state, with its unfinished segment, travels through the host, as a state file would).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from exporter.bounds import NOISE_CAP, NOISE_FACTOR, Comparison, compare, widen
from graphs.config import ModelConfig
from graphs.contracts import role_for
from graphs.errors import BackendUnavailable, ExportError, InputError
from graphs.progress import Progress
from graphs.state import to_numpy
from runtimes.base import Runner, make_runner
from runtimes.execute import RunResult, run_schedule
from runtimes.finite import find_nonfinite

log = logging.getLogger("armt.verify")

NOT_RUN_EXIT = 3  # every comparison that ran passed, but a requested backend could not run here
# Conditioning: the memory update can amplify rounding (k.z + eps denominators, the gamma clamp), so on
# some inputs two equally valid implementations at one precision differ by more than the table allows
# (measured: torch fp32 with plain vs fused attention, official LLaMA fixture, A rel 3.2e-5). The
# reference is therefore run twice (plain and fused attention) and a backend may differ from it by
# NOISE_FACTOR x that spread, never by more than NOISE_CAP x the table's bound (exporter.bounds.widen).


# ------------------------------------------------------------------------------------------ reference
def reference_model(manifest, model_dir: str | None, device: str = "cpu"):
    """The torch reference: the fp32 model of `model_dir` (checked to be the export's), or the
    export's own weights at its precision (exporter/reference.py) when no model directory is given."""
    try:
        from graphs.modeldir import load_model_dir
        from exporter.reference import model_from_export
        from runtimes.torch_runner import check_torch_device
    except ImportError as exc:
        raise BackendUnavailable(f"the torch reference needs torch ({exc}); pip install 'armt-deploy[torch]', "
                                 "or check the graphs alone with `armt verify EXPORT --per-graph --graphs-only`") from None
    if model_dir:
        model = load_model_dir(model_dir)
        want = manifest.model_id
        got = model.model_id()  # recomputed from the loaded tensors, not the id the directory records
        if model.cfg != manifest.model_config() or got != want:
            raise InputError(f"model directory {model_dir} is another model than the one this export was made "
                             f"from (model id {got}; the export's is {want})")
    else:
        model = model_from_export(manifest)
    return model.to(check_torch_device(device)).eval()


# ------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    name: str
    ids: np.ndarray  # (B, N) int64
    mask: np.ndarray | None  # (B, N) 0/1 right-padded, or None
    cut: int | None = None  # resume: run ids[:, :cut], then ids[:, cut:] from that state


def generated_cases(cfg: ModelConfig, seed: int = 0) -> list[Case]:
    T, V = cfg.armt.segment_size, cfg.base.vocab_size
    rng = np.random.default_rng(seed)
    ids = lambda B, N: rng.integers(0, V, size=(B, N), dtype=np.int64)  # noqa: E731
    n1 = 2 * T + T // 2
    lengths = np.array([3 * T + 1, T + 1, 1])
    n_pad = int(lengths.max())
    mask = (np.arange(n_pad)[None] < lengths[:, None]).astype(np.int64)
    return [
        Case(f"1x{n1}", ids(1, n1), None),
        Case(f"2x{max(T // 2, 1)}", ids(2, max(T // 2, 1)), None),
        Case(f"padded 3x{n_pad} ({','.join(map(str, lengths.tolist()))})", ids(3, n_pad), mask),
        Case(f"resumed 2x{2 * T + 2} at {T + T // 2}", ids(2, 2 * T + 2), None, cut=T + T // 2),
    ]


def given_case(ids, mask) -> Case:
    ids = to_numpy(ids).astype(np.int64)
    return Case(f"given {ids.shape[0]}x{ids.shape[1]}", ids, None if mask is None else to_numpy(mask))


# ------------------------------------------------------------------------------------------ rows
@dataclass
class Row:
    backend: str
    schedule: str
    case: str
    tensor: str
    cmp: Comparison | None = None  # the worst segment's (or call's) comparison
    segment: int | None = None  # the worst segment (or sample call)
    status: str = "ok"  # "ok" | "FAIL" | "not run"
    note: str = ""
    noise: Comparison | None = None  # the reference's own spread at that segment (plain vs fused attention)

    @property
    def widened(self) -> bool:
        return self.cmp is not None and self.noise is not None and self.cmp.bound != self.noise.bound


@dataclass
class Report:
    export_dir: str
    precision: str
    rows: list[Row] = field(default_factory=list)

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == "FAIL"]

    @property
    def not_run(self) -> list[Row]:
        return [r for r in self.rows if r.status == "not run"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else NOT_RUN_EXIT if self.not_run else 0

    def table(self) -> str:
        head = ("backend", "schedule", "case", "tensor", "worst seg", "max abs", "rel err", "q99.9 rel", "ref noise",
                "bound rel/q", "status")
        lines = [head]
        for r in self.rows:
            c = r.cmp
            if c is None:
                lines.append((r.backend, r.schedule, r.case, r.tensor, "", "", "", "", "", "", f"{r.status}: {r.note}"))
                continue
            bound = ("exact" if c.bound.rel == 0 else c.bound.label() if c.bound.given
                     else f"{c.bound.rel:.1e}/{c.bound.q_rel:.1e}*" if r.widened
                     else f"{c.bound.rel:.0e}/{c.bound.q_rel:.0e}")
            note = r.note or c.note
            lines.append((r.backend, r.schedule, r.case, r.tensor, "" if r.segment is None else str(r.segment),
                          f"{c.max_abs:.2e}", f"{c.rel:.2e}", f"{c.q_rel:.2e}",
                          "" if r.noise is None or c.bound.rel == 0 else f"{r.noise.rel:.1e}", bound,
                          r.status + (f" ({note})" if note else "")))
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(head) - 1)]
        out = []
        for line in lines:
            cells = [str(c).ljust(w) for c, w in zip(line[:-1], widths)]
            out.append("  ".join(cells) + "  " + str(line[-1]))
        out.insert(1, "-" * len(out[0]))
        if any(r.widened for r in self.rows):
            out.append(f"* bound widened to {NOISE_FACTOR:g} x the reference's own spread (ref noise: plain vs fused "
                       f"attention, same precision), at most {NOISE_CAP:g} x the table bound")
        if any(r.cmp is not None and r.cmp.bound.given for r in self.rows):
            out.append("(set): bound given on the command line (--rtol/--atol/--bound), not the table's; "
                       "+Xabs: absolute slack (passes when err <= atol + rel x max|ref|)")
        return "\n".join(out)

    def to_dict(self) -> dict:
        """The report as plain data (`armt verify --json`)."""
        def num(x: float):
            return x if math.isfinite(x) else str(x)  # JSON has no inf/nan
        rows = []
        for r in self.rows:
            row = {"backend": r.backend, "schedule": r.schedule, "case": r.case, "tensor": r.tensor,
                   "status": r.status, "segment": r.segment, "note": r.note or (r.cmp.note if r.cmp else "")}
            if r.cmp is not None:
                b = r.cmp.bound
                row.update(max_abs=num(r.cmp.max_abs), rel=num(r.cmp.rel), q_rel=num(r.cmp.q_rel),
                           bound={"rel": b.rel, "q_rel": b.q_rel, "atol": b.atol, "given": b.given,
                                  "widened": r.widened},
                           ref_noise_rel=None if r.noise is None else num(r.noise.rel))
            rows.append(row)
        return {"export_dir": self.export_dir, "precision": self.precision, "exit_code": self.exit_code,
                "passed": not self.failed and not self.not_run, "failed": len(self.failed),
                "not_run": sorted({r.backend for r in self.not_run}), "summary": self.summary(), "rows": rows}

    def summary(self) -> str:
        ran = [r for r in self.rows if r.status != "not run"]
        text = f"{len(ran) - len(self.failed)}/{len(ran)} comparisons within bounds ({self.precision})"
        if self.failed:
            worst = max(self.failed, key=lambda r: (r.cmp.rel / max(r.cmp.bound.rel, 1e-30)) if r.cmp else 0)
            c = worst.cmp
            what = (c.note if c.note else f"rel {c.rel:.2e} > {c.bound.rel:.1e}" if c.rel > c.bound.rel
                    else f"q99.9 rel {c.q_rel:.2e} > {c.bound.q_rel:.1e}")
            text += (f"; {len(self.failed)} missed, worst: {worst.backend} {worst.schedule} {worst.case} "
                     f"{worst.tensor} {what}")
        backends = sorted({r.backend for r in self.not_run})
        if backends:
            text += f"; NOT RUN (not counted as passed): {', '.join(backends)}"
        return text


# ------------------------------------------------------------------------------------------ running
def reference_run(model, case: Case, fused: bool = False) -> RunResult:
    """The PyTorch sequential reference (the model's own loop, not the runtime's), traced per segment,
    as host arrays. `fused=True`: the same with PyTorch's fused attention kernel (the noise probe)."""
    import torch
    dev = model.device
    with torch.no_grad():
        out = model(torch.from_numpy(case.ids).to(dev),
                    attention_mask=None if case.mask is None else torch.from_numpy(case.mask).to(dev),
                    schedule="sequential", trace=True, fused=fused)
    return RunResult(to_numpy(out.logits), to_numpy(out.hidden), out.state.numpy(), None, 0.0,
                     [s.numpy() for s in out.segment_states])


def backend_run(runner: Runner, case: Case) -> RunResult:
    if case.cut is None:
        return run_schedule(runner, case.ids, case.mask, trace=True)
    c = case.cut
    mask = (None, None) if case.mask is None else (case.mask[:, :c], case.mask[:, c:])
    first = run_schedule(runner, case.ids[:, :c], mask[0], trace=True)
    second = run_schedule(runner, case.ids[:, c:], mask[1], state=first.state.numpy(), trace=True)  # via the host
    # the second call ran the first's unfinished segment again: its segments continue the first's complete ones
    kept = first.segment_states[:c // runner.cfg.armt.segment_size]
    return RunResult(np.concatenate([first.logits, second.logits], 1), np.concatenate([first.hidden, second.hidden], 1),
                     second.state, second.schedule, first.seconds + second.seconds, kept + second.segment_states)


def _worse(a: Comparison, b: Comparison) -> bool:
    """Is `a` the worse of two comparisons (a miss first, then the larger error relative to its bound)?"""
    ra = a.rel / max(a.bound.rel, 1e-30)
    rb = b.rel / max(b.bound.rel, 1e-30)
    return (not a.ok, ra, a.q_rel) > (not b.ok, rb, b.q_rel)


def judge(c: Comparison, noise: Comparison | None) -> Comparison:
    """`c` against the table bound widened by the reference's own spread (exporter.bounds.widen);
    the table marks widened rows with '*' instead of a note."""
    return widen(c, noise, describe=False)


def compare_runs(got: RunResult, ref: RunResult, case: Case, T: int, precision: str,
                 probe: RunResult | None = None,
                 bounds: dict | None = None) -> dict[str, tuple[Comparison, int, Comparison | None]]:
    """Per tensor kind: the worst segment's comparison, that segment's index and the reference's own
    spread there (`probe`: the reference run with fused attention). Logits and hidden are compared at
    the real (unpadded) tokens of each segment; the state (ARMT: A, z, written; RMT: memory, written)
    as it is right after the segment."""
    B, N = case.ids.shape
    valid = np.ones((B, N), dtype=bool) if case.mask is None else case.mask.astype(bool)
    if len(got.segment_states) != len(ref.segment_states):
        raise ExportError(f"backend ran {len(got.segment_states)} segments, the reference "
                          f"{len(ref.segment_states)}")
    worst: dict[str, tuple[Comparison, int, Comparison | None]] = {}
    state_names = tuple(type(ref.state).INPUTS)  # the bounds table's kind of each is its name

    def keep(kind: str, pick, s: int) -> None:
        got_t, ref_t = pick(got), pick(ref)
        noise = compare(kind, kind, precision, pick(probe), ref_t) if probe is not None else None
        c = judge(compare(kind, kind, precision, got_t, ref_t, bounds=bounds), noise)
        if kind not in worst or _worse(c, worst[kind][0]):
            worst[kind] = (c, s, noise)

    for s in range(len(ref.segment_states)):
        span = slice(s * T, min((s + 1) * T, N))
        v = valid[:, span]  # (B, w): real tokens of this segment
        keep("logits", lambda r: r.logits[:, span][v], s)
        keep("hidden", lambda r: r.hidden[:, span][v], s)
        for kind in state_names:
            keep(kind, lambda r: getattr(r.segment_states[s], kind), s)
    if not ref.segment_states:  # no tokens at all: the state must come back unchanged
        for kind in state_names:
            keep(kind, lambda r: getattr(r.state, kind), 0)
    return worst


def verify(model, export_dir, backends: list[str], schedules: list[str], cases: list[Case],
           device: str = "cpu", manifest=None, bounds: dict | None = None) -> Report:
    """Run every backend x schedule x case against the reference and fill a report.

    `bounds`: {kind: Bound} replacing the table's (exporter.bounds.given_bounds: `verify --rtol/--atol/--bound`).
    `model`: the torch model (fp32, or already at the export precision); the reference is that model
    cast to the export's precision (the bounds table's reference), run by its own sequential loop."""
    from exporter.manifest import load_manifest
    from graphs.dtypes import compute_dtype, torch_dtype
    manifest = manifest or load_manifest(export_dir, verify_checksums="full")
    prec = manifest.precision
    report = Report(str(export_dir), prec)
    dtype = torch_dtype(compute_dtype(prec))
    reference = model if model.dtype == dtype else copy.deepcopy(model).cast(dtype)
    refs = [reference_run(reference, case) for case in cases]
    probes = [reference_run(reference, case, fused=True) for case in cases]
    del reference
    T = model.cfg.armt.segment_size
    for case, ref in zip(cases, refs):
        for bad in find_nonfinite(ref, T):
            log.warning("%s", bad.line(f"torch reference, case {case.name}"))
    with Progress(len(backends) * len(schedules) * len(cases), "verify runs") as bar:
        for backend in backends:
            for schedule in schedules:
                role = role_for(model.cfg, schedule)  # an RMT refuses diagonal (InputError, exit 2)
                try:
                    dev = "cuda" if backend == "trt" else device  # TensorRT engines run on a GPU only
                    runner = make_runner(backend, manifest, role, device=dev)
                    runner.activate()
                except BackendUnavailable as exc:
                    report.rows.append(Row(backend, schedule, "*", "*", status="not run", note=str(exc)))
                    log.warning("%s %s not run: %s", backend, schedule, exc)
                    bar.update(len(cases))
                    continue
                try:
                    for case, ref, probe in zip(cases, refs, probes):
                        bar.describe(f"{backend} {schedule} {case.name}")
                        got = backend_run(runner, case)
                        for bad in find_nonfinite(got, T):  # the comparisons fail on them too (NaN never passes)
                            log.warning("%s", bad.line(f"{backend} {schedule}, case {case.name}"))
                        for kind, (c, seg, noise) in compare_runs(got, ref, case, T, prec, probe, bounds).items():
                            report.rows.append(Row(backend, schedule, case.name, kind, c, seg,
                                                   "ok" if c.ok else "FAIL", noise=noise))
                        bar.update()
                finally:
                    runner.deactivate()
    return report
