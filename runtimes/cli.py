"""`armt run`: run an ARMT on token ids (torch backend from a model directory)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("armt.run")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a model on token ids and write the logits")
    p.add_argument("path", help="model directory (torch backend)")
    p.add_argument("--input-ids", required=True, help="int64 .npy of shape (B, N)")
    p.add_argument("--output", required=True, help="where to write float32 logits (B, N, vocab) .npy")
    p.add_argument("--backend", default="torch", choices=["torch"], help="execution backend")
    p.add_argument("--schedule", default="diagonal", choices=["sequential", "diagonal"])
    p.add_argument("--attention-mask", help="(B, N) .npy of 0/1, right-padded")
    p.add_argument("--state-in", help="memory state .npz to start from (default: empty memory)")
    p.add_argument("--state-out", help="write the final memory state .npz here")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from graphs.arrays import load_npy, save_npy
    from graphs.errors import InputError
    from graphs.modeldir import load_model_dir
    from graphs.state import load_state, save_state

    model = load_model_dir(args.path)
    ids = load_npy(args.input_ids, "input ids")
    if ids.dtype.kind not in "iu":
        raise InputError(f"input ids must be an integer array, got {ids.dtype}")
    mask = None
    if args.attention_mask:
        mask_np = load_npy(args.attention_mask, "attention mask")
        if mask_np.dtype.kind not in "iub":
            raise InputError(f"attention mask must be 0/1 integers, got {mask_np.dtype}")
        mask = torch.from_numpy(mask_np.astype(np.int64))
    state = load_state(args.state_in, model.model_id()) if args.state_in else None
    with torch.no_grad():
        out = model(torch.from_numpy(ids.astype(np.int64)), attention_mask=mask, state=state,
                    schedule=args.schedule)
    save_npy(args.output, out.logits.numpy().astype(np.float32))
    if args.state_out:
        save_state(args.state_out, out.state, model.model_id())
    log.info("wrote logits %s to %s", tuple(out.logits.shape), Path(args.output))
    return 0
