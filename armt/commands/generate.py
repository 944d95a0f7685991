"""`armt generate` (see docs/generation.md): new tokens after a prompt, on torch (model directory) or
ONNX Runtime (export directory with decode graphs)."""

from __future__ import annotations

import argparse
import logging

from armt.commands import text_prompt  # argparse only at import time
from armt.commands.run import BACKENDS, PRECISIONS

log = logging.getLogger("armt.generate")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate tokens after a prompt (frozen or recurrent memory)",
                       description="Generate new tokens after each row's prompt. frozen (default, the official "
                       "generate): the last prompt segment and the new tokens read the memory and never write it. "
                       "recurrent: a segment that reaches segment_size tokens is completed (memory written) and a "
                       "new one starts; every score equals `armt run`'s logits on prompt + tokens so far.")
    p.add_argument("path", help="model directory (torch) or export directory (ort, trt)")
    p.add_argument("--input-ids", help="int .npy of shape (B, N): the prompts, right-padded")
    text_prompt.add_prompt_argument(p)
    p.add_argument("--attention-mask", help="(B, N) .npy of 0/1, right-padded (ones, then zeros)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per row at most (default 32)")
    p.add_argument("--memory-policy", default="frozen", choices=["frozen", "recurrent"],
                   help="frozen (default): the last segment and new tokens read the memory, never write it; "
                   "recurrent: completed segments are written as `armt run` does")
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="execution backend (default torch)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cpu (trt: cuda)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="torch: compute precision (default fp32); ort/trt: must match the export")
    p.add_argument("--schedule", choices=["sequential", "diagonal"],
                   help="schedule of the prompt's completed segments "
                   "(default: diagonal for an ARMT, sequential for an RMT)")
    p.add_argument("--output", help="write the new tokens, int64 (B, T) .npy, here (default: print them)")
    p.add_argument("--scores-out", help="write the logits each new token was chosen from, float32 (B, T, vocab) .npy")
    p.add_argument("--greedy", action="store_true", help="argmax (the default when no sampling flag is given)")
    p.add_argument("--temperature", type=float, help="sampling temperature (> 0)")
    p.add_argument("--top-k", type=int, help="sample among the k best tokens (0: off)")
    p.add_argument("--top-p", type=float, help="sample among the smallest set of tokens holding mass p (1: off)")
    p.add_argument("--seed", type=int, help="seed of the sampling (default 0): same seed, same tokens on every backend")
    p.add_argument("--eos-id", type=int, nargs="+", default=[], help="token ids that end a row (it is emitted)")
    p.add_argument("--state-in", help="memory state .npz to start from (`armt run --state-out`)")
    p.set_defaults(func=cmd_generate)


def sampling_config(args: argparse.Namespace):
    """--greedy, or the sampling flags (any of them selects sampling); both: one line, exit 2."""
    from graphs.errors import InputError
    from graphs.sampling import SamplingConfig
    given = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "seed") if getattr(args, k) is not None}
    if args.greedy and given:
        raise InputError(f"--greedy contradicts --{next(iter(given)).replace('_', '-')}: pick greedy or sampling")
    if not given:
        return SamplingConfig()
    return SamplingConfig(greedy=False, temperature=given.get("temperature", 1.0), top_k=given.get("top_k", 0),
                          top_p=given.get("top_p", 1.0), seed=given.get("seed", 0)).check()


def prompt_ids(args: argparse.Namespace):
    """(ids, mask, tokenizer) from --prompt TEXT (armt/commands/text_prompt.py); None without it."""
    return text_prompt.prompt_ids(args)


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    from armt.commands.run import _check_path_kind
    from graphs.arrays import npy_bytes
    from graphs.atomic import write_files_together
    from graphs.errors import InputError
    from graphs.paths import OutputPath, check_paths
    from runtimes.generate import check_generate_args
    from runtimes.inputs import load_ids, load_mask, load_state_for

    outputs = [OutputPath("--output", args.output), OutputPath("--scores-out", args.scores_out)]
    check_paths({"PATH": args.path, "--input-ids": args.input_ids, "--attention-mask": args.attention_mask,
                 "--state-in": args.state_in}, outputs)
    _check_path_kind(args.path, args.backend)
    sampling = sampling_config(args)
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    from_text = prompt_ids(args)
    tokenizer, on_token, eos_ids = None, None, list(args.eos_id)
    if from_text is not None:
        ids, mask, tokenizer = from_text
        on_token = text_prompt.text_stream(tokenizer)  # the new text to stdout as it is generated
        if not eos_ids and tokenizer.eos_id is not None:
            eos_ids = [tokenizer.eos_id]
    elif args.input_ids:
        ids = load_ids(args.input_ids)
        mask = load_mask(args.attention_mask, ids) if args.attention_mask else None
    else:
        raise InputError("give the prompt: --input-ids IDS.npy or --prompt TEXT")
    device = args.device or ("cuda" if args.backend == "trt" else "cpu")
    decoder, model_id = _decoder(args, device)
    check_generate_args(args.max_new_tokens, args.memory_policy, eos_ids, decoder.cfg.base.vocab_size)
    state = load_state_for(args.state_in, model_id()) if args.state_in else None
    from runtimes.generate import generate
    res = generate(decoder, ids, mask, max_new_tokens=args.max_new_tokens, policy=args.memory_policy,
                   sampling=sampling, eos_ids=eos_ids, state=state, prefill_schedule=args.schedule,
                   on_token=on_token)
    files = {}
    if args.output:
        files[args.output] = npy_bytes(res.tokens.astype(np.int64))
    if args.scores_out:
        files[args.scores_out] = npy_bytes(res.scores.astype(np.float32))
    write_files_together(files)
    if tokenizer is not None:
        print(flush=True)  # the streamed text's line ends
    elif not args.output:
        for b, row in enumerate(res.tokens):
            print(" ".join(str(int(t)) for t in row[:res.lengths[b]]))
    log.info("%s: %d rows, %s policy, %d new tokens at most%s", decoder.backend, ids.shape[0], args.memory_policy,
             res.tokens.shape[1], f"; tokens -> {args.output}" if args.output else "")
    return 0


def _decoder(args: argparse.Namespace, device: str):
    """The decoder of the backend and its model id (a callable: hashed only when a state file needs it)."""
    if args.backend == "torch":
        from graphs.modeldir import load_model_dir
        from runtimes.torch_generate import TorchDecoder
        model = load_model_dir(args.path)
        return TorchDecoder(model, device=device, precision=args.precision or "fp32"), model.known_model_id
    from runtimes.decoders import open_decoder
    dec = open_decoder(args.path, args.backend, device=device, precision=args.precision)
    return dec, (lambda: dec.model_id)
