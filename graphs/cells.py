"""The graph-shaped cells: what the exporter traces and what the torch runner executes.

Each implements one graph role of graphs/contracts.py (CELLS maps role -> cell class): its forward
takes the contract's inputs in order and returns its outputs in order. The memory state is an
explicit input and output. They hold no state between calls and do no host-side arithmetic, so the same
call sequence gives the same numbers on torch, ONNX Runtime and TensorRT.

    SegmentCell     one slot through all L layers (sequential schedule)
    DiagonalStep    one anti-diagonal: L slots, one per layer, idle layers masked by `active`
    RmtSegmentCell  an RMT's [memory | tokens | memory] slot through all L layers (graphs/rmt.py)
    *Causal         the three above with every key valid (the causal variants: full slots)
    LmHeadCell      final-norm hidden rows -> logits (either kind; logits on demand)
    DecodeCell      generation: new tokens against a KV cache, the memory read (graphs/decode.py)
    MemoryWriteCell generation, recurrent: the M memory places against the cache write (A, z)
    RmtDecodeCell   generation on an RMT: [read memory | tokens] (rows that start a segment) or
                    tokens against a KV cache
    RmtMemoryWriteCell  generation on an RMT, recurrent: the write block against the cache -> memory

The step cells output the final-norm hidden state (float32) and no logits (the decode cells do
output the logits of their new places): a caller that wants
logits runs LmHeadCell on the rows it wants (runtimes/execute.py).

DiagonalStep data flow (one call = one step t):

    input_ids --embed--> x[0]            hidden_in[0..L-2] --> x[1..L-1]   (the shift is in-graph)
    x (L, B, P, d) --read / block / write, per layer--> y (L, B, P, d)
    hidden_out = where(active, y, hidden_in);  state_out = where(active & write, new, old)
    hidden = final_norm(hidden_out[L-1])         (the segment that leaves the pipeline)
"""

from __future__ import annotations

import torch
from torch import nn

from graphs.contracts import (DECODE, DIAGONAL_STEP, DIAGONAL_STEP_CAUSAL, LM_HEAD, MEMORY_WRITE, RMT_DECODE,
                              RMT_MEMORY_WRITE, RMT_SEGMENT, RMT_SEGMENT_CAUSAL, SEGMENT, SEGMENT_CAUSAL)
from graphs.decode import ArmtMemoryWrites, decode_layers
from graphs.model import ArmtModel
from graphs.rmt import RmtModel


class SegmentCell(nn.Module):
    """Sequential-schedule graph: one segment slot through every layer."""

    def __init__(self, model: ArmtModel, fused: bool = False, fast_memory: bool = False):
        super().__init__()
        self.model = model
        self.fused = fused  # fused SDPA attention (torch only; the exporter traces fused=False)
        self.fast_memory = fast_memory  # graphs.memory.memory_read_fast (fp16/bf16 opset-23 exports)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                write: torch.Tensor, A_in: torch.Tensor, z_in: torch.Tensor, written_in: torch.Tensor):
        """input_ids (B, W); positions, key_valid (B, P); write (B,); A_in (L, B, K, d); z_in (L, B, K);
        written_in (L, B) -> hidden (B, W, d) f32 (after the final norm), A_out, z_out, written_out."""
        m = self.model
        width = input_ids.shape[1]
        h = m.embed(input_ids, positions)[None]  # (1, B, P, d)
        rope, allowed = m.geometry(positions[None], key_valid[None])
        A, z, wr = [], [], []
        for l in range(m.cfg.base.n_layers):
            h, a_l, z_l, w_l = m.cells(l, l + 1, h, rope, allowed, A_in[l:l + 1], z_in[l:l + 1],
                                       written_in[l:l + 1], write[None], self.fused,
                                       self.fast_memory)
            A.append(a_l)
            z.append(z_l)
            wr.append(w_l)
        hidden = m.final_norm(h[0, :, :width])  # (B, W, d)
        return hidden.float(), torch.cat(A), torch.cat(z), torch.cat(wr)


class DiagonalStep(nn.Module):
    """Diagonal-schedule graph: every layer works on its own segment slot in one batched call."""

    def __init__(self, model: ArmtModel, fused: bool = False, fast_memory: bool = False):
        super().__init__()
        self.model = model
        self.fused = fused  # fused SDPA attention (torch only; the exporter traces fused=False)
        self.fast_memory = fast_memory  # graphs.memory.memory_read_fast (fp16/bf16 opset-23 exports)

    def forward(self, input_ids: torch.Tensor, hidden_in: torch.Tensor, positions: torch.Tensor,
                key_valid: torch.Tensor, active: torch.Tensor, write: torch.Tensor, A_in: torch.Tensor,
                z_in: torch.Tensor, written_in: torch.Tensor):
        """input_ids (B, W); hidden_in (L, B, P, d); positions, key_valid (L, B, P); active (L,);
        write (L, B); A_in (L, B, K, d); z_in (L, B, K); written_in (L, B)
        -> hidden_out (L, B, P, d), hidden (B, W, d) f32 (after the final norm), A_out, z_out, written_out."""
        m = self.model
        L = m.cfg.base.n_layers
        width = input_ids.shape[1]
        x0 = m.embed(input_ids, positions[0])[None]  # (1, B, P, d)
        x = torch.cat([x0, hidden_in[: L - 1]], dim=0)  # (L, B, P, d)
        rope, allowed = m.geometry(positions, key_valid)
        live = write & active[:, None]  # (L, B): idle layers never write
        y, A, z, wr = m.cells(0, L, x, rope, allowed, A_in, z_in, written_in, live, self.fused, self.fast_memory)
        hidden_out = torch.where(active[:, None, None, None], y, hidden_in)  # (L, B, P, d)
        hidden = m.final_norm(hidden_out[L - 1, :, :width])  # (B, W, d)
        return hidden_out, hidden.float(), A, z, wr


class RmtSegmentCell(nn.Module):
    """RMT segment graph: one [read memory | tokens | write memory] slot through the base model."""

    def __init__(self, model: RmtModel, fused: bool = False, fast_memory: bool = False):
        super().__init__()  # `fast_memory` does not apply (an RMT has no associative memory)
        self.model = model
        self.fused = fused  # fused SDPA attention (torch only; the exporter traces fused=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                write: torch.Tensor, memory_in: torch.Tensor, written_in: torch.Tensor):
        """input_ids (B, W); positions, key_valid (B, W + 2M); write (B,); memory_in (B, M, d) compute
        dtype; written_in (B,) -> hidden (B, W, d) f32, memory_out (B, M, d), written_out (B,)."""
        _, hidden, memory, written = self.model.segment(input_ids, positions, key_valid, write, memory_in,
                                                        written_in, self.fused, head=False)
        return hidden.float(), memory, written


# ------------------------------------------------------------------ causal variants (full slots)
# The same cell with every key valid: the slot mask causal & (key_valid | diag) is then exactly causal,
# so the exporter traces one is_causal Attention node without a mask (blocks.ONNX_CAUSAL) and the
# key_valid input is only part of the I/O (the contract is the masked role's). On a feed whose active
# slots are full (contracts.slots_full) it computes what the masked cell computes.
class SegmentCausalCell(SegmentCell):
    """segment_causal: SegmentCell with every key valid."""

    def forward(self, input_ids, positions, key_valid, write, A_in, z_in, written_in):
        return super().forward(input_ids, positions, torch.ones_like(key_valid), write, A_in, z_in, written_in)


class DiagonalStepCausal(DiagonalStep):
    """diagonal_step_causal: DiagonalStep with every key of every layer's slot valid."""

    def forward(self, input_ids, hidden_in, positions, key_valid, active, write, A_in, z_in, written_in):
        return super().forward(input_ids, hidden_in, positions, torch.ones_like(key_valid), active, write,
                               A_in, z_in, written_in)


class RmtSegmentCausalCell(RmtSegmentCell):
    """rmt_segment_causal: RmtSegmentCell with every key valid ([read | tokens | write], no padding)."""

    def forward(self, input_ids, positions, key_valid, write, memory_in, written_in):
        return super().forward(input_ids, positions, torch.ones_like(key_valid), write, memory_in, written_in)


def pos_embed(model, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """GPT-2: add the learned position rows (the decoder checks the table's bound on the host)."""
    if model.cfg.base.architecture == "gpt2":
        return x + model.globals["pos_embed"][positions]
    return x


class DecodeCell(nn.Module):
    """ARMT generation step: the graph of graphs/decode.py `decode_layers` + the LM head."""

    def __init__(self, model: ArmtModel, fused: bool = False, fast_memory: bool = False):
        super().__init__()
        self.model = model  # attention is always written out here (explicit cache masks)
        self.fast_memory = fast_memory  # graphs.memory.memory_read_fast (fp16/bf16 opset-23 exports)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                k_cache_in: torch.Tensor, v_cache_in: torch.Tensor, A_in: torch.Tensor, z_in: torch.Tensor,
                written_in: torch.Tensor):
        """input_ids, positions (B, n); lengths (B,); k/v_cache_in (L, B, Hkv, C, hd); A_in, z_in,
        written_in: the memory every layer reads -> logits (B, n, V) f32, k_cache_out, v_cache_out."""
        m = self.model
        x = pos_embed(m, m.globals["embed"][input_ids], positions)  # (B, n, d)
        h, k, v = decode_layers(m, x, positions, lengths, k_cache_in, v_cache_in, (A_in, z_in, written_in),
                                fast_memory=self.fast_memory)
        return m.head(h)[0].float(), k, v


class MemoryWriteCell(nn.Module):
    """ARMT segment boundary while generating: graphs/decode.py `ArmtMemoryWrites` over decode_layers."""

    def __init__(self, model: ArmtModel, fused: bool = False, fast_memory: bool = False):
        super().__init__()
        self.model = model
        self.fast_memory = fast_memory  # graphs.memory.memory_read_fast (fp16/bf16 opset-23 exports)

    def forward(self, positions: torch.Tensor, lengths: torch.Tensor, k_cache_in: torch.Tensor,
                v_cache_in: torch.Tensor, write: torch.Tensor, A_in: torch.Tensor, z_in: torch.Tensor,
                written_in: torch.Tensor):
        """positions (B, M); lengths (B,); k/v_cache_in (L, B, Hkv, C, hd); write (B,); the memory
        -> A_out, z_out, written_out (rows with write False: bit for bit the input)."""
        m = self.model
        B = positions.shape[0]
        x = pos_embed(m, m.globals["memory"][None].expand(B, -1, -1), positions)  # (B, M, d)
        memory = (A_in, z_in, written_in)
        writes = ArmtMemoryWrites(m, memory, write)
        decode_layers(m, x, positions, lengths, k_cache_in, v_cache_in, memory, writes, fast_memory=self.fast_memory)
        return writes.stacked()


class RmtDecodeCell(nn.Module):
    """RMT generation step: the places [read memory | tokens] of rows with `read`, [tokens | junk]
    of the others, through the base model against the cache; logits of the token places."""

    def __init__(self, model: RmtModel, fused: bool = False, fast_memory: bool = False):
        super().__init__()  # `fast_memory` does not apply (an RMT has no associative memory)
        self.model = model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, read: torch.Tensor,
                k_cache_in: torch.Tensor, v_cache_in: torch.Tensor, memory_in: torch.Tensor, written_in: torch.Tensor):
        """input_ids (B, n); positions (B, M+n); lengths (B,); read (B,); k/v_cache_in (L, B, Hkv, C, hd);
        memory_in (B, M, d); written_in (B,) -> logits (B, n, V) f32, k_cache_out, v_cache_out."""
        m = self.model
        M = m.cfg.armt.num_mem_tokens
        n = input_ids.shape[1]
        full = torch.cat([m.read_memory(memory_in, written_in), m.globals["embed"][input_ids]], dim=1)  # (B, M+n, d)
        place = torch.arange(M + n, device=input_ids.device)[None, :]  # (1, M+n)
        shift = torch.where(read, 0, M)[:, None]  # (B, 1): where each row's places start in `full`
        src = torch.clamp(place + shift, max=M + n - 1)  # (B, M+n)
        x = torch.gather(full, 1, src[..., None].expand(-1, -1, full.shape[-1]))
        x = pos_embed(m, x, positions)
        h, k, v = decode_layers(m, x, positions, lengths, k_cache_in, v_cache_in, None)
        tok = place[:, :n] + torch.where(read, M, 0)[:, None]  # (B, n): the token places
        h = torch.gather(h, 1, tok[..., None].expand(-1, -1, h.shape[-1]))
        return m.head(m.final_norm(h)).float(), k, v


class RmtMemoryWriteCell(nn.Module):
    """RMT segment boundary while generating: the write block against the cached segment."""

    def __init__(self, model: RmtModel, fused: bool = False, fast_memory: bool = False):
        super().__init__()  # `fast_memory` does not apply (an RMT has no associative memory)
        self.model = model

    def forward(self, positions: torch.Tensor, lengths: torch.Tensor, k_cache_in: torch.Tensor,
                v_cache_in: torch.Tensor, write: torch.Tensor, memory_in: torch.Tensor, written_in: torch.Tensor):
        """positions (B, M); lengths (B,); k/v_cache_in (L, B, Hkv, C, hd); write (B,); memory_in
        (B, M, d); written_in (B,) -> memory_out (B, M, d) (rows with write False: memory_in), written_out."""
        m = self.model
        x = pos_embed(m, m.read_memory(memory_in, written_in), positions)  # (B, M, d)
        h, _, _ = decode_layers(m, x, positions, lengths, k_cache_in, v_cache_in, None)
        new = m.final_norm(h)
        return torch.where(write[:, None, None], new, memory_in), written_in | write


class LmHeadCell(nn.Module):
    """LM head graph: final-norm hidden rows (float32, as the step graphs output them) -> logits."""

    def __init__(self, model: ArmtModel | RmtModel, fused: bool = False, fast_memory: bool = False):
        super().__init__()
        self.model = model  # `fused` and `fast_memory` do not apply (no attention, no memory)

    def forward(self, hidden: torch.Tensor):
        """hidden (B, R, d) f32 -> logits (B, R, V) f32: the hidden state back in the compute dtype
        (exact: it was produced in it), times the head weight, as float32."""
        return (self.model.lm_head(hidden.to(self.model.dtype)).float(),)


CELLS: dict[str, type[nn.Module]] = {SEGMENT: SegmentCell, DIAGONAL_STEP: DiagonalStep, RMT_SEGMENT: RmtSegmentCell,
                                     LM_HEAD: LmHeadCell, DECODE: DecodeCell, MEMORY_WRITE: MemoryWriteCell,
                                     RMT_DECODE: RmtDecodeCell, RMT_MEMORY_WRITE: RmtMemoryWriteCell,
                                     SEGMENT_CAUSAL: SegmentCausalCell, DIAGONAL_STEP_CAUSAL: DiagonalStepCausal,
                                     RMT_SEGMENT_CAUSAL: RmtSegmentCausalCell}


def cell_for(model: ArmtModel | RmtModel, role: str, fused: bool = False, fast_memory: bool = False) -> nn.Module:
    """The cell module of graph `role` over `model` (eval mode). `fast_memory`: the ARMT cells read
    the memory with graphs.memory.memory_read_fast (the exporter's fp16/bf16 opset-23 graphs only)."""
    return CELLS[role](model, fused, fast_memory).eval()
