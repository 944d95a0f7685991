"""Artifacts whole or absent (issue 13): staging entries name their process; what a killed process
leaves (SIGKILL) is removed by the next write to the same target and listed by `armt inspect`; one
file-mode policy for model directories and exports alike."""

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graphs.atomic import atomic_directory, atomic_write_bytes, dir_mode, file_mode, stale_entries
from graphs.modeldir import save_model_dir
from armt.cli import main
from tests.helpers import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_staging_of_the_same_target_is_removed_by_the_next_write(tmp_path):
    dead = _dead_pid()
    stale_dir = tmp_path / f".out.partial-{dead}-0000"
    stale_dir.mkdir()
    (stale_dir / "half.onnx").write_bytes(b"x")
    stale_old = tmp_path / f".out.partial-{dead}"  # without the random part: stale too
    stale_old.mkdir()
    live = tmp_path / f".out.partial-{os.getppid()}-1111"  # a live process: kept
    live.mkdir()
    other = tmp_path / f".other.partial-{dead}-2222"  # another target: kept
    other.mkdir()
    assert set(stale_entries(tmp_path / "out")) == {stale_dir, stale_old}
    with atomic_directory(tmp_path / "out") as stage:
        assert stage.name.startswith(f".out.partial-{os.getpid()}-")
        (stage / "f").write_text("whole")
    assert not stale_dir.exists() and not stale_old.exists() and live.exists() and other.exists()
    assert (tmp_path / "out" / "f").read_text() == "whole"
    tmp = tmp_path / f".s.npz.tmp-{dead}-3333"
    tmp.write_bytes(b"half")
    atomic_write_bytes(tmp_path / "s.npz", b"whole")
    assert not tmp.exists() and (tmp_path / "s.npz").read_bytes() == b"whole"


def _modes(root: Path) -> set[tuple[str, int]]:
    out = {("dir", stat.S_IMODE(root.stat().st_mode))}
    for p in root.rglob("*"):
        out.add(("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)))
    return out


def test_one_file_mode_policy_for_model_dirs(tmp_path):
    model = save_model_dir(tiny_model("llama"), tmp_path / "model")  # safetensors alone writes 0600
    assert _modes(model) == {("dir", dir_mode()), ("file", file_mode())}


@pytest.mark.slow
def test_sigkill_leftovers_are_listed_and_cleaned_by_the_next_export(tmp_path, capsys):
    """An `armt export` killed with SIGKILL while writing leaves `.NAME.partial-<pid>-*`; `armt inspect`
    lists it; the next export to the same directory removes it. Both artifacts follow one mode policy."""
    from tests.test_runtime_ort import export_copy, exported
    _, model_dir = exported("llama")
    out = export_copy("llama", tmp_path / "out")  # an existing export the killed run was replacing
    proc = subprocess.Popen([sys.executable, "-m", "armt.cli", "-q", "export", str(model_dir), "-o", str(out),
                             "--overwrite", "--no-validate", "--no-decode", "--no-trace-cache"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        stages = list(tmp_path.glob(".out.partial-*"))
        if stages and any(stages[0].iterdir()):  # tracing has started writing into it
            break
        assert proc.poll() is None, "the export ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = list(tmp_path.glob(".out.partial-*"))
    assert leftovers and leftovers[0].name.startswith(f".out.partial-{proc.pid}-")
    assert main(["inspect", str(out)]) == 0  # the previous export is intact
    assert f"stale: {leftovers[0]}" in capsys.readouterr().out
    assert main(["export", str(model_dir), "-o", str(out), "--overwrite", "--no-validate", "--no-decode"]) == 0
    assert not any(p.exists() for p in leftovers) and not list(tmp_path.glob(".out.*"))
    assert main(["inspect", str(out), "--verify"]) == 0
    model = save_model_dir(tiny_model("llama"), tmp_path / "model")
    want = {("dir", dir_mode()), ("file", file_mode())}
    assert _modes(out) == want and _modes(model) == want
