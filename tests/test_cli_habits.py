"""CLI habits (issue 12): --version, one test per documented exit code (0 ok, 1 parity miss, 2 bad
input, 3 backend unavailable, 4 internal error, 141 closed pipe), machine-readable --json from
verify/inspect/run, bound overrides shown in verify's table, --lengths typos refused, help on every
option, missing optional packages named by their extra, library code leaving other loggers alone."""

import argparse
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import graphs
from armt import cli
from armt.cli import main
from tests.test_runtime_ort import exported

ROOT = Path(__file__).resolve().parents[1]


def _err_line(capsys, command: str, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"armt {command}: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


# ---------------------------------------------------------------------------------------- basics
def test_version_is_the_one_version_string(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"armt-deploy {graphs.__version__}"
    assert f'version = {{ attr = "graphs.__version__" }}' in (ROOT / "pyproject.toml").read_text()


def test_every_option_has_help_text():
    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not action.help:
                missing.append(f"{path} {action.dest}")

    walk(cli.build_parser(), "armt")
    assert not missing, missing


def test_exit_0_ok(capsys):
    assert main(["schedule", "--layers", "2", "--segments", "3"]) == 0
    assert "diagonal schedule" in capsys.readouterr().out


def test_exit_2_bad_input(capsys, tmp_path):
    assert main(["run", str(tmp_path / "no-model"), "--input-ids", str(tmp_path / "none.npy")]) == 2
    _err_line(capsys, "run", "error:")


def test_exit_2_lengths_with_an_empty_item(capsys):
    assert main(["bench", "--synthetic", "tiny", "--lengths", "1,,2"]) == 2
    _err_line(capsys, "bench", "'1,,2'")
    assert main(["bench", "--synthetic", "tiny", "--lengths", "4,"]) == 2
    _err_line(capsys, "bench", "'4,'")


def test_exit_3_missing_optional_package_names_its_extra(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ModuleNotFoundError
    assert main(["export", "--synthetic", "tiny", "-o", str(tmp_path / "e")]) == 3
    _err_line(capsys, "export", "torch", "pip install 'armt-deploy[torch]'")


def test_exit_3_missing_onnxruntime_names_both_extras():
    line = cli.missing_module_line(ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime"))
    assert "armt-deploy[ort]" in line and "armt-deploy[ort-gpu]" in line and "never both" in line
    assert cli.missing_module_line(ModuleNotFoundError("x", name="not_an_optional_package")) is None


def test_exit_4_internal_error_names_a_missing_key(capsys, monkeypatch):
    from armt.commands import run as run_cmd

    def bug(args):
        raise KeyError("segment_size")
    monkeypatch.setattr(run_cmd, "cmd_schedule", bug)  # main() builds its parser after the patch
    assert main(["schedule", "--layers", "2", "--segments", "2"]) == 4
    _err_line(capsys, "schedule", "internal error: KeyError: missing key 'segment_size'", "-v")


def test_exit_4_an_unknown_missing_module_is_internal(capsys, monkeypatch):
    from armt.commands import run as run_cmd

    def bug(args):
        raise ModuleNotFoundError("No module named 'graphs.nothing'", name="graphs.nothing")
    monkeypatch.setattr(run_cmd, "cmd_schedule", bug)
    assert main(["schedule", "--layers", "2", "--segments", "2"]) == 4
    _err_line(capsys, "schedule", "internal error: ModuleNotFoundError")


def test_closed_pipe_exits_quietly():
    """`armt schedule | head -1`: exit 141 (as a SIGPIPE'd tool), nothing on stderr."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "armt", "schedule", "--layers", "400", "--segments", "400",
                             "--max-steps", "800"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    assert proc.stdout.readline().startswith(b"diagonal schedule")
    proc.stdout.close()  # the reader goes away with most of the output unread (> a pipe buffer)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == cli.EXIT_CLOSED_PIPE
    assert err == "", err


def _console(code: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


CONSOLE = """
import atexit, sys, threading, time
from armt import cli
class Torn:
    def __del__(self):
        print("torn down", flush=True)
keep = Torn()  # its __del__ runs only in the interpreter's teardown
atexit.register(lambda: print("handler ran"))  # unflushed: exit_now flushes after the handlers
{before}
sys.argv = ["armt", "schedule", "--layers", "{layers}", "--segments", "2"]
cli.console_main()
"""


@pytest.mark.parametrize("layers,code", [("2", 0), ("0", 2)])
def test_the_console_exit_runs_atexit_and_skips_the_teardown(layers, code):
    """console_main's exit: the command's code, atexit's handlers run and their output flushed, the
    interpreter's final teardown skipped (a module object's __del__ never runs)."""
    proc = _console(CONSOLE.format(before="", layers=layers))
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.rstrip().endswith("handler ran"), proc.stdout
    assert "torn down" not in proc.stdout
    assert ("diagonal schedule" in proc.stdout) == (code == 0)
    assert ("armt schedule: error" in proc.stderr) == (code == 2), proc.stderr


def test_the_console_exit_waits_for_a_running_thread():
    """A non-daemon thread still running: the ordinary exit, which waits for it (and tears down)."""
    late = 'threading.Thread(target=lambda: (time.sleep(1.0), print("thread done", flush=True))).start()'
    proc = _console(CONSOLE.format(before=late, layers="2"))
    assert proc.returncode == 0, proc.stderr
    assert "thread done" in proc.stdout and "handler ran" in proc.stdout and "torn down" in proc.stdout, proc.stdout


def test_library_code_sets_no_logger_levels():
    """Only the `armt` command (an application) configures logging; the libraries never do."""
    offenders = []
    for package in ("graphs", "exporter", "runtimes"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\.setLevel\(|logging\.disable\(|logging\.basicConfig\(", line):
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, offenders


def test_main_restores_logger_levels_and_progress_mode():
    from graphs.progress import get_mode
    before = logging.getLogger("onnxscript").level, get_mode()
    assert main(["-q", "schedule", "--layers", "2", "--segments", "2"]) == 0
    assert (logging.getLogger("onnxscript").level, get_mode()) == before


def test_build_with_only_tensorrt_rtx_says_what_is_installed(monkeypatch):
    import importlib
    import importlib.util

    from exporter.engines import import_builder
    from graphs.errors import BackendUnavailable
    real_import, real_find = importlib.import_module, importlib.util.find_spec

    def fake_import(name, *a, **k):
        if name in ("tensorrt", "tensorrt_rtx"):
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(importlib, "import_module", fake_import)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tensorrt_rtx" else real_find(name, *a))
    with pytest.raises(BackendUnavailable, match=r"tensorrt is not installed; tensorrt_rtx is.*--builder tensorrt_rtx"):
        import_builder("tensorrt")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(BackendUnavailable, match=r"no TensorRT builder is installed.*armt-deploy\[trt\]"):
        import_builder("auto")


def test_bound_arguments_parse_and_refuse():
    from exporter.bounds import BOUNDS, given_bounds, parse_bound
    assert parse_bound("A=3e-5") == ("A", (3e-5, 3e-5))
    assert parse_bound("logits=1e-4/5e-5") == ("logits", (1e-4, 5e-5))
    for bad in ("A", "written=1", "nope=1", "A=x", "A=1/2/3", "A=-1", "A=inf"):
        with pytest.raises(ValueError):
            parse_bound(bad)
    b = given_bounds("fp32", rtol=2e-5, atol=1e-6, per_kind={"A": (1e-4, 5e-5)})
    assert b["logits"].rel == 2e-5 and b["logits"].atol == 1e-6 and b["logits"].given
    assert (b["A"].rel, b["A"].q_rel) == (1e-4, 5e-5)
    assert "written" not in b and BOUNDS[("fp32", "written")].rel == 0  # exact stays exact
    assert given_bounds("fp16") == {}


def test_atol_is_absolute_slack():
    from exporter.bounds import compare, given_bounds
    ref = np.array([1.0, 2.0, 4.0])
    got = ref + np.array([0.0, 0.0, 1e-3])  # rel 2.5e-4: misses fp32's 1e-5
    assert not compare("x", "logits", "fp32", got, ref).ok
    assert compare("x", "logits", "fp32", got, ref, bounds=given_bounds("fp32", atol=1.1e-3)).ok
    assert not compare("x", "logits", "fp32", got, ref, bounds=given_bounds("fp32", atol=0.9e-3)).ok
    nan = got.copy()
    nan[0] = np.nan
    assert not compare("x", "logits", "fp32", nan, ref, bounds=given_bounds("fp32", rtol=1e9, atol=1e9)).ok


# ---------------------------------------------------------------------------------------- on an export
@pytest.mark.slow
def test_verify_json_parses_and_overrides_show(capsys):
    export_dir, _ = exported("llama")
    args = ["verify", str(export_dir), "--schedule", "sequential"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["exit_code"] == 0 and data["passed"] and data["precision"] == "fp32" and data["failed"] == 0
    tensors = {r["tensor"] for r in data["rows"]}
    assert {"logits", "hidden", "A", "z"} <= tensors
    assert all(r["status"] == "ok" and not r["bound"]["given"] for r in data["rows"])

    # --rtol 0: every float tensor with any rounding difference misses -> exit 1, JSON says so
    assert main([*args, "--json", "--rtol", "0"]) == 1
    out = capsys.readouterr()
    data = json.loads(out.out)
    assert data["exit_code"] == 1 and data["failed"] >= 1 and not data["passed"]
    assert all(r["bound"]["given"] for r in data["rows"] if r["tensor"] != "written")

    # a loosened bound is shown in the table as set on the command line
    assert main([*args, "--bound", "A=1e-3/1e-3"]) == 0
    table = capsys.readouterr().out
    assert "1.0e-03/1.0e-03 (set)" in table and "bound given on the command line" in table

    assert main([*args, "--bound", "A=fast"]) == 2
    _err_line(capsys, "verify", "--bound 'A=fast'")


@pytest.mark.slow
def test_exit_1_parity_miss(capsys):
    export_dir, _ = exported("llama")
    assert main(["verify", str(export_dir), "--schedule", "sequential", "--rtol", "0"]) == 1
    captured = capsys.readouterr()
    assert "MISS" in captured.out or "FAIL" in captured.out


@pytest.mark.slow
def test_inspect_and_run_json(capsys, tmp_path):
    export_dir, _ = exported("llama")
    assert main(["inspect", str(export_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["graphs"]) == {"segment", "diagonal_step", "lm_head"} and data["precision"] == "fp32"
    assert data["total_bytes"] == sum(data["files"].values()) and data["problems"] is None
    assert main(["inspect", str(export_dir), "--json", "--verify"]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []

    np.save(tmp_path / "ids.npy", np.random.default_rng(1).integers(0, 64, (2, 13)))
    assert main(["run", str(export_dir), "--backend", "ort", "--input-ids", str(tmp_path / "ids.npy"),
                 "--output", str(tmp_path / "logits.npy"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["batch"], data["tokens"], data["schedule"]) == (2, 13, "diagonal")
    assert data["written"] == [str(tmp_path / "logits.npy")] and data["nonfinite"] == []
    assert np.load(tmp_path / "logits.npy").shape[:2] == (2, 13)


def test_bench_rows_printed_once_on_a_terminal(capsys, caplog, monkeypatch):
    from tests.test_bench import TINY
    caplog.set_level(logging.INFO, logger="armt.bench")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert main(["bench", *TINY, "--lengths", "32", "--schedules", "full,diagonal", "--warmup", "0",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.split()[:1] == ["torch"]]
    assert len(rows) == 2, out  # each (backend, schedule, length) once: the table, no per-row log echo
    assert not [r for r in caplog.records if r.name == "armt.bench" and "torch" in r.getMessage()]


def test_posix_only_modules_are_imported_lazily():
    """Windows (TensorRT-RTX's main platform) has no resource/fcntl/pwd/grp/termios: importing every
    module of the project and running a command must not need them."""
    code = (
        "import sys\n"
        "for name in ('resource', 'fcntl', 'pwd', 'grp', 'termios'):\n"
        "    sys.modules[name] = None  # import raises ImportError\n"
        "import importlib, pkgutil\n"
        "for pkg in ('graphs', 'exporter', 'runtimes', 'armt'):\n"
        "    mod = importlib.import_module(pkg)\n"
        "    for info in pkgutil.walk_packages(mod.__path__, pkg + '.'):\n"
        "        if info.name not in ('armt.__main__',):\n"
        "            importlib.import_module(info.name)\n"
        "from armt.cli import main\n"
        "sys.exit(main(['schedule', '--layers', '2', '--segments', '2']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
