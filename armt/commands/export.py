"""`armt export`, `armt build`, `armt inspect` (see docs/exporter.md)."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from graphs.contracts import ROLES

log = logging.getLogger("armt.export")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export an ARMT to ONNX graphs with a manifest (and validate them)",
                       description="Export the segment and diagonal-step graphs of an ARMT model directory "
                       "(or a synthetic random-weight model) to ONNX, with shared external weights, sample feeds, "
                       "a Polygraphy data loader and manifest.json; validate on ONNX Runtime CPU. The generation "
                       "graphs (decode, memory_write; RMT: rmt_decode, rmt_memory_write) too unless --no-decode.")
    p.add_argument("model_dir", nargs="?", help="model directory (config.json, armt_config.json, model.safetensors)")
    p.add_argument("-o", "--output", required=True, help="export directory to write")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="compute dtype of layers, embeddings and head (memory state stays fp32)")
    p.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip the ONNX Runtime vs torch check")
    p.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                   help="export the generation graphs that `armt generate --backend ort` needs (default; two "
                   "more traces, about twice the export time; the weights are shared); --no-decode: without them")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: fp32 18, 17..22; fp16/bf16 23, 17..23: 23 fuses attention into ONNX Attention nodes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export directory (never MODEL_DIR, "
                   "a directory inside it or one holding it)")
    p.add_argument("--no-trace-cache", dest="trace_cache", action="store_false", default=None,
                   help="trace every graph afresh and store nothing in the trace cache ($ARMT_CACHE/traces; "
                   "a second export of a same-shaped model reuses its traced graphs, exact to the byte)")
    p.add_argument("--jobs", metavar="N", default=None,
                   help="processes that trace the graphs at once (default: $ARMT_TRACE_JOBS if set, else "
                   "min(usable CPUs, graphs not in the trace cache, 4); 1: one process; models over 512 MiB of "
                   "parameters always trace in one); the files are the same byte for byte")
    p.add_argument("--synthetic", metavar="PRESET",
                   help="export a random-weight model of a preset shape instead (tiny, tiny-gpt2, llama-1b, ...)")
    p.add_argument("--seed", type=int, default=0, help="weights seed for --synthetic")
    p.add_argument("--sample-width", type=int, default=None,
                   help="segment width of the sample/validation runs (default min(segment size, 32))")
    p.set_defaults(func=cmd_export)

    b = sub.add_parser("build", help="build a TensorRT engine per exported graph",
                       description="Build TensorRT engines (tensorrt, else tensorrt_rtx: ahead of time, no GPU "
                       "needed) for each graph of an export directory and record them in manifest.json.")
    b.add_argument("export_dir", help="export directory (armt export)")
    b.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                   help="must match the export's precision (engines are strongly typed)")
    b.add_argument("--compute-capability", default="",
                   help="TensorRT-RTX target GPUs, comma-separated (e.g. 8.9,12.0; default: the builder's)")
    b.add_argument("--workspace", type=_size, default=None, help="workspace limit, bytes or with G/M suffix")
    b.add_argument("--max-batch", type=int, default=8, help="largest batch the engines accept (default 8)")
    b.add_argument("--opt-batch", type=int, default=1, help="batch the builder tunes for (default 1)")
    b.add_argument("--max-width", type=int, default=None, help="largest segment width (default: segment size)")
    b.add_argument("--opt-width", type=int, default=None, help="width the builder tunes for (default: max width)")
    b.add_argument("--max-capacity", type=int, default=None,
                   help="decode graphs: largest KV cache (places; default max width + 2 x mem tokens + 256)")
    b.add_argument("--builder", default="auto", choices=["auto", "tensorrt", "tensorrt_rtx"],
                   help="which TensorRT package builds (default auto: tensorrt, else tensorrt_rtx)")
    b.add_argument("--graph", action="append", choices=list(ROLES),
                   help="build only this graph (repeatable; default all)")
    b.set_defaults(func=cmd_build)

    i = sub.add_parser("inspect", help="show an export directory's graphs, tensors, sizes and engines")
    i.add_argument("export_dir", help="export directory (armt export)")
    i.add_argument("--verify", action="store_true", help="also check every file's sha256 and list every manifest "
                   "field that disagrees with what the graphs record (exit 2 when any)")
    i.add_argument("--json", action="store_true", help="print the description (and with --verify the problems "
                   "found) as JSON on stdout; exit codes as without it")
    i.set_defaults(func=cmd_inspect)


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().rstrip("B")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _peak_rss_gb() -> float | None:
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: kilobytes


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from graphs.dtypes import compute_dtype, torch_dtype
    from graphs.errors import InputError
    from graphs.paths import OutputPath, check_paths
    from runtimes.validation import export_model

    if bool(args.model_dir) == bool(args.synthetic):
        raise InputError("give either MODEL_DIR or --synthetic PRESET")
    check_paths({"MODEL_DIR": args.model_dir},  # before loading or tracing anything
                [OutputPath("-o", args.output, directory=True, overwrite=args.overwrite)])
    if args.sample_width is not None and args.sample_width < 2:
        raise InputError("--sample-width must be at least 2")
    from exporter.parallel_trace import requested_jobs
    jobs = requested_jobs(args.jobs)  # one line, exit 2, before anything is loaded
    t0 = time.perf_counter()
    if args.synthetic:
        from exporter.synthetic_model import synthetic_model
        model = synthetic_model(args.synthetic, torch_dtype(compute_dtype(args.precision)), seed=args.seed)
        source = f"synthetic:{args.synthetic} seed {args.seed}"
    else:
        from graphs.modeldir import load_model_dir
        model = load_model_dir(args.model_dir)
        source = str(args.model_dir)
    log.info("loaded %s in %.1f s", source, time.perf_counter() - t0)
    with torch.no_grad():
        result = export_model(model, args.output, precision=args.precision, opset=args.opset,
                              validate=args.validate, overwrite=args.overwrite, sample_width=args.sample_width,
                              source=source, report=lambda text: print(text + "\n"), free_model=True,
                              tokenizer_dir=args.model_dir, decode=args.decode, trace_cache=args.trace_cache,
                              jobs=jobs)
    m = result.manifest
    status = m.validation.get("status")
    print(f"exported {source} -> {result.export_dir} ({m.precision}, opset {m.opset}): "
          f"{sum(f.bytes for f in m.files.values()) / 1e6:.1f} MB in {len(m.files) + 1} files, "
          f"{result.seconds:.1f} s{_rss_text()}; validation {status}"
          + (f" ({m.validation.get('reason') or _reasons(m)})" if status == "not run" else ""))
    return 0


def _rss_text() -> str:
    rss = _peak_rss_gb()
    return "" if rss is None else f", peak RSS {rss:.2f} GB"


def _reasons(m) -> str:
    return "; ".join(f"{r}: {g.get('reason')}" for r, g in m.validation.get("graphs", {}).items() if g.get("reason"))


def cmd_build(args: argparse.Namespace) -> int:
    from exporter.engines import ShapeLimits, build_engines

    ccs = tuple(c.strip() for c in args.compute_capability.split(",") if c.strip())
    limits = ShapeLimits(max_batch=args.max_batch, opt_batch=args.opt_batch, max_width=args.max_width,
                         opt_width=args.opt_width, max_capacity=args.max_capacity)
    t0 = time.perf_counter()
    manifest = build_engines(args.export_dir, precision=args.precision, compute_capability=ccs,
                             workspace=args.workspace, limits=limits, prefer=args.builder,
                             roles=tuple(args.graph) if args.graph else None)
    for role, g in manifest.graphs.items():
        for e in g.engines:
            print(f"{role}: {e.file} ({manifest.files[e.file].bytes / 1e6:.1f} MB, {e.builder} {e.builder_version})")
    print(f"built in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from exporter.inspect_export import inspect_data, inspect_export
    from graphs.errors import ExportError

    if args.json:
        import json
        data = inspect_data(args.export_dir, verify_checksums=args.verify)
        print(json.dumps(data, indent=2))
        found = data["problems"] or []
        if found:
            print(f"armt inspect: error: {found[0]['problem']}"
                  + (f" (and {len(found) - 1} more)" if len(found) > 1 else ""), file=sys.stderr)
            return ExportError.exit_code
        return 0
    text, problems = inspect_export(args.export_dir, verify_checksums=args.verify)
    print(text)
    if problems:
        raise ExportError(problems[0] + (f" (and {len(problems) - 1} more above)" if len(problems) > 1 else ""))
    return 0
