"""`armt generate --prompt TEXT`: the prompt encoded with the model's tokenizer, the new text streamed
to stdout as it is generated (graphs/tokenizer.py). A model directory's tokenizer files, or those an
export's manifest lists; none: one line, exit 2."""

from __future__ import annotations

import argparse
import sys


def add_prompt_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", metavar="TEXT", help="the prompt as text (needs the model's tokenizer files); the "
                   "new text streams to stdout as it is generated")


def prompt_tokenizer(args: argparse.Namespace):
    """The tokenizer of PATH (model directory or export), checked against the model's vocabulary."""
    from pathlib import Path
    path = Path(args.path)
    if (path / "manifest.json").is_file():
        from runtimes.loaders import load_export_tokenizer, open_export
        manifest = open_export(path)
        tok = load_export_tokenizer(manifest)
        vocab = manifest.model_config().base.vocab_size
    else:
        from graphs.modeldir import load_config
        from graphs.tokenizer import load_tokenizer
        tok = load_tokenizer(path)
        vocab = load_config(path).base.vocab_size
    tok.check_fits(vocab)
    return tok


def prompt_ids(args: argparse.Namespace):
    """(ids (1, N) int64, None mask, tokenizer) of --prompt; None without --prompt. Both --prompt and
    --input-ids, or --attention-mask with --prompt: one line, exit 2."""
    import numpy as np

    from graphs.errors import InputError
    if getattr(args, "prompt", None) is None:
        return None
    if args.input_ids:
        raise InputError("give either --prompt TEXT or --input-ids IDS.npy, not both")
    if args.attention_mask:
        raise InputError("--attention-mask is for --input-ids; a text prompt is one unpadded row")
    tok = prompt_tokenizer(args)
    return np.asarray([tok.encode(args.prompt)], dtype=np.int64), None, tok


def text_stream(tokenizer, out=None):
    """on_token for runtimes.generate.generate: the new text to `out` (stdout) as it comes."""
    from graphs.tokenizer import stream_first_row
    out = out or sys.stdout

    def emit(piece: str) -> None:
        out.write(piece)
        out.flush()
    return stream_first_row(tokenizer, emit)
