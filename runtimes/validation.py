"""Export-then-validate (Optimum's pattern): the export's finalize step, run on the staged graphs.

    export_model(model, dir)  =  exporter.export.export_model(model, dir, finalize=...)
      finalize: the sample batch (exporter/samples.py) through the one schedule loop
                (runtimes/execute.py) on every graph, side by side on
                    ref   the torch cell at the export precision           (TorchRunner)
                    twin  the same with PyTorch's fused attention          (its rounding spread)
                    got   the staged graph on ONNX Runtime CPU             (OrtRunner)
                each feeding back its own outputs, so errors that build up in the memory over
                segments are measured; one call's tensors are held at a time;
                every output of every call compared over the entries that carry meaning
                (contract.output_mask) under exporter.bounds, the bound widened where ref and
                twin themselves differ; the worst call per output is reported;
                one call per graph stored in sample_feeds.npz with the reference's outputs;
                a causal variant (segment_causal, ...) the same way on a batch of full slots
                (exporter/samples.py full_batch), every call checked to be full (slots_full).
      decode graphs (generation: decode, memory_write, rmt_decode): the torch cell and the staged
                graph on DECODE_SHAPES (batch, new places, cache capacity) of random caches and a
                random written memory state (exporter/trace.py decode_example_feeds), every output
                compared over the entries that carry meaning; the first call stored as the sample.
                Generation end to end on ONNX Runtime is tested in tests/test_generate_ort.py.

Without validation (`validate=False`) the same loop runs the torch cell alone for the samples.
A graph ONNX Runtime CPU has no kernels for (bf16) is reported "not run", never "passed".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from exporter.bounds import Comparison, compare, format_table, widen
from exporter.export import Draft, ExportResult, export_model as export_graphs
from exporter.manifest import SAMPLE_FEEDS
from exporter.samples import full_batch, sample_batch, sample_width, save_samples
from graphs.contracts import CAUSAL, LM_HEAD, causal_roles_of, contract, decode_roles_of, roles_of, slots_full
from graphs.errors import BackendUnavailable, ExportError, ParityFailure
from graphs.model import ArmtModel
from graphs.progress import Progress
from runtimes.execute import iter_steps, plan_run
from runtimes.loaders import NotRunnable, OrtSessionLoader
from runtimes.torch_runner import TorchRunner

log = logging.getLogger("armt.export")

DECODE_SHAPES = ((2, 5, 17), (1, 1, 9), (3, 2, 24))  # (batch, width, capacity) of the decode graphs' checks


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


def _miss(c: Comparison) -> str:
    if c.rel > c.bound.rel:
        return f"rel {c.rel:.2e} > {c.bound.rel:.2g}"
    if c.q_rel > c.bound.q_rel:
        return f"q99.9 {c.q_rel:.2e} > {c.bound.q_rel:.2g}"
    return c.note


class _Sampler:
    """The finalize step: sample feeds (+ validation) on the staged graphs."""

    def __init__(self, validate: bool, width: int | None, report: Callable[[str], None] | None):
        self.validate, self.width, self.report = validate, width, report
        self.results: dict[str, GraphValidation] = {}

    def __call__(self, draft: Draft) -> None:
        model = draft.model
        width = self.width or sample_width(model.cfg)
        ids, mask = sample_batch(model.cfg, width)
        feeds, reference = {}, {}
        roles = [r for r in roles_of(model.cfg) if r != LM_HEAD and r in draft.graphs] + \
            [r for r in causal_roles_of(model.cfg) if r in draft.graphs] + \
            [LM_HEAD] * (LM_HEAD in draft.graphs)  # an export of some roles: those (lm_head last: its feed)
        with Progress(len(roles), "validating graphs" if self.validate else "sample feeds") as bar:
            for role in roles:
                bar.describe(role)
                self._one_graph(draft, role, ids, mask, width, feeds, reference)
                bar.update()
        for role in decode_roles_of(model.cfg):
            if role not in draft.graphs:
                continue
            result, feeds[role], reference[role] = self._decode(draft, contract(model.cfg, role, draft.precision))
            if result is not None:
                self.results[role] = result
                if self.report:
                    self.report(result.table())
        save_samples(draft.stage / SAMPLE_FEEDS, feeds, reference)
        draft.samples = SAMPLE_FEEDS
        draft.validation = self._summary()
        if self.results:
            import onnxruntime
            draft.versions["onnxruntime"] = onnxruntime.__version__
        failed = [f"{r.role}.{c.name}: {_miss(c)}" for r in self.results.values() for c in r.rows if not c.ok]
        if failed:
            raise ParityFailure(f"export validation failed ({'; '.join(failed)}); nothing was written")

    def _one_graph(self, draft: Draft, role: str, ids, mask, width: int, feeds: dict, reference: dict) -> None:
        """Validate (or only sample) one graph role; its sample feed and torch outputs go into feeds/reference."""
        model = draft.model
        c = contract(model.cfg, role, draft.precision)
        if c.schedule is None:  # lm_head: one call on the hidden rows a step graph produced
            self._head(draft, c, model, feeds, reference)
            return
        if c.variant == CAUSAL:  # a causal variant is run on full slots only: validated on them
            ids, mask = full_batch(model.cfg, width)
        ref = TorchRunner(model, role, precision=draft.precision).activate()
        plan = plan_run(ref, ids, mask, segment_size=width)
        # the sample call: the last layer works on segment 1 (its memory holds segment 0, so the
        # logits depend on memory), every layer's state is non-zero, early layers idle (ramp-down)
        sample = min(model.cfg.base.n_layers, len(plan.schedule.steps) - 1) if c.schedule == "diagonal" else 1
        if self.validate:
            log.info("validating %s on ONNX Runtime CPU against the torch cell (%d calls) ...", role,
                     len(plan.schedule.steps))
            result, call = self._validate(draft, c, ref, model, plan, sample)
            self.results[role] = result
            if self.report:
                self.report(result.table())
            feeds[role] = {k: ref.to_numpy(v) if isinstance(v, torch.Tensor) else v for k, v in call.feeds.items()}
            reference[role] = {k: ref.to_numpy(v) for k, v in call.outputs.items()}
        else:
            feeds[role], reference[role] = self._sample_only(model, c, draft.precision, ids, mask, width, sample)
        ref.deactivate()

    def _validate(self, draft: Draft, c, ref: TorchRunner, model: ArmtModel, plan, sample: int):
        from runtimes.ort_runner import OrtRunner
        t0 = time.perf_counter()
        got = OrtRunner(OrtSessionLoader(draft.stage / c.file), contract=c, model_id=draft.model_id)
        twin = TorchRunner(model, c.role, precision=draft.precision, fused=True)
        try:
            got.activate()
        except NotRunnable as exc:
            return GraphValidation(c.role, "not run", reason=str(exc)), self._sample_call(ref, plan, sample)
        worst: dict[str, Comparison] = {}
        call = None
        with twin:
            try:
                for i, (r, t, g) in enumerate(zip(iter_steps(ref, plan), iter_steps(twin, plan), iter_steps(got, plan))):
                    if c.variant == CAUSAL and not slots_full(c.role, r.feeds):
                        raise ExportError(f"validation of {c.role}: call {i} has a slot with padding")
                    for name in c.output_names:
                        mask = c.output_mask(name, r.feeds)
                        kind = c.kind(name)
                        want = ref.to_numpy(r.outputs[name])
                        noise = compare(name, kind, draft.precision, twin.to_numpy(t.outputs[name]), want, mask)
                        cmp = widen(compare(name, kind, draft.precision, got.to_numpy(g.outputs[name]), want, mask), noise)
                        prev = worst.get(name)
                        if prev is None or (prev.ok and not cmp.ok) or (prev.ok == cmp.ok and cmp.rel > prev.rel):
                            worst[name] = cmp
                    if i == sample:
                        call = r  # the torch runner's outputs are fresh tensors: nothing to copy
            except NotRunnable as exc:
                return GraphValidation(c.role, "not run", reason=str(exc)), self._sample_call(ref, plan, sample)
            finally:
                got.deactivate()
        rows = list(worst.values())
        status = "passed" if rows and all(x.ok for x in rows) else "failed"
        return GraphValidation(c.role, status, rows, calls=len(plan.schedule.steps),
                               seconds=time.perf_counter() - t0), call

    def _decode(self, draft: Draft, c):
        """A decode graph: the torch cell on DECODE_SHAPES, and (validating) the staged graph on ONNX
        Runtime CPU against it -> (GraphValidation or None, sample feeds, sample reference)."""
        from exporter.trace import decode_example_feeds
        from graphs.cells import cell_for
        from runtimes.torch_runner import to_torch
        cell = cell_for(draft.model, c.role)
        t0 = time.perf_counter()

        def torch_outputs(feeds):
            args = [to_torch(feeds[s.name], torch.device("cpu")) for s in c.inputs]  # bfloat16 (ml_dtypes) too
            with torch.no_grad():
                out = cell(*args)
            return {s.name: (o.float().numpy().astype(np.float32) if o.dtype == torch.bfloat16 else o.numpy())
                    for s, o in zip(c.outputs, out)}

        calls = [decode_example_feeds(draft.model, c.role, draft.precision, B, W, C, seed=i, memory=True)
                 for i, (B, W, C) in enumerate(DECODE_SHAPES)]
        refs = [torch_outputs(f) for f in calls]
        if not self.validate:
            return None, calls[0], refs[0]
        if draft.precision == "bf16":
            return (GraphValidation(c.role, "not run", reason="ONNX Runtime CPU has no bf16 kernels"), calls[0],
                    refs[0])
        try:
            session = OrtSessionLoader(draft.stage / c.file)()
            worst: dict[str, Comparison] = {}
            for feeds, want in zip(calls, refs):
                got = dict(zip(c.output_names, session.run(list(c.output_names), feeds)))
                for name in c.output_names:
                    cmp = compare(name, c.kind(name), draft.precision, got[name], want[name], c.output_mask(name, feeds))
                    prev = worst.get(name)
                    if prev is None or (prev.ok and not cmp.ok) or (prev.ok == cmp.ok and cmp.rel > prev.rel):
                        worst[name] = cmp
        except NotRunnable as exc:
            return GraphValidation(c.role, "not run", reason=str(exc)), calls[0], refs[0]
        except Exception as exc:  # onnxruntime's own error types
            from runtimes.loaders import raise_if_not_runnable
            try:
                raise_if_not_runnable(exc, f"{c.file} on cpu")
            except NotRunnable as nr:
                return GraphValidation(c.role, "not run", reason=str(nr)), calls[0], refs[0]
            raise
        rows = list(worst.values())
        status = "passed" if rows and all(x.ok for x in rows) else "failed"
        return GraphValidation(c.role, status, rows, calls=len(calls), seconds=time.perf_counter() - t0), calls[0], refs[0]

    def _head(self, draft: Draft, c, model: ArmtModel, feeds: dict, reference: dict) -> None:
        """lm_head: its sample feed is the first step graph's sample `hidden` output (real final-norm
        rows of a run with memory; padding rows are junk but finite), validated as one call."""
        step = next(role for role in feeds if "hidden" in reference[role])
        feed = {"hidden": np.ascontiguousarray(reference[step]["hidden"], dtype=np.float32)}
        with TorchRunner(model, c.role, precision=draft.precision) as ref:
            want = {k: ref.to_numpy(v) for k, v in ref.infer(feed).items()}
        feeds[c.role], reference[c.role] = feed, want
        if not self.validate:
            return
        from runtimes.ort_runner import OrtRunner
        t0 = time.perf_counter()
        got = OrtRunner(OrtSessionLoader(draft.stage / c.file), contract=c, model_id=draft.model_id)
        try:
            with got:
                out = {k: got.to_numpy(v) for k, v in got.infer(feed).items()}
        except NotRunnable as exc:
            result = GraphValidation(c.role, "not run", reason=str(exc))
        else:
            rows = [compare(name, c.kind(name), draft.precision, out[name], want[name]) for name in c.output_names]
            result = GraphValidation(c.role, "passed" if all(x.ok for x in rows) else "failed", rows, calls=1,
                                     seconds=time.perf_counter() - t0)
        self.results[c.role] = result
        if self.report:
            self.report(result.table())

    @staticmethod
    def _sample_only(model: ArmtModel, c, precision: str, ids, mask, width: int, sample: int):
        """The sample call's feeds and the reference outputs for them, without validation: on the GPU
        when there is one. fp16 on a CPU: torch's fp16 matmuls there are ~500x slower than bf16, so the
        run up to the sample call is made in bf16 (same weights, realistic state) and only the sample
        call itself in fp16."""
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
        run_precision = "bf16" if precision == "fp16" and device == "cpu" else precision
        with TorchRunner(model, c.role, device=device, precision=run_precision) as runner:
            plan = plan_run(runner, ids, mask, segment_size=width)
            call = next(x for i, x in enumerate(iter_steps(runner, plan)) if i == sample)
            feeds = {k: runner.to_numpy(v) if isinstance(v, torch.Tensor) else v for k, v in call.feeds.items()}
            outputs = {k: runner.to_numpy(v) for k, v in call.outputs.items()}
        if run_precision != precision:  # the sample call again, at the export precision
            from graphs.dtypes import numpy_dtype
            feeds = {k: np.asarray(v).astype(numpy_dtype(c.input(k).dtype)) for k, v in feeds.items()}
            with TorchRunner(model, c.role, device=device, precision=precision) as runner:
                outputs = {k: runner.to_numpy(v) for k, v in runner.infer(feeds).items()}
        return feeds, outputs

    @staticmethod
    def _sample_call(ref: TorchRunner, plan, sample: int):
        return next(x for i, x in enumerate(iter_steps(ref, plan)) if i == sample)

    def _summary(self) -> dict:
        if not self.validate:
            return {"status": "not run", "reason": "--no-validate", "graphs": {}}
        statuses = {r.status for r in self.results.values()}
        status = "failed" if "failed" in statuses else "not run" if "not run" in statuses else "passed"
        return {"status": status, "backend": "onnxruntime CPU", "reference": "torch cells at the export precision",
                "graphs": {role: r.to_dict() for role, r in self.results.items()}}


def export_model(model: ArmtModel, export_dir: str | Path, precision: str = "fp32", opset: int | None = None,
                 validate: bool = True, overwrite: bool = False, sample_width: int | None = None,
                 source: str = "", report: Callable[[str], None] | None = None,
                 free_model: bool = False, tokenizer_dir: str | Path | None = None,
                 decode: bool = True, only: Sequence[str] | None = None,
                 trace_cache: bool | None = None, jobs: int | None = None) -> ExportResult:
    """Export `model` (fp32 as loaded; cast in place to `precision`), write sample feeds from a real
    run and, unless `validate=False`, validate every graph on ONNX Runtime CPU. `report` receives the
    validation tables. Raises ParityFailure when an output misses its bound (nothing is written then).
    `decode` (default True): with the generation graphs; `only`: just these roles (exporter/export.py);
    `trace_cache`: exporter/trace_cache.py (None: on unless ARMT_TRACE_CACHE=0); `jobs`: tracing processes
    (exporter/parallel_trace.py)."""
    if validate:
        try:
            from runtimes.loaders import import_onnxruntime
            import_onnxruntime()
        except BackendUnavailable as exc:
            raise BackendUnavailable(f"{exc} (or export with --no-validate)") from None
    sampler = _Sampler(validate, sample_width, report)
    result = export_graphs(model, export_dir, precision=precision, opset=opset, overwrite=overwrite, source=source,
                           finalize=sampler, free_model=free_model, tokenizer_dir=tokenizer_dir,
                           decode=decode, only=only, trace_cache=trace_cache, jobs=jobs)
    result.validation = sampler.results
    return result
