"""Cut a (possibly right-padded) batch into segment slots: token ids, positions, key masks (numpy).

A slot holds `width` token places followed by the M memory tokens. Row b of segment s carries
c = clamp(n_b - s*T, 0, T) real tokens; a shorter row is padded *between* its tokens and the memory:

    slot:      | t0 t1 .. t(c-1) | pad .. pad | m0 .. m(M-1) |
    positions:   0  1  .. c-1      0 .. 0       c .. c+M-1        (LLaMA, GPT-2)
                                                P0-M .. P0-1      (GPT-2 wrap_pos, P0 = table rows)
    key_valid:   1  1  .. 1        0 .. 0       1 .. 1

Padding keys are masked out of attention and positions continue from the last real token, so each
row computes exactly what it would alone. A row with c = 0 (it ended earlier) does not write memory.
Everything here is numpy (no torch): the runtimes lay out slots on hosts without torch too.
"""

from __future__ import annotations

import numpy as np

from graphs.config import ModelConfig
from graphs.errors import InputError
from graphs.slots import Slot, segment_count  # noqa: F401  (Slot: re-exported)
from graphs.slots import host_array as _np


def row_lengths(input_ids, attention_mask) -> np.ndarray:
    """(B,) int64 lengths; the mask must be 0/1 and right-padded (ones, then zeros)."""
    B, N = input_ids.shape
    if attention_mask is None:
        return np.full((B,), N, dtype=np.int64)
    mask = _np(attention_mask)
    if tuple(mask.shape) != (B, N):
        raise InputError(f"attention mask has shape {tuple(mask.shape)}, ids have {(B, N)}")
    mask = mask.astype(np.int64)
    if ((mask != 0) & (mask != 1)).any():
        raise InputError("attention mask must hold only 0 and 1")
    lengths = mask.sum(-1)
    expected = (np.arange(N)[None, :] < lengths[:, None]).astype(np.int64)
    if not np.array_equal(mask, expected):
        raise InputError("attention mask must be right-padded: each row ones, then zeros")
    return lengths


def make_slots(cfg: ModelConfig, input_ids, lengths, uniform: bool, segment_size: int | None = None) -> list[Slot]:
    """Lay out every segment. `uniform=True` gives every slot width T (the diagonal schedule needs
    one shape for all layers); otherwise each slot is as wide as its longest row. `segment_size`
    overrides the model's T (export samples run the width-agnostic graphs at a smaller width).
    An RMT's slots ([memory | tokens | memory]) come from graphs.rmt_segments."""
    if cfg.kind == "rmt":
        from graphs.rmt_segments import make_rmt_slots
        return make_rmt_slots(cfg, input_ids, lengths, uniform, segment_size)
    T, M = segment_size or cfg.armt.segment_size, cfg.armt.num_mem_tokens
    ids_all = _np(input_ids).astype(np.int64)
    lengths = _np(lengths).astype(np.int64)
    B, N = ids_all.shape
    slots = []
    for s in range(segment_count(lengths, T)):
        start = s * T
        counts = np.clip(lengths - start, 0, T)  # (B,)
        width = T if uniform else int(counts.max())
        j = np.arange(width)
        tok_valid = j[None, :] < counts[:, None]  # (B, width)
        src = np.zeros((B, width), dtype=np.int64)
        part = ids_all[:, start:start + width]
        src[:, :part.shape[1]] = part
        ids = np.where(tok_valid, src, 0)
        tok_pos = np.where(tok_valid, j[None, :], 0).astype(np.int64)
        if cfg.armt.wrap_pos:
            mem_pos = np.broadcast_to(np.arange(cfg.pos_table_rows - M, cfg.pos_table_rows)[None, :], (B, M))
        else:
            mem_pos = counts[:, None] + np.arange(M)[None, :]
        slots.append(Slot(
            index=s,
            ids=ids,
            positions=np.concatenate([tok_pos, mem_pos], axis=1).astype(np.int64),
            key_valid=np.concatenate([tok_valid, np.ones((B, M), dtype=bool)], axis=1),
            counts=counts,
            start=start,
        ))
    return slots


def check_ids(input_ids, vocab_size: int, attention_mask) -> np.ndarray:
    """Validate ids (integer, (B, N), inside the vocabulary at real places) and the mask; return lengths (B,)."""
    shape = tuple(input_ids.shape)
    if len(shape) != 2:
        raise InputError(f"input ids must be 2-D (batch, tokens), got shape {shape}")
    dtype = str(input_ids.dtype).replace("torch.", "")
    if dtype not in ("int64", "int32"):
        raise InputError(f"input ids must be int64, got {dtype}")
    ids = _np(input_ids)
    lengths = row_lengths(ids, attention_mask)
    real = ids[np.arange(ids.shape[1])[None, :] < lengths[:, None]]
    if real.size and (int(real.min()) < 0 or int(real.max()) >= vocab_size):
        raise InputError(f"input ids must lie in [0, {vocab_size}), got [{int(real.min())}, {int(real.max())}]")
    return lengths
