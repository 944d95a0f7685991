"""Cut a (possibly right-padded) batch into segment slots: token ids, positions, key masks.

A slot holds `width` token places followed by the M memory tokens. Row b of segment s carries
c = clamp(n_b - s*T, 0, T) real tokens; a shorter row is padded *between* its tokens and the memory:

    slot:      | t0 t1 .. t(c-1) | pad .. pad | m0 .. m(M-1) |
    positions:   0  1  .. c-1      0 .. 0       c .. c+M-1        (LLaMA, GPT-2)
                                                P0-M .. P0-1      (GPT-2 wrap_pos, P0 = table rows)
    key_valid:   1  1  .. 1        0 .. 0       1 .. 1

Padding keys are masked out of attention and positions continue from the last real token, so each
row computes exactly what it would alone. A row with c = 0 (it ended earlier) does not write memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphs.config import ModelConfig
from graphs.errors import InputError


@dataclass
class Slot:
    """One segment of a batch, laid out for the layers."""

    index: int  # segment number s within this call
    ids: torch.Tensor  # (B, width) int64, padding places hold token 0
    positions: torch.Tensor  # (B, width + M) int64
    key_valid: torch.Tensor  # (B, width + M) bool
    counts: torch.Tensor  # (B,) int64: real tokens of each row in this segment
    start: int  # offset of the segment's first token in the call's input

    @property
    def write(self) -> torch.Tensor:
        """(B,) bool: rows that hold tokens here and so write their memory."""
        return self.counts > 0


def row_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B,) int64 lengths; the mask must be 0/1 and right-padded (ones, then zeros)."""
    B, N = input_ids.shape
    if attention_mask is None:
        return torch.full((B,), N, dtype=torch.int64)
    if tuple(attention_mask.shape) != (B, N):
        raise InputError(f"attention mask has shape {tuple(attention_mask.shape)}, ids have {(B, N)}")
    mask = attention_mask.to(torch.int64)
    if bool(((mask != 0) & (mask != 1)).any()):
        raise InputError("attention mask must hold only 0 and 1")
    lengths = mask.sum(-1)
    expected = (torch.arange(N)[None, :] < lengths[:, None]).to(torch.int64)
    if not torch.equal(mask, expected):
        raise InputError("attention mask must be right-padded: each row ones, then zeros")
    return lengths


def segment_count(lengths: torch.Tensor, segment_size: int) -> int:
    """Number of segments needed for the longest row."""
    longest = int(lengths.max()) if lengths.numel() else 0
    return -(-longest // segment_size)


def make_slots(cfg: ModelConfig, input_ids: torch.Tensor, lengths: torch.Tensor,
               uniform: bool) -> list[Slot]:
    """Lay out every segment. `uniform=True` gives every slot width T (the diagonal schedule needs
    one shape for all layers); otherwise each slot is as wide as its longest row."""
    T, M = cfg.armt.segment_size, cfg.armt.num_mem_tokens
    B, N = input_ids.shape
    slots = []
    for s in range(segment_count(lengths, T)):
        start = s * T
        counts = (lengths - start).clamp(0, T)  # (B,)
        width = T if uniform else int(counts.max())
        j = torch.arange(width)
        tok_valid = j[None, :] < counts[:, None]  # (B, width)
        src = input_ids[:, start:start + width]
        if src.shape[1] < width:
            src = torch.cat([src, src.new_zeros(B, width - src.shape[1])], dim=1)
        ids = torch.where(tok_valid, src, torch.zeros_like(src))
        tok_pos = torch.where(tok_valid, j[None, :].expand(B, width), torch.zeros(B, width, dtype=torch.int64))
        if cfg.armt.wrap_pos:
            mem_pos = torch.arange(cfg.pos_table_rows - M, cfg.pos_table_rows)[None, :].expand(B, M)
        else:
            mem_pos = counts[:, None] + torch.arange(M)[None, :]
        slots.append(Slot(
            index=s,
            ids=ids,
            positions=torch.cat([tok_pos, mem_pos], dim=1),
            key_valid=torch.cat([tok_valid, torch.ones(B, M, dtype=torch.bool)], dim=1),
            counts=counts,
            start=start,
        ))
    return slots


def check_ids(input_ids: torch.Tensor, vocab_size: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Validate ids (integer, (B, N), inside the vocabulary at real places) and the mask; return lengths (B,)."""
    if input_ids.dim() != 2:
        raise InputError(f"input ids must be 2-D (batch, tokens), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input ids must be int64, got {input_ids.dtype}")
    lengths = row_lengths(input_ids, attention_mask)
    real = input_ids[torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab_size):
        raise InputError(f"input ids must lie in [0, {vocab_size}), got [{int(real.min())}, {int(real.max())}]")
    return lengths
