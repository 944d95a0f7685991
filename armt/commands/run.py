"""`armt run`, `armt verify`, `armt schedule` (see docs/runtimes.md)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("armt.run")

BACKENDS = ("torch", "ort", "trt")
PRECISIONS = ("fp32", "fp16", "bf16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a model on token ids (torch, ONNX Runtime or TensorRT)",
                       description="Run an ARMT (sequential or diagonal schedule) or an RMT (sequential schedule) "
                       "over token ids. PATH is a model directory for --backend torch and an export directory "
                       "for ort/trt.")
    p.add_argument("path", help="model directory (torch) or export directory (ort, trt)")
    p.add_argument("--input-ids", required=True, help="int .npy of shape (B, N)")
    p.add_argument("--output", help="write the float32 logits .npy here: (B, N, vocab) with --logits all, "
                   "(B, vocab) with --logits last (without --output no logits are computed)")
    p.add_argument("--logits", choices=["all", "last", "none"], default="all",
                   help="which logits: all (B, N, vocab; default), last (B, vocab: each row's last real "
                   "position of this call), none (no logits file; refuses --output)")
    p.add_argument("--hidden-out", "--hidden-output", dest="hidden_output",
                   help="write float32 final-norm hidden states (B, N, d) .npy here")
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="execution backend (default torch)")
    p.add_argument("--schedule", choices=["sequential", "diagonal"],
                   help="default: diagonal for an ARMT, sequential for an RMT (which has no diagonal schedule)")
    p.add_argument("--attention-mask", help="(B, N) .npy of 0/1, right-padded (ones, then zeros)")
    p.add_argument("--state-in", help="memory state .npz to start from (default: empty memory)")
    p.add_argument("--state-out", help="write the final memory state .npz here (with the rows' unfinished "
                   "segments: a run continued from it equals one uncut run)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cpu (torch, ort), cuda (trt)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="torch: compute precision (default fp32); ort/trt: must match the export")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="capture each call shape as a CUDA graph and replay it (ort: enable_cuda_graph + "
                   "gpu_graph_id; trt: stream capture; torch: the fast executor's graphs). Default: on with "
                   "--device cuda for torch/trt and for ort on fp16/bf16 exports with fused Attention; off for "
                   "ort on other exports (their graphs returned NaN on a 32-segment run on the H200, see "
                   "docs/runtimes.md) (falls back to plain runs, with one warning, where capture is refused), "
                   "off on the CPU; --cuda-graph on the CPU is refused")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also: armt -q)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout (shapes, schedule, "
                   "graph calls, seconds, outputs written, non-finite findings) instead of the log line")
    p.add_argument("--no-verify-checksums", action="store_true",
                   help="export dir: check sizes and the manifest against its graphs only, no sha256 (for hosts "
                        "that verify the files elsewhere; default: sha256 of every file not hashed before with "
                        "the same size, mtime and inode)")
    p.add_argument("--strict", action="store_true",
                   help="NaN/Inf in the logits, hidden states or memory state: exit 1 and write nothing "
                   "(default: a warning naming the tensor and segment; the outputs are written)")
    p.set_defaults(func=cmd_run)

    v = sub.add_parser("verify", help="check an export's backends against the PyTorch reference",
                       description="Check the export's checksums, then run the PyTorch sequential reference and "
                       "each backend (both schedules) on the same inputs and compare every segment's logits, "
                       "hidden states and memory state (A, z, written) against the precision's bounds. "
                       "Exit 0: all within bounds; 1: a miss; 2: bad input; 3: nothing missed but a requested "
                       "backend could not run here (not counted as passed).")
    v.add_argument("export_dir", help="export directory (armt export)")
    v.add_argument("--model", help="model directory of the torch reference (default: the export's own weights)")
    v.add_argument("--backend", default="ort", help="comma-separated: ort, trt (default ort)")
    v.add_argument("--schedule", help="comma-separated (default: every schedule of the model: ARMT sequential,"
                   "diagonal; RMT sequential)")
    v.add_argument("--precision", choices=PRECISIONS, help="expected precision of the export (checked)")
    v.add_argument("--no-verify-checksums", action="store_true",
                   help="check sizes and the manifest against its graphs only, no sha256 (default: the sha256 "
                        "of every file, read in full)")
    v.add_argument("--input-ids", help="int .npy (B, N) to compare on (default: generated cases)")
    v.add_argument("--attention-mask", help="(B, N) 0/1 .npy for --input-ids")
    v.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="device of the reference and of ort (trt always runs on cuda)")
    v.add_argument("--per-graph", action="store_true",
                   help="also compare each graph across backends with Polygraphy's comparator on the "
                   "export's sample feeds, against the torch outputs recorded for them at export")
    v.add_argument("--graphs-only", action="store_true",
                   help="with --per-graph: only that check (needs no torch: for deployment hosts)")
    v.add_argument("--rtol", type=float, help="replace the bounds table: max rel error and q99.9 rel error "
                   "(both relative to max |reference|) of every float tensor kind")
    v.add_argument("--atol", type=float, help="absolute slack on every float tensor kind: a tensor passes when "
                   "its error <= ATOL + bound x max |reference|")
    v.add_argument("--bound", action="append", default=[], metavar="KIND=REL[/Q]",
                   help="one tensor kind's bound (logits, hidden, hidden_out, A, z, memory), e.g. A=3e-5 or "
                   "logits=1e-4/5e-5; repeatable; applied after --rtol; shown as '(set)' in the table")
    v.add_argument("--json", action="store_true", help="print the report as JSON on stdout instead of tables "
                   "(every row: backend, schedule, case, tensor, errors, bound, status; exit code as usual)")
    v.set_defaults(func=cmd_verify)

    s = sub.add_parser("schedule", help="draw the sequential or diagonal schedule as an ASCII grid")
    s.add_argument("--layers", type=int, required=True, help="L: decoder layers")
    s.add_argument("--segments", type=int, required=True, help="S: segments")
    s.add_argument("--schedule", default="diagonal", choices=["sequential", "diagonal"],
                   help="which schedule to draw (default diagonal)")
    s.add_argument("--max-steps", type=int, default=40, help="draw at most this many steps")
    s.set_defaults(func=cmd_schedule)


# ------------------------------------------------------------------------------------------ run
def _split(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    from graphs.errors import InputError
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise InputError(f"{what} must be a comma-separated list of {', '.join(allowed)}, got {text!r}")
    return list(dict.fromkeys(items))


def _check_path_kind(path: str, backend: str) -> None:
    """A clear message when a model directory and an export directory are mixed up."""
    from graphs.errors import InputError
    p = Path(path)
    if backend == "torch" and (p / "manifest.json").is_file():
        raise InputError(f"{p} is an export directory; --backend torch runs a model directory "
                         "(use --backend ort or trt for exports)")
    if backend != "torch" and p.is_dir() and not (p / "manifest.json").is_file() and (p / "armt_config.json").is_file():
        raise InputError(f"{p} is a model directory; --backend {backend} runs an export directory "
                         "(make one with `armt export`)")


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from graphs.arrays import npy_bytes
    from graphs.atomic import write_files_together
    from graphs.contracts import default_schedule, role_for
    from graphs.errors import NonFiniteError
    from graphs.paths import OutputPath, check_paths
    from graphs.state import state_bytes
    from runtimes.finite import find_nonfinite, locate_state
    from runtimes.inputs import load_ids, load_mask, load_state_for

    from graphs.errors import InputError
    from runtimes.execute import collect_for
    if args.logits == "none" and args.output:
        raise InputError("--logits none writes no logits file: drop --output (or choose --logits all|last)")
    outputs = [OutputPath("--output", args.output), OutputPath("--hidden-out", args.hidden_output),
               OutputPath("--state-out", args.state_out)]
    check_paths({"PATH": args.path, "--input-ids": args.input_ids, "--attention-mask": args.attention_mask,
                 "--state-in": args.state_in}, outputs)  # before reading or computing anything
    _check_path_kind(args.path, args.backend)
    ids = load_ids(args.input_ids)
    mask = load_mask(args.attention_mask, ids) if args.attention_mask else None
    device = args.device or ("cuda" if args.backend == "trt" else "cpu")
    from runtimes.cuda_graphs import resolve_cuda_graph
    # --cuda-graph on the CPU: one line, exit 2; ort: None left to the runner (on for fused exports only)
    cuda_graph = resolve_cuda_graph(args.cuda_graph, device)
    if args.backend == "ort" and args.cuda_graph is None:
        cuda_graph = None
    collect = collect_for(args.logits if args.output else "none", hidden=bool(args.hidden_output))
    if args.backend == "torch":
        from graphs.modeldir import load_model_dir
        from runtimes.torch_runner import TorchRunner, run_torch
        model = load_model_dir(args.path)
        cfg = model.cfg
        schedule = args.schedule or default_schedule(cfg)
        role = role_for(cfg, schedule)  # an RMT refuses the diagonal schedule (one line, exit 2)
        model_id, name = model.known_model_id, f"torch@{device}"  # the id is needed only for state files
        state = load_state_for(args.state_in, model_id()) if args.state_in else None
        result = run_torch(model, ids, mask, state=state, schedule=schedule, device=device,
                           precision=args.precision or "fp32", collect=collect, progress=not args.no_progress,
                           cuda_graph=cuda_graph)
        locator = lambda: TorchRunner(model, role, device=device, precision=args.precision or "fp32")  # noqa: E731
    else:
        from runtimes.base import make_runner
        from runtimes.execute import run_schedule
        from runtimes.loaders import open_export
        manifest = open_export(args.path, args.precision,
                               verify_checksums="sizes" if args.no_verify_checksums else "cached")
        cfg = manifest.model_config()
        schedule = args.schedule or default_schedule(cfg)
        runner = make_runner(args.backend, manifest, role_for(cfg, schedule), device=device, cuda_graph=cuda_graph)
        model_id, name = (lambda: runner.model_id), runner.name
        state = load_state_for(args.state_in, model_id()) if args.state_in else None
        with runner:
            result = run_schedule(runner, ids, mask, state=state, collect=collect, progress=not args.no_progress)
        locator = lambda: runner  # noqa: E731
    bad = find_nonfinite(result, cfg.armt.segment_size)
    if bad:
        with locator() as again:  # name the segment where the state first went non-finite (a second run)
            bad = locate_state(again, ids, mask, state, bad)
        for f in bad:
            log.warning("%s", f.line(name))
        if args.strict:
            raise NonFiniteError(f"{bad[0].line(name)}; --strict: nothing written")
    files = {}
    if args.output:
        logits = result.logits if args.logits == "all" else result.last_logits
        files[args.output] = npy_bytes(logits.astype(np.float32))
    if args.hidden_output:
        files[args.hidden_output] = npy_bytes(result.hidden.astype(np.float32))
    if args.state_out:
        files[args.state_out] = state_bytes(result.state, model_id())
    write_files_together(files)  # all of them or none
    B, N = ids.shape
    if args.json:
        import json
        print(json.dumps({"backend": name, "schedule": schedule, "kind": cfg.kind, "batch": B, "tokens": N,
                          "segments": -(-N // cfg.armt.segment_size), "graph_calls": len(result.schedule.steps),
                          "seconds": result.seconds, "written": sorted(files),
                          "nonfinite": [f.line(name) for f in bad]}, indent=2))
        return 0
    log.info("%s: %dx%d tokens, %s schedule, %d graph calls in %.3f s%s", name, B, N, schedule,
             len(result.schedule.steps), result.seconds,
             f"; {args.logits} logits -> {args.output}" if args.output else "")
    return 0


# ------------------------------------------------------------------------------------------ verify
def cmd_verify(args: argparse.Namespace) -> int:
    from exporter.manifest import load_manifest
    from graphs.errors import InputError, ParityFailure
    from runtimes.inputs import load_ids, load_mask
    from runtimes.verify import Report

    from graphs.contracts import role_for, schedules_of
    backends = _split(args.backend, ("ort", "trt"), "--backend")
    # an altered file stops here (exit 2): every sha256 computed, none taken from the cache
    manifest = load_manifest(args.export_dir, verify_checksums="sizes" if args.no_verify_checksums else "full")
    cfg = manifest.model_config()
    schedules = (_split(args.schedule, ("sequential", "diagonal"), "--schedule") if args.schedule
                 else list(schedules_of(cfg)))
    for schedule in schedules:
        role_for(cfg, schedule)  # an RMT refuses the diagonal schedule (one line, exit 2)
    if args.precision and args.precision != manifest.precision:
        raise InputError(f"export {args.export_dir} holds {manifest.precision} graphs, not {args.precision}")
    if args.graphs_only and not args.per_graph:
        raise InputError("--graphs-only needs --per-graph")
    if args.attention_mask and not args.input_ids:
        raise InputError("--attention-mask needs --input-ids")
    bounds = _given_bounds(args, manifest.precision)
    report = Report(str(args.export_dir), manifest.precision)
    if not args.graphs_only:
        from runtimes.verify import generated_cases, given_case, reference_model, verify
        model = reference_model(manifest, args.model, args.device)
        if args.input_ids:
            ids = load_ids(args.input_ids)
            cases = [given_case(ids, load_mask(args.attention_mask, ids) if args.attention_mask else None)]
        else:
            cases = generated_cases(manifest.model_config())
        report = verify(model, args.export_dir, backends, schedules, cases, device=args.device, manifest=manifest,
                        bounds=bounds)
        if not args.json:
            print(report.table())
    if args.per_graph:
        from runtimes.per_graph import compare_graphs
        graph_report = compare_graphs(manifest, backends, device=args.device, bounds=bounds)
        if not args.json:
            print()
            print(graph_report.table())
        report.rows.extend(graph_report.rows)
    if args.json:
        import json
        print(json.dumps(report.to_dict(), indent=2))
        if report.failed:
            print(f"armt verify: {report.summary()}", file=sys.stderr)
        return report.exit_code
    print(report.summary())
    if report.failed:
        raise ParityFailure(report.summary())
    if report.not_run:
        print(f"armt verify: exit {report.exit_code}: a requested backend did not run here; "
              "it is not counted as passed", file=sys.stderr)
    return report.exit_code


def _given_bounds(args: argparse.Namespace, precision: str) -> dict:
    """--rtol/--atol/--bound as {kind: Bound} (exporter.bounds.given_bounds); bad values: exit 2."""
    import math

    from exporter.bounds import given_bounds, parse_bound
    from graphs.errors import InputError
    for flag, value in (("--rtol", args.rtol), ("--atol", args.atol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InputError(f"{flag} must be a finite number >= 0, got {value}")
    per_kind = {}
    for text in args.bound:
        try:
            kind, values = parse_bound(text)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        per_kind[kind] = values
    return given_bounds(precision, args.rtol, args.atol, per_kind)


# ------------------------------------------------------------------------------------------ schedule
def cmd_schedule(args: argparse.Namespace) -> int:
    from graphs.contracts import ROLE_OF_SCHEDULE
    from graphs.schedule import build_schedule, render
    print(render(build_schedule(args.schedule, args.layers, args.segments), max_steps=max(args.max_steps, 1),
                 graph=ROLE_OF_SCHEDULE[args.schedule]))
    return 0
