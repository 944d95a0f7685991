"""Tokenizers: the demo model's word-level vocabulary, loading, `convert-official --tokenizer`, the
copy `armt export` makes (covered by the manifest's checksums), and the model id they do not change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from armt.cli import main as armt
from graphs.errors import ConfigError, InputError
from graphs.recall import RecallTask, make_batch, recall_words
from graphs.tokenizer import (TextStream, copy_tokenizer, load_tokenizer, tokenizer_files,
                              word_level_tokenizer_json)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "armt-recall"
LLAMA = ROOT / "tests" / "fixtures" / "official" / "llama"
FLAGS = ["--segment-size", "5", "--num-mem-tokens", "3", "--d-mem", "4"]


def demo_task() -> RecallTask:
    return RecallTask.from_dict(json.loads((DEMO / "recall_task.json").read_text()))


def write_word_tokenizer(d: Path, n_words: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(word_level_tokenizer_json([f"w{i}" for i in range(n_words)], specials=("w0",)))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w1", "pad_token": "w0"}))
    return d


def test_shipped_tokenizer_is_the_task_vocabulary():
    """tokenizer.json of the demo model is exactly what scripts/make_recall_tokenizer.py builds, and
    word i is id i of the task (the ids the model was trained on)."""
    task = demo_task()
    words = recall_words(task)
    assert len(words) == task.vocab_size == 64
    shipped = json.loads((DEMO / "tokenizer.json").read_text())
    assert shipped == json.loads(word_level_tokenizer_json(words, specials=("<pad>",)))
    tok = load_tokenizer(DEMO)
    assert tok.library == "tokenizers" and tok.vocab_size == 64 and tok.pad_id == 0 and tok.eos_id is None
    assert [tok.encode(w) for w in words[1:]] == [[i] for i in range(1, 64)]


def test_round_trip_on_recall_rows():
    task = demo_task()
    tok = load_tokenizer(DEMO)
    batch = make_batch(task, 4, 3, 4, np.random.default_rng(3))
    for row in batch.input_ids:
        text = tok.decode(row)
        assert len(text.split()) == len(row)
        assert tok.encode(text) == row.tolist()
    assert tok.decode([0, 16, 48, 0]) == "apple red"  # the pad word is special: skipped


def test_unknown_word_is_named():
    tok = load_tokenizer(DEMO)
    with pytest.raises(InputError, match="'hello' not in its vocabulary"):
        tok.encode("apple hello red")
    with pytest.raises(InputError, match="no tokens"):
        tok.encode("   ")


def test_text_stream_gives_the_new_words():
    tok = load_tokenizer(DEMO)
    stream = TextStream(tok)
    pieces = [stream.push([t]) for t in (16, 48, 0, 1, 17)]
    assert pieces == ["apple", " red", "", " ?", " bear"]
    assert "".join(pieces) == tok.decode([16, 48, 0, 1, 17])


def test_directory_without_tokenizer(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")  # a config alone is no tokenizer
    with pytest.raises(InputError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    assert tokenizer_files(LLAMA) == []


def test_broken_tokenizer_refused_before_copying(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{not json")
    stage = tmp_path / "stage"
    stage.mkdir()
    with pytest.raises(ConfigError, match="not a readable tokenizer"):
        copy_tokenizer(src, stage)
    assert list(stage.iterdir()) == []


def _convert(tmp_path, *extra):
    out = tmp_path / "model"
    code = armt(["convert-official", str(LLAMA / "checkpoint.pt"), "--base-config", str(LLAMA), *FLAGS,
                 "-o", str(out), *extra])
    return code, out


def test_convert_official_copies_the_tokenizer(tmp_path):
    from graphs.modeldir import load_model_dir, recorded_model_id
    tok_dir = write_word_tokenizer(tmp_path / "tok", 64)
    code, out = _convert(tmp_path, "--tokenizer", str(tok_dir))
    assert code == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tok_dir / name).read_bytes()
    tok = load_tokenizer(out)
    assert tok.eos_id == 1 and tok.encode("w5 w63") == [5, 63]
    # the tokenizer is not part of the model: same id as a conversion without it
    plain = tmp_path / "plain"
    assert armt(["convert-official", str(LLAMA / "checkpoint.pt"), "--base-config", str(LLAMA), *FLAGS,
                 "-o", str(plain)]) == 0
    assert recorded_model_id(out) == recorded_model_id(plain) is not None
    assert load_model_dir(out).known_model_id() == load_model_dir(plain).known_model_id()


@pytest.mark.parametrize("case, message", [
    ("missing", "not a directory holding tokenizer files"),
    ("empty", "not a directory holding tokenizer files"),
    ("too-big", "belongs to another model"),
])
def test_convert_official_bad_tokenizer(tmp_path, capsys, case, message):
    tok_dir = tmp_path / "tok"
    if case == "empty":
        tok_dir.mkdir()
    elif case == "too-big":
        write_word_tokenizer(tok_dir, 65)  # the fixture's vocabulary has 64 ids
    code, out = _convert(tmp_path, "--tokenizer", str(tok_dir))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()  # nothing half-written


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A tiny model directory with a tokenizer, and its export (no validation: this is about files)."""
    root = tmp_path_factory.mktemp("tok-export")
    tok_dir = write_word_tokenizer(root / "tok", 64)
    model_dir = root / "model"
    assert armt(["convert-official", str(LLAMA / "checkpoint.pt"), "--base-config", str(LLAMA), *FLAGS,
                 "--tokenizer", str(tok_dir), "-o", str(model_dir)]) == 0
    export_dir = root / "export"
    assert armt(["export", str(model_dir), "-o", str(export_dir), "--no-validate", "--no-decode"]) == 0
    return model_dir, export_dir


def test_export_copies_the_tokenizer_under_checksums(tiny_export, tmp_path):
    from exporter.manifest import load_manifest
    from graphs.errors import ExportError
    from runtimes.loaders import load_export_tokenizer
    model_dir, export_dir = tiny_export
    m = load_manifest(export_dir)
    assert set(m.tokenizer) == {"tokenizer.json", "tokenizer_config.json"}
    for name in m.tokenizer:
        assert name in m.files and (export_dir / name).read_bytes() == (model_dir / name).read_bytes()
    assert load_export_tokenizer(m).encode("w3 w4") == [3, 4]
    # an altered tokenizer file is an altered export
    bad = tmp_path / "bad"
    shutil.copytree(export_dir, bad)
    path = bad / "tokenizer.json"
    path.write_text(path.read_text().replace('"w3"', '"w9x"'))
    with pytest.raises(ExportError, match="tokenizer.json was altered"):
        load_manifest(bad)


# ------------------------------------------------------------------------------------------ --prompt
PROMPT = "the apple red of a bear blue so it is at by on or in and ? apple"  # pair in segment 1, query in 2


def test_prompt_streams_the_text_of_the_tokens_input_ids_give(tmp_path, capsys):
    tok = load_tokenizer(DEMO)
    ids = tmp_path / "ids.npy"
    np.save(ids, np.asarray([tok.encode(PROMPT)], dtype=np.int64))
    out = tmp_path / "tokens.npy"
    assert armt(["generate", str(DEMO), "--input-ids", str(ids), "--max-new-tokens", "4", "--output", str(out)]) == 0
    capsys.readouterr()
    assert armt(["generate", str(DEMO), "--prompt", PROMPT, "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    tokens = np.load(out)[0]
    assert printed == tok.decode(tokens) + "\n"
    assert printed.split()[0] == "red"


@pytest.mark.parametrize("extra, message", [
    ([], "holds no tokenizer"),
    (["--input-ids", "IDS"], "either --prompt TEXT or --input-ids"),
])
def test_prompt_bad_input(tmp_path, capsys, extra, message):
    from graphs.modeldir import save_model_dir
    from tests.helpers import tiny_model
    model_dir = save_model_dir(tiny_model(), tmp_path / "model")
    ids = tmp_path / "ids.npy"
    np.save(ids, np.zeros((1, 3), dtype=np.int64))
    extra = [str(ids) if e == "IDS" else e for e in extra]
    code = armt(["generate", str(model_dir), "--prompt", "w1 w2", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_prompt_with_a_word_the_vocabulary_lacks(capsys):
    assert armt(["generate", str(DEMO), "--prompt", "apple hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'hello' not in its vocabulary" in err[0]
