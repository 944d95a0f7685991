"""The ARMT in PyTorch: parameters stacked along a layer axis, one cell function, two schedules.

A *cell* (s, l) is segment s through layer l: memory read, decoder block, memory write. Cell (s, l)
needs (s, l-1) (its input) and (s-1, l) (the memory of layer l), so:

    sequential   for s: for l: cell(s, l)                        S * L calls of n = 1 layer
    diagonal     for each step of graphs.schedule: its cells      S + L - 1 calls of n <= L layers

    layer  3 |          .  (0,3) (1,3) (2,3)        t = step; at step t the active layers are a
    layer  2 |       (0,2) (1,2) (2,2)  .            contiguous range step.lo .. step.hi, so their
    layer  1 |    (0,1) (1,1) (2,1)  .               stacked weights are a plain slice
    layer  0 | (0,0) (1,0) (2,0)  .                  (graphs/schedule.py owns the index arithmetic).
             +------------------------------ t
               0     1     2     3     4     5

Both schedules run the same cell code on the same numbers, so they agree to fp32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from graphs.blocks import BLOCKS, attention_mask, layer_norm, rms_norm, rope_inv_freq, rope_tables
from graphs.config import ModelConfig
from graphs.errors import InputError
from graphs.memory import memory_read, memory_read_fast, memory_write
from graphs.schedule import build_schedule
from graphs.segments import Slot, check_ids, make_slots
from graphs.state import MemoryState, check_state, refuse_pending

SCHEDULES = ("sequential", "diagonal")


def torch_state(state: MemoryState, device: torch.device | str) -> MemoryState:
    """`state` (numpy or torch arrays) as torch tensors on `device`."""
    return MemoryState(*(torch.as_tensor(x).to(device) for x in (state.A, state.z, state.written)))


def block_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Stacked decoder-block parameters, name -> shape (L, ...); matmul weights are (L, in, out)."""
    b = cfg.base
    L, d, F = b.n_layers, b.d_model, b.d_ff
    if b.architecture == "llama":
        shapes = {"attn_norm": (L, d), "qkv": (L, d, b.qkv_width), "o": (L, b.n_heads * b.head_dim, d),
                  "mlp_norm": (L, d), "gate_up": (L, d, 2 * F), "down": (L, F, d)}
        if b.attention_bias:
            shapes.update(qkv_bias=(L, b.qkv_width), o_bias=(L, d))
        if b.mlp_bias:
            shapes.update(gate_up_bias=(L, 2 * F), down_bias=(L, d))
        return shapes
    return {"ln1_w": (L, d), "ln1_b": (L, d), "qkv": (L, d, 3 * d), "qkv_bias": (L, 3 * d),
            "o": (L, d, d), "o_bias": (L, d), "ln2_w": (L, d), "ln2_b": (L, d),
            "fc": (L, d, F), "fc_bias": (L, F), "proj": (L, F, d), "proj_bias": (L, d)}


def memory_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Stacked memory parameters (always fp32)."""
    L, d, dm = cfg.base.n_layers, cfg.base.d_model, cfg.armt.d_mem
    return {"w_q": (L, d, dm), "w_k": (L, d, dm), "w_v": (L, d, d), "w_b": (L, d, 1), "b_b": (L, 1)}


def global_param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Embeddings, memory tokens, final norm and head."""
    b = cfg.base
    shapes = {"embed": (b.vocab_size, b.d_model), "memory": (cfg.armt.num_mem_tokens, b.d_model),
              "final_norm_w": (b.d_model,)}
    if b.architecture == "gpt2":
        shapes.update(pos_embed=(cfg.pos_table_rows, b.d_model), final_norm_b=(b.d_model,))
    if not b.tie_word_embeddings:
        shapes["lm_head"] = (b.d_model, b.vocab_size)
    return shapes


@dataclass
class ArmtOutput:
    logits: torch.Tensor  # (B, N, V) fp32; zero at padding places
    hidden: torch.Tensor  # (B, N, d) fp32, after the final norm
    state: MemoryState
    # segment_states[s]: the state of every layer right after it processed segment s (if traced)
    segment_states: list[MemoryState] = field(default_factory=list)


def layer_cells(cfg: ModelConfig, layers: dict[str, torch.Tensor], mem: dict[str, torch.Tensor], h: torch.Tensor,
                rope, allowed: torch.Tensor, A: torch.Tensor, z: torch.Tensor, written: torch.Tensor,
                write: torch.Tensor, fused: bool = False, fast_memory: bool = False) -> tuple[torch.Tensor, ...]:
    """ARMT cells over n layers, each on its own slot, with those layers' weights: layers / mem
    {name: (n, ...)}; h (n, B, P, d), A (n, B, K, d), z (n, B, K), written/write (n, B) -> new (h, A, z,
    written): the memory read, the decoder block, the memory write from the M memory places."""
    a = cfg.armt
    read = memory_read_fast if fast_memory else memory_read
    h = read(h, mem["w_q"], A, z, written, a.nu)
    h = BLOCKS[cfg.base.architecture](cfg.base, layers, h, rope, allowed, fused)
    m = h[:, :, -a.num_mem_tokens:]  # (n, B, M, d)
    A, z, written = memory_write(m, mem["w_k"], mem["w_v"], mem["w_b"], mem["b_b"], A, z, written,
                                 write, a.nu, a.correction)
    return h, A, z, written


class ArmtModel(nn.Module):
    """Associative Recurrent Memory Transformer over a LLaMA or GPT-2 decoder."""

    def __init__(self, cfg: ModelConfig, init_std: float = 0.02, mem_init_std: float | None = None,
                 seed: int | None = None, empty: bool = False):
        """`empty`: parameters on the meta device, no values and no initialisation (a loader assigns
        the stored tensors: graphs/modeldir.py, `load_state_dict(..., assign=True)`)."""
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def init(shape: tuple[int, ...], name: str, std: float) -> nn.Parameter:
            if empty:
                return nn.Parameter(torch.empty(shape, device="meta"))
            if name.endswith(("norm", "norm_w", "ln1_w", "ln2_w")):
                t = torch.ones(shape)
            elif name.endswith(("_bias", "_b", "b_b")):
                t = torch.zeros(shape)
            else:
                t = torch.randn(shape, generator=gen) * std
            return nn.Parameter(t)

        mem_std = init_std if mem_init_std is None else mem_init_std
        self.globals = nn.ParameterDict({n: init(s, n, init_std) for n, s in global_param_shapes(cfg).items()})
        self.layers = nn.ParameterDict({n: init(s, n, init_std) for n, s in block_param_shapes(cfg).items()})
        self.mem = nn.ParameterDict({n: init(s, n, mem_std) for n, s in memory_param_shapes(cfg).items()})
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

    def cast(self, dtype: torch.dtype) -> "ArmtModel":
        """Layers, embeddings and head to `dtype`; the memory weights stay fp32."""
        for group in (self.globals, self.layers):
            for p in group.values():
                p.data = p.data.to(dtype)
        return self

    def model_id(self) -> str:
        """The id over the config and every weight as they are now (graphs/identity.py); hashes
        every parameter (about 2 GB/s). `recorded_model_id` is the id a model directory recorded
        for the weights it was loaded from (graphs/modeldir.py), None otherwise."""
        from graphs.identity import torch_model_id
        return torch_model_id(self)

    def known_model_id(self) -> str:
        """The recorded id when the model came from a model directory that records one, else model_id()."""
        from graphs.identity import known_model_id
        return known_model_id(self)

    def zero_state(self, batch: int) -> MemoryState:
        """An empty memory for `batch` rows (torch tensors on the model's device)."""
        b = self.cfg.base
        return torch_state(MemoryState.zeros(b.n_layers, batch, self.cfg.armt.d_key, b.d_model), self.device)

    # ---------------------------------------------------------------- the pieces of a step
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Slot input: token embeddings then the M memory vectors. ids (B, W), positions (B, W+M) -> (B, W+M, d)."""
        g = self.globals
        B = ids.shape[0]
        x = torch.cat([g["embed"][ids], g["memory"][None].expand(B, -1, -1)], dim=1)
        if self.cfg.base.architecture == "gpt2":
            x = x + g["pos_embed"][positions]
        return x

    def head(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final norm and LM head. h (B, R, d) -> logits (B, R, V), normed hidden (B, R, d)."""
        x = self.final_norm(h)
        return self.lm_head(x), x

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The base model's final norm: h (B, R, d) -> (B, R, d)."""
        g = self.globals
        eps = self.cfg.base.norm_eps
        if self.cfg.base.architecture == "llama":
            return rms_norm(h[None], g["final_norm_w"][None], eps)[0]
        return layer_norm(h[None], g["final_norm_w"][None], g["final_norm_b"][None], eps)[0]

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """LM head on final-norm hidden states: x (B, R, d) -> logits (B, R, V), the model's dtype."""
        g = self.globals
        return x @ (g["embed"].t() if self.cfg.base.tie_word_embeddings else g["lm_head"])

    def geometry(self, positions: torch.Tensor, key_valid: torch.Tensor
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor]:
        """Rotary tables (LLaMA) and attention mask for stacked slots: (n, B, P) each."""
        rope = rope_tables(positions, self.inv_freq, self.dtype) if self.inv_freq is not None else None
        return rope, attention_mask(key_valid)

    def cells(self, lo: int, hi: int, h: torch.Tensor, rope, allowed: torch.Tensor,
              A: torch.Tensor, z: torch.Tensor, written: torch.Tensor, write: torch.Tensor,
              fused: bool = False, fast_memory: bool = False) -> tuple[torch.Tensor, ...]:
        """Layers lo..hi-1, each on its own slot: h (n, B, P, d), A (n, B, K, d), z (n, B, K),
        written/write (n, B) -> new (h, A, z, written). `fast_memory`: the read of
        graphs.memory.memory_read_fast (what fp16/bf16 opset-23 exports trace; never the reference)."""
        return layer_cells(self.cfg, {k: v[lo:hi] for k, v in self.layers.items()},
                           {k: v[lo:hi] for k, v in self.mem.items()}, h, rope, allowed, A, z, written, write,
                           fused, fast_memory)

    # ---------------------------------------------------------------- schedules
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                state: MemoryState | None = None, schedule: str = "diagonal", fused: bool = False,
                trace: bool = False) -> ArmtOutput:
        if schedule not in SCHEDULES:
            raise InputError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        b = self.cfg.base
        lengths = check_ids(input_ids, b.vocab_size, attention_mask)
        B, N = input_ids.shape
        if state is None:
            state = self.zero_state(B)
        refuse_pending(state)
        check_state(self.cfg, state, B)  # refuses an RMT state too
        state = torch_state(state, self.device)
        slots = make_slots(self.cfg, input_ids, lengths, uniform=(schedule == "diagonal"))
        logits = torch.zeros(B, N, b.vocab_size, device=self.device)
        hidden = torch.zeros(B, N, b.d_model, device=self.device)

        def emit(slot: Slot, h_last: torch.Tensor) -> None:
            lg, hid = self.head(h_last[:, : slot.ids.shape[1]])  # (B, W, V), (B, W, d)
            for row in range(B):
                c = int(slot.counts[row])
                logits[row, slot.start: slot.start + c] = lg[row, :c].float()
                hidden[row, slot.start: slot.start + c] = hid[row, :c].float()

        run = self._sequential if schedule == "sequential" else self._diagonal
        new_state, seg_states = run(slots, state, emit, fused, trace)
        return ArmtOutput(logits=logits, hidden=hidden, state=new_state, segment_states=seg_states)

    def _slot_tensors(self, slot: Slot) -> tuple[torch.Tensor, ...]:
        dev = self.device
        return tuple(torch.from_numpy(x).to(dev) for x in (slot.ids, slot.positions, slot.key_valid, slot.write))

    def _sequential(self, slots, state: MemoryState, emit, fused: bool, trace: bool):
        L = self.cfg.base.n_layers
        A, z, wr = list(state.A.unbind(0)), list(state.z.unbind(0)), list(state.written.unbind(0))
        traced = []
        for slot in slots:
            ids, pos, kv, write = self._slot_tensors(slot)
            h = self.embed(ids, pos)[None]  # (1, B, P, d)
            rope, allowed = self.geometry(pos[None], kv[None])
            for l in range(L):
                h, a_l, z_l, w_l = self.cells(l, l + 1, h, rope, allowed, A[l][None], z[l][None],
                                              wr[l][None], write[None], fused)
                A[l], z[l], wr[l] = a_l[0], z_l[0], w_l[0]
            emit(slot, h[0])
            if trace:
                traced.append(MemoryState(torch.stack(A), torch.stack(z), torch.stack(wr)))
        return MemoryState(torch.stack(A), torch.stack(z), torch.stack(wr)), traced

    def _diagonal(self, slots, state: MemoryState, emit, fused: bool, trace: bool):
        L, S = self.cfg.base.n_layers, len(slots)
        A, z, wr = list(state.A.unbind(0)), list(state.z.unbind(0)), list(state.written.unbind(0))
        traced: list[list[tuple[torch.Tensor, ...]]] = [[None] * L for _ in range(S)] if trace else []
        if S:
            stack = lambda name: torch.from_numpy(np.stack([getattr(s, name) for s in slots])).to(self.device)  # noqa: E731
            pos_all, kv_all, write_all = stack("positions"), stack("key_valid"), stack("write")  # (S, B, P), (S, B)
        outs: list[torch.Tensor | None] = [None] * L  # outs[l]: layer l's output at the previous step
        for step in build_schedule("diagonal", L, S).steps:
            lo, hi = step.lo, step.hi
            inputs = [outs[l - 1] if l > 0 else None for l in range(lo, hi + 1)]
            if step.entering is not None:  # layer 0 works on the entering segment
                ids, pos, _, _ = self._slot_tensors(slots[step.entering])
                inputs[0] = self.embed(ids, pos)
            x = torch.stack(inputs)  # (n, B, P, d)
            seg = torch.tensor(step.segments, device=self.device)  # segment of each active layer
            rope, allowed = self.geometry(pos_all[seg], kv_all[seg])
            y, a_n, z_n, w_n = self.cells(lo, hi + 1, x, rope, allowed, torch.stack(A[lo:hi + 1]),
                                          torch.stack(z[lo:hi + 1]), torch.stack(wr[lo:hi + 1]),
                                          write_all[seg], fused)
            for i, (l, s) in enumerate(zip(range(lo, hi + 1), step.segments)):
                outs[l], A[l], z[l], wr[l] = y[i], a_n[i], z_n[i], w_n[i]
                if trace:
                    traced[s][l] = (a_n[i], z_n[i], w_n[i])
            if step.leaving is not None:
                emit(slots[step.leaving], outs[L - 1])
        seg_states = [MemoryState(*(torch.stack([cell[k] for cell in row]) for k in range(3))) for row in traced]
        return MemoryState(torch.stack(A), torch.stack(z), torch.stack(wr)), seg_states
