"""The `armt` console command: collects the subcommands, maps typed errors to exit codes.

    armt/commands/convert.py   convert-official
    armt/commands/export.py    export, build, inspect
    armt/commands/run.py       run, verify, schedule
    armt/commands/generate.py  generate
    armt/bench/cli.py          bench
    armt/demo.py               demo

Each command module imports only argparse at module level; the libraries (graphs, exporter,
runtimes) are imported inside the command that needs them, so `armt run --backend ort` on a host
without torch never imports torch.

Exit codes (graphs/errors.py): 0 ok; 1 a parity miss, or non-finite values under --strict; 2 bad
input (one line on stderr); 3 a backend or resource that cannot run here (also: out of memory);
4 an internal error (a bug; `-v` shows the traceback); 130 interrupted; 141 stdout closed by its reader
(`armt schedule | head`: no message, as a Unix tool stopped by SIGPIPE).

The console script (and `python -m armt`) is `console_main`: main(), then an exit that skips the
interpreter's final teardown of every module (exit_now; 1.5-2 s after an export, whose torch,
sympy and onnxscript objects number in the millions). `main()` itself returns its code (tests call it
in-process).

A missing optional package (torch, onnxruntime, tensorrt_rtx, matplotlib, ...) is one line naming the
extra that installs it, exit 3.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import threading

from armt import demo
from armt.bench import cli as bench_cli
from armt.commands import convert, export, generate, run
from graphs import __version__
from graphs.errors import EXIT_INTERNAL, EXIT_UNAVAILABLE, ArmtError

log = logging.getLogger("armt")

COMMAND_MODULES = (convert, export, run, generate, bench_cli, demo)
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool stopped by a closed pipe

# top-level import name -> the extra (pyproject.toml) that installs it
EXTRA_OF_MODULE = {
    "torch": "torch", "safetensors": "torch", "onnxscript": "torch", "onnx_ir": "torch",
    "onnxruntime": "ort", "tensorrt_rtx": "trt", "tensorrt": "trt", "polygraphy": "trt",
    "matplotlib": "plot", "tokenizers": "text", "transformers": "test",
}
BASE_MODULES = ("numpy", "ml_dtypes", "onnx", "tqdm")
# Loggers whose INFO lines (one per folded initializer while tracing) drown ours: the command (an
# application, not the libraries) quiets them for its own duration unless -v, and restores them.
CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export", "torch.fx",
                  "torch._dynamo", "torch.utils._sympy")


def missing_module_line(exc: ModuleNotFoundError) -> str | None:
    """One line naming the extra for a missing optional package; None for any other missing module."""
    top = (exc.name or "").split(".")[0]
    if top in EXTRA_OF_MODULE:
        extra = EXTRA_OF_MODULE[top]
        hint = "'armt-deploy[ort]' (CPU) or 'armt-deploy[ort-gpu]' (CUDA), never both" if extra == "ort" else \
            f"'armt-deploy[{extra}]'"
        return f"this needs {top}, which is not installed here: pip install {hint}"
    if top in BASE_MODULES:
        return f"{top} is missing: the base install of armt-deploy is incomplete (pip install armt-deploy)"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="armt", description="Deploy Associative Recurrent Memory "
                                     "Transformers: convert, export to ONNX/TensorRT, run, verify, bench.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    parser.add_argument("--progress", action="store_true",
                        help="progress bars on stderr also when it is not a terminal (default: on a terminal only)")
    parser.add_argument("--version", action="version", version=f"armt-deploy {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    from graphs.progress import get_mode, set_mode
    previous = get_mode()
    set_mode("off" if args.quiet else "on" if args.progress else "auto")
    levels = {name: logging.getLogger(name).level for name in CHATTY_LOGGERS}
    if not args.verbose:
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return _run(args)
    finally:  # main() is also called in-process (tests): leave things as found
        set_mode(previous)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _run(args: argparse.Namespace) -> int:
    """The command, its errors mapped to exit codes (the module docstring)."""
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except ArmtError as exc:
        if args.verbose:
            log.exception("armt %s failed", args.command)
        print(f"armt {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"armt {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"armt {args.command}: error: out of memory", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ModuleNotFoundError as exc:
        line = missing_module_line(exc)
        if line is None or args.verbose:
            if args.verbose:
                raise
            return _internal(args, exc)
        print(f"armt {args.command}: error: {line}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except Exception as exc:  # a bug, not bad input: still one line unless -v
        if args.verbose:
            raise
        if exc.__class__.__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (torch not imported here)
            print(f"armt {args.command}: error: out of device memory", file=sys.stderr)
            return EXIT_UNAVAILABLE
        return _internal(args, exc)


def _internal(args, exc: BaseException) -> int:
    key = exc.args[0] if isinstance(exc, KeyError) and exc.args else None
    what = (f"missing key {key!r}" if key is not None and not (isinstance(key, str) and " " in key)
            else str(key) if key is not None else str(exc))
    print(f"armt {args.command}: internal error: {exc.__class__.__name__}: {what} "
          "(run with -v for the traceback)", file=sys.stderr)
    return EXIT_INTERNAL


def _closed_pipe() -> int:
    """stdout's reader went away (`| head`): stop quietly; point stdout at devnull so the interpreter's
    final flush does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_CLOSED_PIPE


def console_main() -> None:
    """The `armt` console script and `python -m armt`: main(), then exit_now with its code."""
    exit_now(main())


def exit_now(code: int) -> None:
    """Exit with `code` as sys.exit would at the end of the program, without the interpreter's
    teardown: atexit's handlers run (logging's flush, multiprocessing's and tempfile's clean-ups),
    stdout and stderr are flushed, then os._exit. What is skipped is the clearing of every module
    and object, which frees nothing a process that ends needs freed. While another non-daemon thread
    still runs (the interpreter would wait for it), or without atexit's runner: sys.exit."""
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if run_exit_handlers is None or others:
        sys.exit(code)
    run_exit_handlers()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = _closed_pipe() if code == 0 else code
    except (OSError, ValueError):  # stdout closed or gone: nothing left to write there
        pass
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


if __name__ == "__main__":
    console_main()
