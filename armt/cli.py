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
4 an internal error (a bug; `-v` shows the traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys

from armt.bench import cli as bench_cli
from armt.commands import convert, export, generate, run
from graphs.errors import EXIT_INTERNAL, EXIT_UNAVAILABLE, ArmtError

log = logging.getLogger("armt")

COMMAND_MODULES = (convert, export, run, generate, bench_cli)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="armt", description="Deploy Associative Recurrent Memory "
                                     "Transformers: convert, export to ONNX/TensorRT, run, verify, bench.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
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
    try:
        return int(args.func(args) or 0)
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
    except Exception as exc:  # a bug, not bad input: still one line unless -v
        if args.verbose:
            raise
        if exc.__class__.__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (torch not imported here)
            print(f"armt {args.command}: error: out of device memory", file=sys.stderr)
            return EXIT_UNAVAILABLE
        print(f"armt {args.command}: internal error: {exc.__class__.__name__}: {exc} "
              "(run with -v for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL

if __name__ == "__main__":
    sys.exit(main())
