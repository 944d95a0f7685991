"""Inputs and outputs (issue 13): an output equal to, inside or containing an input is refused before
anything is touched (and the input is intact); every output location is checked before computing;
the outputs of a call are written as a set; every error class maps to a documented exit code."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import graphs.atomic as atomic
from graphs.errors import OutputError
from graphs.modeldir import save_model_dir
from graphs.paths import OutputPath, check_paths
from graphs.state import load_state
from armt.cli import main
from tests.helpers import tiny_model

LLAMA = Path(__file__).parent / "fixtures" / "official" / "llama"
CONVERT = ["--segment-size", "5", "--num-mem-tokens", "3", "--d-mem", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tiny_model("llama"), tmp_path_factory.mktemp("outputs") / "model")


@pytest.fixture()
def ids_file(tmp_path):
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 61, (2, 9)))
    return tmp_path / "ids.npy"


def _one_line(capsys, command, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"armt {command}: error:") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


def _snapshot(path: Path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture()
def no_compute(monkeypatch):
    """Any model load, run or export fails the test: the refusal must come first."""
    def boom(*a, **k):
        raise AssertionError("computed before the output check")
    import graphs.modeldir
    import runtimes.torch_runner
    import runtimes.validation
    monkeypatch.setattr(graphs.modeldir, "load_model_dir", boom)
    monkeypatch.setattr(runtimes.torch_runner, "run_torch", boom)
    monkeypatch.setattr(runtimes.validation, "export_model", boom)
    import graphs.checkpoint
    monkeypatch.setattr(graphs.checkpoint, "load_official", boom)


# ------------------------------------------------------------------------------------------ own input
@pytest.mark.parametrize("target", ["same", "inside", "parent"])
def test_export_over_its_own_model_dir_is_refused_and_keeps_it(tmp_path, target, no_compute, capsys):
    m = save_model_dir(tiny_model("llama"), tmp_path / "data" / "m")
    before = _snapshot(tmp_path / "data")
    out = {"same": m, "inside": m / "onnx", "parent": tmp_path / "data"}[target]
    assert main(["export", str(m), "-o", str(out), "--overwrite"]) == 2
    _one_line(capsys, "export", "MODEL_DIR")
    assert _snapshot(tmp_path / "data") == before


def test_convert_over_its_own_checkpoint_is_refused_and_keeps_it(tmp_path, no_compute, capsys):
    d = tmp_path / "ckpt"
    shutil.copytree(LLAMA, d)
    before = _snapshot(d)
    for out in (d, d / "model", tmp_path):
        assert main(["convert-official", str(d / "checkpoint.pt"), "--base-config", str(d), *CONVERT,
                     "-o", str(out), "--overwrite"]) == 2
        _one_line(capsys, "convert-official", "input")
        assert _snapshot(d) == before


@pytest.mark.parametrize("flags,needle", [
    (["--output", "{ids}"], "is the input --input-ids"),
    (["--hidden-output", "{ids}"], "is the input --input-ids"),
    (["--state-out", "{state}", "--state-in", "{state}"], "is the input --state-in"),
    (["--output", "{model}/logits.npy"], "inside the input PATH"),
    (["--output", "{tmp}/a.npy", "--hidden-output", "{tmp}/a.npy"], "same path"),
])
def test_run_refuses_outputs_over_its_inputs(model_dir, ids_file, tmp_path, flags, needle, capsys, monkeypatch):
    (tmp_path / "s.npz").write_bytes(b"a state file: it must not be read or replaced")
    subs = {"ids": ids_file, "state": tmp_path / "s.npz", "model": model_dir, "tmp": tmp_path}
    args = [f.format(**subs) for f in flags]
    before = {p: p.read_bytes() for p in (ids_file, tmp_path / "s.npz")}
    import runtimes.torch_runner
    monkeypatch.setattr(runtimes.torch_runner, "run_torch", lambda *a, **k: pytest.fail("ran"))
    assert main(["run", str(model_dir), "--input-ids", str(ids_file), *args]) == 2
    _one_line(capsys, "run", needle)
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "a.npy").exists() and not (model_dir / "logits.npy").exists()


def test_check_paths_resolves_links(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputError, match="is the input"):
        check_paths({"IN": tmp_path / "real"}, [OutputPath("-o", tmp_path / "link", directory=True, overwrite=True)])
    with pytest.raises(OutputError, match="inside the input"):
        check_paths({"IN": tmp_path / "link"}, [OutputPath("-o", tmp_path / "real" / "x" / ".." / "y", directory=True)])


# ------------------------------------------------------------------------------------------ before compute
@pytest.mark.parametrize("flag", ["--output", "--hidden-output", "--state-out"])
def test_missing_output_folder_is_refused_before_the_run(model_dir, ids_file, tmp_path, flag, no_compute, capsys):
    assert main(["run", str(model_dir), "--input-ids", str(ids_file), "--output", str(tmp_path / "ok.npy"),
                 flag if flag != "--output" else "--hidden-output", str(tmp_path / "nowhere" / "x.npy")]) == 2
    _one_line(capsys, "run", "does not exist")
    assert not (tmp_path / "ok.npy").exists()


def test_output_that_is_a_directory_is_refused(model_dir, ids_file, tmp_path, no_compute, capsys):
    (tmp_path / "dir.npy").mkdir()
    assert main(["run", str(model_dir), "--input-ids", str(ids_file), "--output", str(tmp_path / "dir.npy")]) == 2
    _one_line(capsys, "run", "is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_folder_is_refused(model_dir, ids_file, tmp_path, no_compute, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["run", str(model_dir), "--input-ids", str(ids_file), "--output", str(ro / "x.npy")]) == 2
        _one_line(capsys, "run", "not writable")
    finally:
        ro.chmod(0o700)


def test_export_and_convert_check_their_output_before_loading(tmp_path, no_compute, capsys):
    m = save_model_dir(tiny_model("llama"), tmp_path / "m")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("x")
    for out, needle in ((tmp_path / "busy", "--overwrite"), (tmp_path / "file", "not a directory")):
        assert main(["export", str(m), "-o", str(out)]) == 2
        _one_line(capsys, "export", needle)
        assert main(["convert-official", str(LLAMA / "checkpoint.pt"), "--base-config", str(LLAMA), *CONVERT,
                     "-o", str(out)]) == 2
        _one_line(capsys, "convert-official", needle)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


def test_bench_checks_outputs_and_matplotlib_first(tmp_path, monkeypatch, capsys):
    import armt.bench.report as report
    import armt.bench.timing as timing
    monkeypatch.setattr(timing, "measure", lambda *a, **k: pytest.fail("benched before the checks"))
    tiny = ["bench", "--synthetic", "tiny", "--segment-size", "8", "--memory-tokens", "2", "--d-mem", "4",
            "--layers", "1", "--lengths", "16", "--precision", "fp32"]
    assert main([*tiny, "--output", str(tmp_path / "none" / "b.json")]) == 2
    _one_line(capsys, "bench", "does not exist")

    def no_matplotlib():
        from graphs.errors import BackendUnavailable
        raise BackendUnavailable("--plot needs matplotlib (pip install 'armt-deploy[plot]')")
    monkeypatch.setattr(report, "require_matplotlib", no_matplotlib)
    assert main([*tiny, "--plot", str(tmp_path / "b.png")]) == 3
    _one_line(capsys, "bench", "matplotlib")


# ------------------------------------------------------------------------------------------ all or none
def test_run_outputs_are_written_as_a_set(model_dir, ids_file, tmp_path, monkeypatch, capsys):
    """The last of three renames fails: none of the outputs changes (earlier versions are put back)."""
    outs = {"--output": tmp_path / "l.npy", "--hidden-output": tmp_path / "h.npy", "--state-out": tmp_path / "s.npz"}
    args = [x for flag, p in outs.items() for x in (flag, str(p))]
    assert main(["run", str(model_dir), "--input-ids", str(ids_file), *args]) == 0
    first = {p: p.read_bytes() for p in outs.values()}
    np.save(ids_file, np.random.default_rng(1).integers(0, 61, (2, 9)))  # other results this time
    real_replace = os.replace

    def failing(src, dst):
        if Path(dst).name == "s.npz" and ".tmp-" in Path(src).name:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(atomic.os, "replace", failing)
    assert main(["run", str(model_dir), "--input-ids", str(ids_file), *args]) == 2
    _one_line(capsys, "run", "No space left on device")
    assert {p: p.read_bytes() for p in outs.values()} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.npy", "ids.npy", "l.npy", "s.npz"]  # no temp files


def test_new_outputs_are_removed_when_the_set_fails(tmp_path, monkeypatch):
    real_replace = os.replace
    calls = []

    def failing(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)
    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(OutputError, match="Input/output error"):
        atomic.write_files_together({tmp_path / "a": b"1", tmp_path / "b": b"2"})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ exit codes
def test_exit_codes(model_dir, ids_file, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty.npz").write_bytes(b"")
    assert main(["run", str(model_dir), "--input-ids", str(ids_file), "--state-in", str(tmp_path / "empty.npz")]) == 2
    _one_line(capsys, "run", "not a valid ARMT state file")
    import runtimes.torch_runner

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(runtimes.torch_runner, "run_torch", bug)
    assert main(["run", str(model_dir), "--input-ids", str(ids_file)]) == 4
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError" in err and len(err.strip().splitlines()) == 1

    def oom(*a, **k):
        raise MemoryError()
    monkeypatch.setattr(runtimes.torch_runner, "run_torch", oom)
    assert main(["run", str(model_dir), "--input-ids", str(ids_file)]) == 3
    _one_line(capsys, "run", "out of memory")


def test_state_file_from_run_loads(model_dir, ids_file, tmp_path):
    assert main(["run", str(model_dir), "--input-ids", str(ids_file), "--state-out", str(tmp_path / "s.npz")]) == 0
    assert load_state(tmp_path / "s.npz", tiny_model("llama").model_id()).pending is not None  # 9 = 6 + 3
