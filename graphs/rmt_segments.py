"""RMT segment slots: [read memory | tokens | padding | write memory] (numpy, no torch).

The official RMT feeds a segment of t tokens as `[memory (M) | tokens (t) | memory (M)]` (the same
memory vectors as read block in front and write block behind, 2M + t positions) and runs a short
last segment as a shorter sequence. A batch here has one slot shape per segment: W token places
(the widest row of the segment) and P = W + 2M places in all. A row with c < W tokens is padded
between its tokens and its write block:

    slot:       | r0 .. r(M-1) | t0 .. t(c-1) | pad .. pad | w0 .. w(M-1)     |
    positions:    0 .. M-1       M .. M+c-1     0 .. 0       M+c .. 2M+c-1        LLaMA; GPT-2 without wrap_pos
                  0 .. M-1       M .. M+c-1     0 .. 0       P0+M .. P0+2M-1      GPT-2 wrap_pos (P0 = n_positions)
    key_valid:    1 .. 1         1 .. 1         0 .. 0       1 .. 1
    write:        c > 0          (a row with no tokens in this segment keeps its memory bit for bit)

Padding keys are hidden from every query (graphs.blocks.attention_mask) and the write block's
positions continue from the row's last real token, so each row computes exactly what it computes
alone, as the official code does for it (positions restart at 0 every segment; with wrap_pos the
token rows M.. of the enlarged position table hold the original table's rows 0..). The write block
always sits at the end of the slot, so the next memory is the last M places of every row.

The read part of a slot (places 0 .. M+c-1) is also what generation feeds: `[memory | prompt]`
with positions 0 .. M+c-1, then M+c+j for the j-th new token (with and without wrap_pos).
"""

from __future__ import annotations

import numpy as np

from graphs.config import ModelConfig
from graphs.slots import Slot, segment_count
from graphs.slots import host_array as _np


def read_block_positions(cfg: ModelConfig) -> np.ndarray:
    """(M,) int64: positions of the read block (the memory in front of the tokens)."""
    return np.arange(cfg.armt.num_mem_tokens, dtype=np.int64)


def write_block_positions(cfg: ModelConfig, counts: np.ndarray) -> np.ndarray:
    """(B, M) int64: positions of the write block of rows with `counts` (B,) tokens in the segment."""
    M = cfg.armt.num_mem_tokens
    j = np.arange(M, dtype=np.int64)[None, :]
    if cfg.armt.wrap_pos:
        return np.broadcast_to(cfg.base.n_positions + M + j, (counts.shape[0], M)).astype(np.int64)
    return (M + counts.astype(np.int64)[:, None] + j).astype(np.int64)


def make_rmt_slots(cfg: ModelConfig, input_ids, lengths, uniform: bool = False,
                   segment_size: int | None = None) -> list[Slot]:
    """Lay out every segment of a right-padded batch for the RMT segment graph. `uniform=True` gives
    every slot width T (one shape for all segments); otherwise each slot is as wide as its longest
    row. `segment_size` overrides the model's T (export samples run at a smaller width)."""
    T, M = segment_size or cfg.armt.segment_size, cfg.armt.num_mem_tokens
    ids_all = _np(input_ids).astype(np.int64)
    lengths = _np(lengths).astype(np.int64)
    B = ids_all.shape[0]
    slots = []
    for s in range(segment_count(lengths, T)):
        start = s * T
        counts = np.clip(lengths - start, 0, T)  # (B,)
        width = T if uniform else int(counts.max())
        j = np.arange(width)
        tok_valid = j[None, :] < counts[:, None]  # (B, W)
        src = np.zeros((B, width), dtype=np.int64)
        part = ids_all[:, start:start + width]
        src[:, :part.shape[1]] = part
        ids = np.where(tok_valid, src, 0)  # (B, W)
        read_pos = np.broadcast_to(read_block_positions(cfg)[None, :], (B, M))  # (B, M)
        tok_pos = np.where(tok_valid, M + j[None, :], 0)  # (B, W)
        positions = np.concatenate([read_pos, tok_pos, write_block_positions(cfg, counts)], axis=1)  # (B, P)
        ones = np.ones((B, M), dtype=bool)
        slots.append(Slot(index=s, ids=ids, positions=positions.astype(np.int64),
                          key_valid=np.concatenate([ones, tok_valid, ones], axis=1), counts=counts, start=start))
    return slots
