"""Tokenizers: the HF tokenizer files a model directory or an export may hold, text <-> token ids.

    MODEL_DIR/ or EXPORT_DIR/
      tokenizer.json               the `tokenizers` serialisation (preferred: loaded with `tokenizers`)
      tokenizer_config.json        eos/pad/bos token names, the transformers class
      special_tokens_map.json, added_tokens.json, vocab.json, merges.txt, vocab.txt,
      tokenizer.model, spiece.model, chat_template.jinja     (any that the tokenizer uses)

`load_tokenizer(MODEL_DIR)` reads `tokenizer.json` with the `tokenizers` package (imported lazily; no
torch); a directory without one (a SentencePiece `tokenizer.model`, a `vocab.txt`) is loaded with
transformers' AutoTokenizer as a fallback. An export directory's tokenizer files are those its
manifest lists (`Manifest.tokenizer`, checksummed like every file; runtimes.loaders.
load_export_tokenizer), so an added or swapped file is never picked up. `copy_tokenizer(SRC, DEST)` copies the tokenizer files of SRC into a staging
directory (graphs/atomic.py makes the whole directory appear at once), after loading them once as a
check. Tokenizer files are not model weights: they do not enter the model id (graphs/identity.py).

`TextStream` turns the tokens of one row, as they are generated, into the new text each step adds
(decode of everything so far, minus what was already shown: correct for byte-level BPE pieces that
only form a character together).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from graphs.errors import BackendUnavailable, ConfigError, InputError

log = logging.getLogger("armt.tokenizer")

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja")
NO_TOKENIZER = ("{path} holds no tokenizer (tokenizer.json, tokenizer.model, ...): give --input-ids, or add one "
                "(armt convert-official --tokenizer DIR; armt export copies a model directory's)")


def tokenizer_files(directory: str | Path) -> list[str]:
    """The tokenizer files present in a model directory (names, in TOKENIZER_FILES order)."""
    d = Path(directory)
    return [name for name in TOKENIZER_FILES if (d / name).is_file()]


def has_tokenizer(files: Sequence[str]) -> bool:
    """Whether these files make a tokenizer (a config or special-token map alone does not)."""
    return any(name not in (TOKENIZER_CONFIG, "special_tokens_map.json", "added_tokens.json",
                            "chat_template.jinja") for name in files)


@dataclass
class TextTokenizer:
    """A loaded tokenizer: `encode(text) -> ids`, `decode(ids) -> text`, `eos_id`, `vocab_size`."""

    backend: Any  # tokenizers.Tokenizer, or a transformers tokenizer
    library: str  # "tokenizers" or "transformers"
    eos_id: int | None
    pad_id: int | None
    source: Path

    @property
    def vocab_size(self) -> int:
        if self.library == "tokenizers":
            return int(self.backend.get_vocab_size(with_added_tokens=True))
        return int(len(self.backend))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added). Words the vocabulary lacks: InputError."""
        if not isinstance(text, str):
            raise InputError(f"a prompt must be text, got {type(text).__name__}")
        try:
            if self.library == "tokenizers":
                ids = list(self.backend.encode(text, add_special_tokens=False).ids)
            else:
                ids = list(self.backend.encode(text, add_special_tokens=False))
        except Exception as exc:  # tokenizers raises its own Exception type (e.g. an unknown word, no unk token)
            unknown = self._unknown_words(text)
            why = f"{', '.join(map(repr, unknown[:5]))} not in its vocabulary" if unknown else str(exc)
            raise InputError(f"the tokenizer of {self.source} cannot encode the prompt: {why}") from None
        if not ids:
            raise InputError("the prompt encodes to no tokens")
        return [int(i) for i in ids]

    def _unknown_words(self, text: str) -> list[str]:
        """Words of a word-level vocabulary's prompt that the vocabulary lacks ([] when not applicable)."""
        pre = getattr(self.backend, "pre_tokenizer", None) if self.library == "tokenizers" else None
        if pre is None:
            return []
        vocab = self.backend.get_vocab(with_added_tokens=True)
        return [w for w, _ in pre.pre_tokenize_str(text) if w not in vocab]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        return str(self.backend.decode(ids, skip_special_tokens=skip_special_tokens))

    def check_fits(self, vocab_size: int) -> None:
        """A tokenizer whose ids reach past the model's vocabulary belongs to another model."""
        if self.vocab_size > vocab_size:
            raise ConfigError(f"the tokenizer of {self.source} has {self.vocab_size} tokens, the model's "
                              f"vocabulary only {vocab_size}: it belongs to another model")


def _special_id(tok: TextTokenizer, config: dict, key: str) -> int | None:
    value = config.get(key)
    if isinstance(value, dict):  # {"content": "</s>", ...}
        value = value.get("content")
    if not isinstance(value, str):
        return None
    if tok.library == "tokenizers":
        found = tok.backend.token_to_id(value)
    else:
        found = tok.backend.convert_tokens_to_ids(value)
    return None if found is None else int(found)


def _read_config(directory: Path, files: Sequence[str]) -> dict:
    merged: dict = {}
    for name in ("special_tokens_map.json", TOKENIZER_CONFIG):  # the config wins
        if name in files:
            try:
                data = json.loads((directory / name).read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{directory / name} is not valid JSON ({exc})") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{directory / name} is not a JSON object")
            merged.update(data)
    return merged


def load_tokenizer_files(directory: str | Path, files: Sequence[str]) -> TextTokenizer:
    """Load the tokenizer made of `files` (names) in `directory`."""
    directory = Path(directory)
    if not has_tokenizer(files):
        raise InputError(NO_TOKENIZER.format(path=directory))
    config = _read_config(directory, files)
    if TOKENIZER_JSON in files:
        try:
            import tokenizers
        except ImportError:
            tokenizers = None
        if tokenizers is not None:
            try:
                backend = tokenizers.Tokenizer.from_file(str(directory / TOKENIZER_JSON))
            except Exception as exc:  # tokenizers' own parse errors
                raise ConfigError(f"{directory / TOKENIZER_JSON} is not a readable tokenizer ({exc})") from None
            tok = TextTokenizer(backend, "tokenizers", None, None, directory)
            return _with_specials(tok, config)
    return _load_transformers(directory, config)


def _load_transformers(directory: Path, config: dict) -> TextTokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise BackendUnavailable(f"loading the tokenizer of {directory} needs the `tokenizers` package "
                                 "(tokenizer.json) or transformers (pip install tokenizers)") from None
    try:
        backend = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises many types for unreadable files
        raise ConfigError(f"the tokenizer files of {directory} cannot be loaded ({exc.__class__.__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    tok = TextTokenizer(backend, "transformers", None, None, directory)
    return _with_specials(tok, config)


def _with_specials(tok: TextTokenizer, config: dict) -> TextTokenizer:
    tok.eos_id = _special_id(tok, config, "eos_token")
    tok.pad_id = _special_id(tok, config, "pad_token")
    return tok


def load_tokenizer(path: str | Path, files: Sequence[str] | None = None) -> TextTokenizer:
    """The tokenizer of a model directory (`files`: its tokenizer files, default those present; an
    export's are its manifest's: runtimes.loaders.load_export_tokenizer). None there: InputError
    (exit 2) with the one line `--prompt` users see."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path} is not a directory")
    return load_tokenizer_files(path, tokenizer_files(path) if files is None else files)


def copy_tokenizer(source: str | Path, stage: str | Path, files: Sequence[str] | None = None) -> list[str]:
    """Copy the tokenizer files of `source` (a directory) into `stage` (a staging directory); return
    their names. The tokenizer is loaded once first, so a broken one is refused before anything is
    written. `files`: the names to copy (default: every tokenizer file present)."""
    source = Path(source)
    if not source.is_dir():
        raise InputError(f"--tokenizer {source} is not a directory")
    names = list(files) if files is not None else tokenizer_files(source)
    if not has_tokenizer(names):
        raise InputError(f"--tokenizer {source} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    load_tokenizer_files(source, names)
    for name in names:
        shutil.copyfile(source / name, Path(stage) / name)
    log.info("copied tokenizer files %s from %s", ", ".join(names), source)
    return names


def word_level_tokenizer_json(words: Sequence[str], specials: Sequence[str] = ()) -> str:
    """The tokenizer.json of a word-level vocabulary: word i has id i, words split at whitespace,
    decoded joined by spaces; `specials` (e.g. a pad word) are skipped when decoding. A word not in
    the vocabulary cannot be encoded (no unknown token): `encode` refuses it."""
    try:
        from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    except ImportError:
        raise BackendUnavailable("building a word-level tokenizer needs the `tokenizers` package") from None
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(w, special=True) for w in specials])
    return tok.to_str(pretty=True)


class TextStream:
    """One row's generated tokens -> the text each new token adds (`push`), special tokens skipped."""

    def __init__(self, tokenizer: TextTokenizer, prefix: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.prefix = [int(i) for i in prefix]  # context for the first words (a leading space, say)
        self.tokens: list[int] = []
        self.shown = tokenizer.decode(self.prefix) if self.prefix else ""

    def push(self, token_ids: Iterable[int]) -> str:
        self.tokens.extend(int(i) for i in token_ids)
        text = self.tokenizer.decode(self.prefix + self.tokens)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for its other pieces
            return ""
        new = text[len(self.shown):] if text.startswith(self.shown) else text
        self.shown = text
        return new


def stream_first_row(tokenizer: TextTokenizer, emit) -> "Callable[[int, Any, Any], None]":
    """An `on_token(step, tokens (B,), stopped (B,))` for runtimes.generate.generate that passes row 0's
    new text to `emit(piece)` as it is generated (nothing after the row stopped)."""
    import numpy as np
    stream = TextStream(tokenizer)

    def on_token(step: int, tokens, stopped) -> None:
        if bool(np.asarray(stopped)[0]):
            return
        piece = stream.push([int(np.asarray(tokens)[0])])
        if piece:
            emit(piece)
    return on_token
