"""The RMT (Recurrent Memory Transformer, Bulatov et al.) in PyTorch, on the same block math as the ARMT.

The base model (LLaMA or GPT-2, graphs/blocks.py, its blocks unchanged) runs causally over each
segment's slot `[read memory | tokens | write memory]` (graphs/rmt_segments.py); the next memory is
the base model's last hidden state after its final norm at the M write places; logits and hidden
states are those of the token places. Segment 0 reads the learned memory `globals.memory` (M, d).

    segment s:   memory_s (B, M, d) --+--> [memory_s | embed(tokens_s) | memory_s] --L blocks--> final norm
                                       |                                             |        |
                                       |                          logits, hidden (tokens)   write places
                                       '--- rows that hold no tokens keep memory_s --------> memory_{s+1}

Diagonal batching does not apply: segment s+1's first layer needs segment s's last layer (its
memory is segment s's output), so no two cells of different segments are independent. Only the
sequential schedule exists (graphs/contracts.py refuses the diagonal one with one line).

The state is `graphs.state.RmtState(memory, written)`: `written` False means "nothing written yet",
and such a row reads the learned memory (so a zero state is a fresh one, and the graphs need no host
copy of the learned parameter). Everything here runs in the model's dtype (fp32, fp16, bf16): the
memory is a hidden state of that dtype and is fed back as embeddings of that dtype.

Pieces for a decode step (generation over `[memory | tokens]` with a KV cache, the official
`generate`): `read_memory` (the read block's vectors), `embed(..., write_block=False)`, `geometry`,
`layer(l, ...)` (one decoder block), `head`; positions of the read part come from the slot layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from graphs.blocks import BLOCKS, attention_mask, layer_norm, rms_norm, rope_inv_freq, rope_tables
from graphs.config import ModelConfig
from graphs.contracts import DIAGONAL_REFUSAL
from graphs.dtypes import dtype_name
from graphs.errors import ConfigError, InputError
from graphs.model import block_param_shapes, global_param_shapes
from graphs.segments import Slot, check_ids, make_slots
from graphs.state import RmtState, check_state, refuse_pending


def torch_rmt_state(state: RmtState, device: torch.device | str, dtype: torch.dtype) -> RmtState:
    """`state` (numpy or torch arrays) as torch tensors on `device`, the memory in `dtype`."""
    memory = state.memory
    if not isinstance(memory, torch.Tensor):
        memory = np.asarray(memory)
        memory = torch.from_numpy(memory.astype(np.float32) if dtype_name(memory.dtype) == "bfloat16" else memory)
    return RmtState(memory.to(device=device, dtype=dtype), torch.as_tensor(state.written).to(device))


@dataclass
class RmtOutput:
    logits: torch.Tensor  # (B, N, V) fp32; zero at padding places
    hidden: torch.Tensor  # (B, N, d) fp32, after the final norm
    state: RmtState
    # segment_states[s]: the memory right after segment s (if traced)
    segment_states: list[RmtState] = field(default_factory=list)


class RmtModel(nn.Module):
    """Recurrent Memory Transformer over a LLaMA or GPT-2 decoder (no memory weights: M learned vectors)."""

    def __init__(self, cfg: ModelConfig, init_std: float = 0.02, seed: int | None = None, empty: bool = False):
        """`empty`: parameters on the meta device, no values and no initialisation (graphs/modeldir.py)."""
        super().__init__()
        if cfg.kind != "rmt":
            raise ConfigError(f"RmtModel needs an RMT config, got kind {cfg.kind!r}")
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def init(shape: tuple[int, ...], name: str) -> nn.Parameter:
            if empty:
                return nn.Parameter(torch.empty(shape, device="meta"))
            if name.endswith(("norm", "norm_w", "ln1_w", "ln2_w")):
                return nn.Parameter(torch.ones(shape))
            if name.endswith(("_bias", "_b")):
                return nn.Parameter(torch.zeros(shape))
            return nn.Parameter(torch.randn(shape, generator=gen) * init_std)

        self.globals = nn.ParameterDict({n: init(s, n) for n, s in global_param_shapes(cfg).items()})
        self.layers = nn.ParameterDict({n: init(s, n) for n, s in block_param_shapes(cfg).items()})
        if cfg.base.architecture == "llama":
            self.register_buffer("inv_freq", rope_inv_freq(cfg.base), persistent=False)
        else:
            self.inv_freq = None

    # ---------------------------------------------------------------- properties and casting
    @property
    def dtype(self) -> torch.dtype:
        return self.layers["o"].dtype

    @property
    def device(self) -> torch.device:
        return self.layers["o"].device

    def cast(self, dtype: torch.dtype) -> "RmtModel":
        """Every parameter (layers, embeddings, head, learned memory) to `dtype`."""
        for group in (self.globals, self.layers):
            for p in group.values():
                p.data = p.data.to(dtype)
        return self

    def model_id(self) -> str:
        """The id over the config and every weight (the base model's and the learned memory) as they are
        now (graphs/identity.py, the same function as the ARMT's); state files and exports carry it."""
        from graphs.identity import torch_model_id
        return torch_model_id(self)

    def known_model_id(self) -> str:
        """The recorded id when the model came from a model directory that records one, else model_id()."""
        from graphs.identity import known_model_id
        return known_model_id(self)

    def zero_state(self, batch: int) -> RmtState:
        """A fresh memory for `batch` rows (torch, the model's device and dtype)."""
        a = self.cfg.armt
        return RmtState(torch.zeros(batch, a.num_mem_tokens, self.cfg.base.d_model, dtype=self.dtype, device=self.device),
                        torch.zeros(batch, dtype=torch.bool, device=self.device))

    # ---------------------------------------------------------------- the pieces of a segment
    def read_memory(self, memory: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
        """The vectors a segment reads: `memory` (B, M, d) where `written` (B,), else the learned memory."""
        learned = self.globals["memory"][None].to(memory.dtype)  # (1, M, d)
        return torch.where(written[:, None, None], memory, learned)  # (B, M, d)

    def embed(self, ids: torch.Tensor, positions: torch.Tensor, memory: torch.Tensor,
              write_block: bool = True) -> torch.Tensor:
        """Slot input: [memory | token embeddings | memory] (or [memory | tokens] without the write
        block). ids (B, W), positions (B, M+W+M) or (B, M+W), memory (B, M, d) -> (B, P, d)."""
        g = self.globals
        parts = [memory, g["embed"][ids]] + ([memory] if write_block else [])
        x = torch.cat(parts, dim=1)  # (B, P, d)
        if self.cfg.base.architecture == "gpt2":
            x = x + g["pos_embed"][positions]
        return x

    def geometry(self, positions: torch.Tensor, key_valid: torch.Tensor
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor]:
        """Rotary tables (LLaMA) and attention mask of one slot per row: positions, key_valid (1, B, P)."""
        rope = rope_tables(positions, self.inv_freq, self.dtype) if self.inv_freq is not None else None
        return rope, attention_mask(key_valid)

    def layer(self, l: int, h: torch.Tensor, rope, allowed: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """Decoder block l: h (1, B, P, d) -> (1, B, P, d)."""
        params = {k: v[l:l + 1] for k, v in self.layers.items()}
        return BLOCKS[self.cfg.base.architecture](self.cfg.base, params, h, rope, allowed, fused)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The base model's final norm: h (B, R, d) -> (B, R, d)."""
        g, eps = self.globals, self.cfg.base.norm_eps
        if self.cfg.base.architecture == "llama":
            return rms_norm(h[None], g["final_norm_w"][None], eps)[0]
        return layer_norm(h[None], g["final_norm_w"][None], g["final_norm_b"][None], eps)[0]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """LM head on normed hidden states: x (B, R, d) -> logits (B, R, V)."""
        g = self.globals
        return x @ (g["embed"].t() if self.cfg.base.tie_word_embeddings else g["lm_head"])

    lm_head = head  # the name graphs/cells.py's LmHeadCell calls on either kind

    def segment(self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor, write: torch.Tensor,
                memory: torch.Tensor, written: torch.Tensor, fused: bool = False, head: bool = True
                ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One segment slot through the base model.

        ids (B, W); positions, key_valid (B, W + 2M); write (B,); memory (B, M, d); written (B,)
        -> logits (B, W, V) (None with head=False), hidden (B, W, d) (the model's dtype, after the
           final norm), memory_out (B, M, d) (rows with write False: `memory` bit for bit), written_out (B,)."""
        M, W = self.cfg.armt.num_mem_tokens, ids.shape[1]
        h = self.embed(ids, positions, self.read_memory(memory, written))[None]  # (1, B, P, d)
        rope, allowed = self.geometry(positions[None], key_valid[None])
        for l in range(self.cfg.base.n_layers):
            h = self.layer(l, h, rope, allowed, fused)
        x = self.final_norm(h[0])  # (B, P, d)
        hidden = x[:, M:M + W]  # (B, W, d)
        new = torch.where(write[:, None, None], x[:, -M:], memory)  # (B, M, d)
        return self.head(hidden) if head else None, hidden, new, written | write

    # ---------------------------------------------------------------- the schedule
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                state: RmtState | None = None, schedule: str = "sequential", fused: bool = False,
                trace: bool = False) -> RmtOutput:
        """The sequential schedule over a right-padded batch (B, N); `state` default: fresh memory."""
        if schedule != "sequential":
            raise InputError(DIAGONAL_REFUSAL if schedule == "diagonal" else
                             f"schedule must be sequential for an RMT, got {schedule!r}")
        b = self.cfg.base
        lengths = check_ids(input_ids, b.vocab_size, attention_mask)
        B, N = input_ids.shape
        state = self.zero_state(B) if state is None else state
        refuse_pending(state)
        check_state(self.cfg, state, B)
        state = torch_rmt_state(state, self.device, self.dtype)
        logits = torch.zeros(B, N, b.vocab_size, device=self.device)
        hidden = torch.zeros(B, N, b.d_model, device=self.device)
        memory, written = state.memory, state.written
        traced = []
        for slot in make_slots(self.cfg, input_ids, lengths, uniform=False):
            ids, pos, kv, write = self._slot_tensors(slot)
            lg, hid, memory, written = self.segment(ids, pos, kv, write, memory, written, fused)
            self._emit(slot, lg, hid, logits, hidden)
            if trace:
                traced.append(RmtState(memory, written))
        return RmtOutput(logits=logits, hidden=hidden, state=RmtState(memory, written), segment_states=traced)

    def _slot_tensors(self, slot: Slot) -> tuple[torch.Tensor, ...]:
        dev = self.device
        return tuple(torch.from_numpy(x).to(dev) for x in (slot.ids, slot.positions, slot.key_valid, slot.write))

    @staticmethod
    def _emit(slot: Slot, lg: torch.Tensor, hid: torch.Tensor, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        for row, c in enumerate(slot.counts.tolist()):
            logits[row, slot.start: slot.start + c] = lg[row, :c].float()
            hidden[row, slot.start: slot.start + c] = hid[row, :c].float()
