"""`armt bench`: full attention vs sequential ARMT vs diagonal ARMT, side by side in one run.

    armt bench --synthetic llama-1b --device cuda --precision bf16 \
        --lengths 4096,16384,131072 --schedules full,sequential,diagonal --backends torch \
        --output results/bench.json --plot results/bench.png

    # issue 10: the export on ONNX Runtime CUDA next to the torch fast executor, same job
    armt bench --synthetic llama-1b --device cuda --precision fp16 --mem-std 0.001 \
        --backends torch,ort --schedules diagonal --lengths 32768,131072 --logits last \
        --export-to /tmp/export-fp16 --steady-step --parity-length 8192 --output issue10_fp16.json

    armt bench --generate --synthetic llama-1b --device cuda --precision bf16 --lengths 1024,131072 \
        --batch-sizes 1,8 --new-tokens 256 --backends torch,ort,hf --export-to /tmp/x --output results/generate.json

`--generate`: generation instead (armt/bench/generate_bench.py): prefill time and decode tokens/s per
backend next to HF transformers' `generate` on the same base model, with the issue's targets.
"""

from __future__ import annotations

import argparse
import logging
import platform
import shlex
import sys
import time

log = logging.getLogger("armt.bench")


def _ints(text: str) -> list[int]:
    from graphs.errors import InputError
    items = [v.strip() for v in text.split(",")]
    if any(not v for v in items):  # `1,,2` or a trailing comma: a typo, not the list 1,2
        raise InputError(f"expected comma-separated integers without empty items, got {text!r}")
    try:
        values = [int(v) for v in items]
    except ValueError:
        raise InputError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise InputError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    from graphs.errors import InputError
    names = [v.strip() for v in text.split(",")]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise InputError(f"{what} must be among {', '.join(allowed)}, got {text!r}")
    return names


def _ort_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def _steady(work, backends: list[str], batch: int, device, calls: int) -> list[dict]:
    """One steady diagonal step alone, per backend that has one (torch fast executor, ort)."""
    from armt.bench.steady import ort_step, time_step, torch_step
    from graphs.errors import ArmtError
    out = []
    for backend in (b for b in backends if b in ("torch", "ort")):
        row = {"backend": backend, "batch": batch, "precision": work.precision}
        try:
            if backend == "torch":
                step = torch_step(work.fast, batch)
            else:
                runner = work.ort_runner("diagonal_step")
                step = ort_step(runner, batch)
            row.update(time_step(step, device, calls=calls))
            if backend == "ort":
                row.update(work.ort_cuda_graph("diagonal"))
        except ArmtError as exc:
            row["error"] = str(exc)
        out.append(row)
        log.info("steady diagonal step, %s: %s", backend, f"{row['step_ms']:.3f} ms" if "step_ms" in row
                 else row["error"])
        if backend == "ort" and "step_ms" in row and work.ort_runner("diagonal_step").has_causal:
            out.append(_steady_masked(work, batch, device, calls))  # the steady step runs causal: masked too
    return out


def _steady_masked(work, batch: int, device, calls: int) -> dict:
    """The steady step on the masked diagonal_step graph alone (backend "ort-masked"): the export holds the
    causal variant, which a full steady step runs, so the masked graph is timed beside it for the ratio."""
    from armt.bench.steady import ort_step, time_step
    from graphs.errors import ArmtError
    from runtimes.ort_runner import OrtRunner
    row = {"backend": "ort-masked", "batch": batch, "precision": work.precision}
    try:
        with OrtRunner(work.export_dir, "diagonal_step", device=str(work.device), cuda_graph=work.cuda_graph,
                       causal=False) as runner:
            row.update(time_step(ort_step(runner, batch), device, calls=calls),
                       graph_variants=dict(runner.variant_calls))
    except ArmtError as exc:
        row["error"] = str(exc)
    log.info("steady diagonal step, ort-masked: %s", f"{row['step_ms']:.3f} ms" if "step_ms" in row else row["error"])
    return row


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time full attention, sequential and diagonal ARMT (or sequential RMT) side by side",
                       description="Time the base model's full attention, the sequential ARMT schedule and "
                       "the diagonal ARMT schedule (an RMT: full attention and the sequential schedule) on the "
                       "same inputs; record medians, tokens/s and peak device memory.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("model", nargs="?", help="model directory (config.json, armt_config.json, model.safetensors)")
    src.add_argument("--synthetic", choices=["tiny", "llama-1b", "llama-3b", "llama-8b"],
                     help="random weights in the shape of this base model")
    p.add_argument("--kind", choices=["armt", "rmt"], default="armt",
                   help="synthetic: the memory wrapper (default armt; a model directory says its own kind)")
    p.add_argument("--segment-size", type=int, default=1024, help="synthetic: segment size (1024)")
    p.add_argument("--memory-tokens", type=int, default=128, help="synthetic: memory tokens M (128)")
    p.add_argument("--d-mem", type=int, default=64, help="synthetic: memory key width d_mem (64)")
    p.add_argument("--layers", type=int, help="synthetic: override the number of layers")
    p.add_argument("--init-std", type=float, default=0.02, help="synthetic: std of the random weights (0.02)")
    p.add_argument("--mem-std", type=float, help="synthetic: std of the memory weights (default: --init-std); "
                   "smaller keeps the random memory well conditioned")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights and the random token ids (0)")
    p.add_argument("--lengths", default="4096,16384", help="comma-separated token counts")
    p.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes")
    p.add_argument("--precision", default="bf16", choices=["fp32", "fp16", "bf16"],
                   help="compute precision of the timed runs (default bf16)")
    p.add_argument("--backends", default=None, help="comma-separated: torch (fast executor), torch-ref "
                   "(graphs.model reference), ort (ONNX Runtime, needs --export-dir); with --generate also hf "
                   "(transformers' generate on the base model). Default: torch (with --generate: torch,hf)")
    p.add_argument("--generate", action="store_true", help="time generation instead: prefill and decode tokens/s "
                   "per backend (--lengths are prompt lengths), next to HF transformers' generate")
    p.add_argument("--new-tokens", type=int, default=256, help="--generate: tokens generated per row (256)")
    p.add_argument("--max-hf", type=int, help="--generate: skip the hf backend above this prompt length")
    p.add_argument("--schedules", help="comma-separated: full, sequential, diagonal (default all of the model's: "
                   "an RMT has no diagonal schedule)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--export-dir", help="export directory for the ort backend (`armt export` of the same model)")
    p.add_argument("--export-to", help="ort backend without --export-dir: export the bench's model here first")
    p.add_argument("--lm-head", action="store_true", help="the same as --logits all")
    p.add_argument("--logits", choices=["none", "last", "all"], help="the LM head in the timed job, the same "
                   "for every backend: none (hidden states only; the default), last (each row's last position: "
                   "torch's head on that row, the export's lm_head graph for ort), all (every position; torch "
                   "backends only)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="ort: CUDA graphs in ONNX Runtime (default: on with --device cuda for exports "
                   "whose graphs hold fused Attention (fp16/bf16), off for the others, whose graphs returned NaN "
                   "on a 32-segment fp16 run on the H200, docs/runtimes.md; falls back with one warning where "
                   "capture is refused; ARMT_CHECK_CUDA_GRAPHS=1 checks replays against plain runs)")
    p.add_argument("--steady-step", action="store_true", help="also time one steady diagonal step alone "
                   "(every layer active, full slots) for the torch fast executor and ort")
    p.add_argument("--step-calls", type=int, default=20, help="steps per timed block of --steady-step (20)")
    p.add_argument("--max-full", type=int, help="skip full attention above this many tokens")
    p.add_argument("--max-sequential", type=int, help="skip the sequential schedule above this many tokens")
    p.add_argument("--max-ref", type=int, default=131072, help="skip the torch-ref backend above this many tokens")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (1)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (3)")
    p.add_argument("--parity-length", type=int, default=0, help="also compare every backend's schedules with "
                   "the fp32 reference at this many tokens (0: off)")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--plot", help="write a PNG of time and memory against length here (needs matplotlib, "
                   "checked before the bench starts)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a run's outputs or memory state hold "
                   "NaN/Inf (default: a warning, and the row's notes say which tensor)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.generate:
        return cmd_bench_generate(args)
    import torch

    from graphs.atomic import write_files_together
    from graphs.errors import ArmtError, InputError, NonFiniteError
    from armt.bench import report
    from armt.bench.parity import run_parity
    from armt.bench import targets as target_eval
    from armt.bench.timing import measure
    from armt.bench.workloads import BACKENDS, SCHEDULES, Workloads

    from pathlib import Path

    from graphs.paths import OutputPath, check_paths
    export_to_is_export = bool(args.export_to) and (Path(args.export_to) / "manifest.json").is_file()
    check_paths({"MODEL_DIR": args.model, "--export-dir": args.export_dir},  # before building or timing anything
                [OutputPath("--output", args.output), OutputPath("--plot", args.plot),
                 OutputPath("--export-to", args.export_to, directory=True, overwrite=export_to_is_export)])
    if args.plot:
        report.require_matplotlib()  # an optional need, checked up front (not after the whole bench)
    lengths, batches = _ints(args.lengths), _ints(args.batch_sizes)
    backends = _names(args.backends or "torch", BACKENDS, "--backends")
    if args.step_calls < 1:
        raise InputError("--step-calls must be >= 1")
    if args.lm_head and args.logits not in (None, "all"):
        raise InputError(f"--lm-head is --logits all; it contradicts --logits {args.logits}")
    logits = args.logits or ("all" if args.lm_head else "none")
    if logits == "all" and "ort" in backends:
        raise InputError("the ort backend is benched with --logits last or none (all would gather (B, N, vocab) "
                         "logits on the host)")
    if args.cuda_graph and not str(args.device).startswith("cuda"):
        raise InputError("--cuda-graph needs --device cuda")
    device, model = _device_and_model(args)
    rmt = model.cfg.kind == "rmt"
    schedules = _names(args.schedules or ",".join(SCHEDULES if not rmt else ("full", "sequential")), SCHEDULES,
                       "--schedules")
    if rmt:
        from armt.bench.rmt_workloads import BACKENDS as RMT_BACKENDS, RmtWorkloads, run_rmt_parity
        from graphs.contracts import DIAGONAL_REFUSAL
        if "diagonal" in schedules:
            raise InputError(DIAGONAL_REFUSAL.replace("--schedule sequential", "--schedules full,sequential"))
        if set(backends) - set(RMT_BACKENDS):
            raise InputError(f"an RMT is benched on the backends {', '.join(RMT_BACKENDS)} (no fast executor: "
                             "torch runs the reference cells with fused attention)")
        if logits == "last" or args.steady_step:
            raise InputError("an RMT is benched with --logits none or all, without --steady-step (no diagonal step)")
        work = RmtWorkloads(model, device, args.precision, lm_head=logits == "all", export_dir=args.export_dir)
    else:
        if args.steady_step and "diagonal" not in schedules:
            raise InputError("--steady-step times a diagonal step: include diagonal in --schedules")
        work = Workloads(model, device, args.precision, export_dir=args.export_dir, logits=logits,
                         cuda_graph=args.cuda_graph)
    if "ort" in backends and not args.export_dir and args.export_to:
        if rmt:
            work.ensure_export(args.export_to)
        else:  # the graphs of the benched schedules only (tracing `segment` is most of an export's time)
            work.ensure_export(args.export_to, [s for s in schedules if s in ("sequential", "diagonal")] or None)
    cfg = model.cfg
    meta = {
        "command": "armt " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith(("armt", "main.py"))
        else " ".join(shlex.quote(a) for a in sys.argv),
        "model": args.synthetic or args.model, "precision": args.precision, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "onnxruntime": _ort_version() if "ort" in backends else None,
        "lm_head": logits == "all", "logits": logits, "cuda_graph": args.cuda_graph, "warmup": args.warmup, "repeats": args.repeats,
        "kind": cfg.kind, "segment_size": cfg.armt.segment_size, "memory_tokens": cfg.armt.num_mem_tokens,
        "d_mem": getattr(cfg.armt, "d_mem", None),
        "layers": cfg.base.n_layers, "d_model": cfg.base.d_model, "init_std": args.init_std,
        "mem_std": args.mem_std if args.mem_std is not None else args.init_std,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    rows: list[dict] = []
    # --output is rewritten after every row with "complete": false (a bench cut short keeps its rows)
    record = {"meta": meta, "results": rows, "parity": [], "steady_step": [], "targets": [], "complete": False}
    gen = torch.Generator().manual_seed(args.seed)
    limits = {"full": args.max_full, "sequential": args.max_sequential}
    try:
        for B in batches:
            for N in lengths:
                ids = torch.randint(0, cfg.base.vocab_size, (B, N), generator=gen)
                for backend in backends:
                    for schedule in schedules:
                        if not work.supports(backend, schedule):
                            continue
                        limit = limits.get(schedule)
                        if (limit and N > limit) or (backend == "torch-ref" and args.max_ref and N > args.max_ref):
                            continue
                        row = {"backend": backend, "schedule": schedule, "tokens": N, "batch": B,
                               "precision": args.precision, "logits": logits}
                        try:
                            fn = work.callable(backend, schedule, ids)
                            t = measure(fn, device, args.warmup, args.repeats)
                        except torch.OutOfMemoryError:
                            row["error"] = "out of device memory"
                            torch.cuda.empty_cache()
                        except ArmtError as exc:
                            row["error"] = str(exc)
                        else:
                            row.update(times_ms=t.times_ms, median_ms=t.median_ms,
                                       tokens_per_s=B * N / (t.median_ms / 1e3), peak_bytes=t.peak_bytes,
                                       held_bytes=t.held_bytes, nonfinite=t.result.nonfinite())
                            if backend == "ort" and not rmt:  # its arena, not torch's counters
                                row.update(peak_bytes=work.ort_held_bytes(), held_bytes=work.ort_held_bytes(),
                                           **work.ort_cuda_graph(schedule))
                                if device.type == "cuda":
                                    row["peak_kind"] = "held by ONNX Runtime (cudaMemGetInfo less torch's reserved)"
                            for what in row["nonfinite"]:
                                log.warning("%s %s at %d tokens: non-finite values (NaN/Inf) in %s", backend,
                                            schedule, N, what)
                        rows.append(row)
                        if not sys.stdout.isatty():  # on a terminal the table at the end shows each row once
                            log.info("%s", report.table([row]).splitlines()[-1])
                        if args.output:
                            report.write_json(args.output, record)
        if args.steady_step:
            record["steady_step"] = _steady(work, backends, batches[0], device, args.step_calls)
            if args.output:
                report.write_json(args.output, record)
        if args.parity_length:
            parity = run_rmt_parity if rmt else run_parity
            record["parity"] = parity(work, backends, args.parity_length, batches[0], args.seed)
    finally:
        work.close()
    record["targets"] = target_eval.evaluate(record)
    print(report.table(rows))
    if record["steady_step"]:
        print()
        print(report.step_table(record["steady_step"]))
    if record["parity"]:
        print()
        print(report.parity_table(record["parity"]))
    if record["targets"]:
        print()
        print(target_eval.table(record["targets"]))
    record["complete"] = True
    files = {}
    if args.output:
        files[args.output] = report.json_bytes(record)
    if args.plot:
        files[args.plot] = report.plot_bytes(record)
    write_files_together(files)  # the final record and its plot together
    bad = [r for r in rows if r.get("nonfinite")]
    if bad and args.strict:
        r = bad[0]
        raise NonFiniteError(f"{r['backend']} {r['schedule']} at {r['tokens']} tokens: non-finite values in "
                             f"{r['nonfinite'][0]} (--strict; {len(bad)} row(s) affected)")
    return 0


def _device_and_model(args: argparse.Namespace):
    """The checked --warmup/--repeats, the torch device, and the bench's fp32 model on the CPU (a
    model directory, or a synthetic ARMT or RMT of the preset's shape, seeded)."""
    import torch

    from armt.bench.workloads import build_model
    from graphs.errors import InputError
    from runtimes.torch_runner import check_torch_device
    if args.warmup < 0 or args.repeats < 1:
        raise InputError("--warmup must be >= 0 and --repeats >= 1")
    device = check_torch_device(args.device)
    torch.manual_seed(args.seed)
    overrides = {"num_hidden_layers": args.layers} if args.layers else None
    if args.synthetic and args.kind == "rmt":
        from armt.bench.rmt_workloads import build_rmt_model
        return device, build_rmt_model(args.synthetic, args.segment_size, args.memory_tokens, args.init_std,
                                       args.seed, overrides)
    return device, build_model(args.synthetic, args.model, args.segment_size, args.memory_tokens, args.d_mem,
                               args.init_std, args.mem_std, args.seed, overrides)


def _meta(args, device, cfg) -> dict:
    import torch
    return {
        "command": "armt " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[0].endswith(("armt", "main.py"))
        else " ".join(shlex.quote(a) for a in sys.argv),
        "model": args.synthetic or args.model, "precision": args.precision, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "warmup": args.warmup, "repeats": args.repeats, "kind": cfg.kind,
        "segment_size": cfg.armt.segment_size, "memory_tokens": cfg.armt.num_mem_tokens,
        "d_mem": getattr(cfg.armt, "d_mem", None), "layers": cfg.base.n_layers, "d_model": cfg.base.d_model,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def cmd_bench_generate(args: argparse.Namespace) -> int:
    """`armt bench --generate`: rows of (backend, batch, prompt length) and the targets, JSON + table."""
    from pathlib import Path

    import numpy as np

    from armt.bench import report
    from armt.bench.generate_bench import GENERATE_BACKENDS, GenerateBench, evaluate_targets, table, targets_table
    from graphs.atomic import write_files_together
    from graphs.errors import InputError
    from graphs.paths import OutputPath, check_paths

    export_to_is_export = bool(args.export_to) and (Path(args.export_to) / "manifest.json").is_file()
    check_paths({"MODEL_DIR": args.model, "--export-dir": args.export_dir},
                [OutputPath("--output", args.output),
                 OutputPath("--export-to", args.export_to, directory=True, overwrite=export_to_is_export)])
    if args.plot or args.schedules or args.parity_length:
        raise InputError("--plot, --schedules and --parity-length are for the schedule bench, not --generate")
    lengths, batches = _ints(args.lengths), _ints(args.batch_sizes)
    backends = _names(args.backends or "torch,hf", GENERATE_BACKENDS, "--backends")
    device, model = _device_and_model(args)
    export_dir = args.export_dir
    if "ort" in backends and not export_dir and args.export_to:
        from armt.bench.workloads import export_bench_model
        from graphs.contracts import default_schedule
        # the prefill's schedule graph + the decode graph; no memory write (the timed job is frozen: on the
        # LLaMA-1B shape that trace is a minute of the export)
        export_bench_model(model, args.export_to, args.precision, "armt bench --generate", decode=True,
                           schedules=[default_schedule(model.cfg)], memory_write=False)
        export_dir = args.export_to
    cfg = model.cfg
    bench = GenerateBench(model, device, args.precision, args.new_tokens, args.warmup, args.repeats,
                          export_dir=export_dir, max_hf=args.max_hf, max_ref=args.max_ref, cuda_graph=args.cuda_graph)
    meta = dict(_meta(args, device, cfg), new_tokens=args.new_tokens, generate=True, policy="frozen",
                cuda_graph=args.cuda_graph)
    rows: list[dict] = []
    record = {"meta": meta, "results": rows, "targets": {}, "complete": False}
    rng = np.random.default_rng(args.seed)
    try:
        for N in lengths:
            for B in batches:
                ids = rng.integers(0, cfg.base.vocab_size, size=(B, N)).astype(np.int64)
                for backend in backends:
                    row = bench.row(backend, ids)
                    rows.append(row)
                    log.info("%s", table([row]).splitlines()[-1])
                    if args.output:  # rewritten after every row: a bench cut short keeps its rows
                        record["targets"] = evaluate_targets(rows)
                        report.write_json(args.output, record)
    finally:
        bench.close()
    record["targets"] = evaluate_targets(rows)
    record["complete"] = True
    print(table(rows))
    print()
    print(targets_table(record["targets"]))
    if args.output:
        write_files_together({args.output: report.json_bytes(record)})
    return 0
