"""`armt convert-official` on bad input: exit 2, one line on stderr, no traceback, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from armt.cli import main as armt

ROOT = Path(__file__).resolve().parent.parent
LLAMA = ROOT / "tests" / "fixtures" / "official" / "llama"
GOOD = ["--segment-size", "5", "--num-mem-tokens", "3", "--d-mem", "4"]


def convert(tmp_path: Path, capsys, ckpt: Path | str = LLAMA / "checkpoint.pt", config: Path | str = LLAMA,
            flags: list[str] = GOOD, out: Path | None = None, extra: list[str] = ()) -> tuple[int, list[str]]:
    out = out or tmp_path / "work" / "model"
    code = armt(["convert-official", str(ckpt), "--base-config", str(config), *flags, "-o", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_clean_failure(code: int, err: list[str], tmp_path: Path, expect: str) -> None:
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("armt convert-official: error: ") and expect in err[0], err[0]
    work = tmp_path / "work"
    assert not work.exists() or list(work.iterdir()) == []  # no output, no staging leftovers


def test_good_conversion_succeeds(tmp_path, capsys):
    code, err = convert(tmp_path, capsys)
    assert code == 0 and not any("error" in line for line in err)
    assert (tmp_path / "work" / "model" / "model.safetensors").is_file()


def test_missing_checkpoint(tmp_path, capsys):
    code, err = convert(tmp_path, capsys, ckpt=tmp_path / "absent.pt")
    assert_clean_failure(code, err, tmp_path, "does not exist")


def test_checkpoint_is_a_directory(tmp_path, capsys):
    code, err = convert(tmp_path, capsys, ckpt=LLAMA)
    assert_clean_failure(code, err, tmp_path, "is not a file")


def test_non_checkpoint_file(tmp_path, capsys):
    code, err = convert(tmp_path, capsys, ckpt=LLAMA / "armt.json")
    assert_clean_failure(code, err, tmp_path, "not a readable PyTorch checkpoint")


def test_npy_file_is_not_a_checkpoint(tmp_path, capsys):
    code, err = convert(tmp_path, capsys, ckpt=LLAMA / "logits.npy")
    assert_clean_failure(code, err, tmp_path, "not a readable PyTorch checkpoint")


def test_missing_config_dir(tmp_path, capsys):
    code, err = convert(tmp_path, capsys, config=tmp_path / "nowhere")
    assert_clean_failure(code, err, tmp_path, "base config")


def test_config_dir_without_config_json(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = convert(tmp_path, capsys, config=tmp_path / "empty")
    assert_clean_failure(code, err, tmp_path, "config.json does not exist")


def test_config_json_not_json(tmp_path, capsys):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{not json")
    code, err = convert(tmp_path, capsys, config=tmp_path / "cfg")
    assert_clean_failure(code, err, tmp_path, "not valid JSON")


def test_unsupported_base_model(tmp_path, capsys):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    code, err = convert(tmp_path, capsys, config=tmp_path / "cfg")
    assert_clean_failure(code, err, tmp_path, "unsupported base model_type 'bert'")


def test_config_of_another_size(tmp_path, capsys):
    cfg = json.loads((LLAMA / "config.json").read_text())
    cfg["hidden_size"] = 48
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(cfg))
    code, err = convert(tmp_path, capsys, config=tmp_path / "cfg")
    assert_clean_failure(code, err, tmp_path, "memory_cell.memory has shape (3, 32)")


def test_wrong_d_mem(tmp_path, capsys):
    code, err = convert(tmp_path, capsys, flags=["--segment-size", "5", "--num-mem-tokens", "3", "--d-mem", "8"])
    assert_clean_failure(code, err, tmp_path, "--d-mem is 8")


def test_wrong_num_mem_tokens(tmp_path, capsys):
    code, err = convert(tmp_path, capsys, flags=["--segment-size", "5", "--num-mem-tokens", "2", "--d-mem", "4"])
    assert_clean_failure(code, err, tmp_path, "--num-mem-tokens is 2")


def test_wrap_pos_on_llama(tmp_path, capsys):
    code, err = convert(tmp_path, capsys, extra=["--wrap-pos"])
    assert_clean_failure(code, err, tmp_path, "wrap_pos applies to GPT-2")


def test_existing_non_empty_output_without_overwrite(tmp_path, capsys):
    out = tmp_path / "work" / "model"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    code, err = convert(tmp_path, capsys, out=out)
    assert code == 2 and len(err) == 1 and "--overwrite" in err[0]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert [p.name for p in out.parent.iterdir()] == ["model"]
    code, err = convert(tmp_path, capsys, out=out, extra=["--overwrite"])
    assert code == 0 and sorted(p.name for p in out.iterdir()) == [
        "CONVERTED.md", "armt_config.json", "config.json", "model.safetensors"]


def test_output_path_is_a_file(tmp_path, capsys):
    out = tmp_path / "work" / "model"
    out.parent.mkdir()
    out.write_text("x")
    code, err = convert(tmp_path, capsys, out=out)
    assert code == 2 and len(err) == 1 and "not a directory" in err[0]
    assert out.read_text() == "x"


@pytest.mark.parametrize("value", ["0", "-3", "five"])
def test_bad_integer_option_is_a_usage_error(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as info:
        armt(["convert-official", str(LLAMA / "checkpoint.pt"), "--base-config", str(LLAMA),
              "--segment-size", value, "--num-mem-tokens", "3", "--d-mem", "4", "-o", str(tmp_path / "m")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "positive integer" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_console_entry_point_in_a_fresh_process(tmp_path):
    """The real process: exit status 2 and a single stderr line, no traceback."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "armt", "convert-official", str(tmp_path / "x.pt"),
                           "--base-config", str(LLAMA), *GOOD, "-o", str(tmp_path / "m")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()
