"""`armt convert-official`: an official ARMT or RMT checkpoint -> a model directory.

    armt convert-official CKPT --base-config DIR --segment-size N --num-mem-tokens M --d-mem D
                          [--wrap-pos] [--no-correction] [--nu 3] [--tokenizer DIR] [--overwrite] -o MODEL_DIR
    armt convert-official CKPT --kind rmt --base-config DIR --segment-size N --num-mem-tokens M
                          [--wrap-pos] [--overwrite] -o MODEL_DIR
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("armt.convert")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-official",
        help="convert a checkpoint of the official ARMT or RMT code into a model directory",
        description="Convert a state_dict of the official AssociativeRecurrentWrapper("
                    "AssociativeMemoryCell(base)) (--kind armt, the default) or RecurrentWrapper(MemoryCell(base)) "
                    "(--kind rmt) of RodkinIvan/associative-recurrent-memory-transformer "
                    "into a model directory (config.json, armt_config.json, model.safetensors). The "
                    "checkpoint is read as data only (.pt via torch.load(weights_only=True), or .safetensors).")
    p.add_argument("checkpoint", metavar="CKPT", help="official checkpoint (.pt/.bin/.pth or .safetensors)")
    p.add_argument("--kind", choices=["armt", "rmt"], default="armt",
                   help="armt: AssociativeRecurrentWrapper (modeling_amt, default); rmt: RecurrentWrapper "
                   "(modeling_rmt, the original Recurrent Memory Transformer)")
    p.add_argument("--base-config", required=True, metavar="DIR",
                   help="directory holding the base model's HF config.json")
    p.add_argument("--segment-size", required=True, type=_positive_int, metavar="N",
                   help="tokens per segment the model was trained with")
    p.add_argument("--num-mem-tokens", required=True, type=_positive_int, metavar="M",
                   help="memory tokens (AssociativeMemoryCell / MemoryCell num_mem_tokens)")
    p.add_argument("--d-mem", type=_positive_int, metavar="D",
                   help="ARMT: memory key width (AssociativeMemoryCell d_mem; required for --kind armt)")
    p.add_argument("--wrap-pos", action="store_true",
                   help="GPT-2 trained with wrap_pos=True (position table of n_positions + M rows; RMT: + 2M)")
    p.add_argument("--no-correction", action="store_true",
                   help="ARMT: the model was trained with correction=False (gamma = 1)")
    p.add_argument("--nu", type=_positive_int, default=None, help="ARMT: DPFP order (the official code uses 3)")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="a directory with the model's HF tokenizer files (tokenizer.json, tokenizer_config.json, ...): "
                   "copied into MODEL_DIR, for `armt generate --prompt`")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--shard-size", metavar="SIZE", default=None,
                   help="split the weights into safetensors shards of at most SIZE (e.g. 5GB, 500MB, 2GiB) with "
                        "model.safetensors.index.json (default: one model.safetensors)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL_DIR", help="model directory to write")
    p.set_defaults(func=cmd_convert_official)


def cmd_convert_official(args: argparse.Namespace) -> int:
    from graphs.checkpoint import convert_official
    from graphs.errors import InputError
    from graphs.tensorfile import parse_size

    shard_bytes = parse_size(args.shard_size) if args.shard_size else None
    if args.kind == "rmt":
        given = [flag for flag, on in (("--d-mem", args.d_mem is not None), ("--no-correction", args.no_correction),
                                       ("--nu", args.nu is not None)) if on]
        if given:
            raise InputError(f"{', '.join(given)}: ARMT settings; an RMT (--kind rmt) has no memory weights")
        out = convert_official(args.checkpoint, args.base_config, args.output, kind="rmt",
                               segment_size=args.segment_size, num_mem_tokens=args.num_mem_tokens,
                               wrap_pos=args.wrap_pos, overwrite=args.overwrite, shard_bytes=shard_bytes,
                               tokenizer=args.tokenizer)
    else:
        if args.d_mem is None:
            raise InputError("--d-mem is required for an ARMT (--kind armt): the memory key width it was trained with")
        out = convert_official(args.checkpoint, args.base_config, args.output,
                               segment_size=args.segment_size, num_mem_tokens=args.num_mem_tokens,
                               d_mem=args.d_mem, wrap_pos=args.wrap_pos, correction=not args.no_correction,
                               nu=args.nu or 3, overwrite=args.overwrite, shard_bytes=shard_bytes,
                               tokenizer=args.tokenizer)
    log.info("wrote %s model directory %s", args.kind.upper(), out)
    return 0
