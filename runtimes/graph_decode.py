"""The torch decoder with its single-token step captured in a CUDA graph (static KV cache).

The graph, its buffers and the cache are kept across calls of the same batch and cache capacity
(a bench's repeated calls capture once).

A decode step of a 1B model at batch 1 launches some 400 small kernels; run from Python one at a time
they cost more than the weights' read. `GraphDecoder` is a `runtimes.torch_generate.TorchDecoder`
whose one-token steps (an ARMT on a LLaMA base, n = 1: every step after the last prompt segment)
run as one replay of a CUDA graph captured at the first such step of a call:

    host, per step      ids (B, 1), each row's cache length and position -> static device tensors
                        (the memory (A, z, written) too, when a segment boundary replaced it)
    graph               embed -> per layer: memory read, LLaMA block, K/V written at each row's length,
                        attention over the fixed-capacity cache (keys 0 .. length visible) -> head
    host                cache lengths advanced by each row's count (0 for rows that stopped)

The graph's math is graphs/decode.py's for n = 1 (`memory_read`, the same block functions, the
same attention, and `_store`'s places, indexed on the device instead of from the host), so the
tokens and scores are the eager decoder's; `use_graph=False` runs the same static step eagerly
(that is how it is tested on a CPU). Everything else (the prompt's completed segments, the last
prompt segment, the memory write at a boundary, RMTs, GPT-2) is TorchDecoder's own code.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from graphs.blocks import _merge_heads, _rotate_half, _split_heads, linear, rms_norm, rope_tables
from graphs.decode import _attend_cached
from graphs.memory import memory_read
from runtimes.torch_generate import TorchDecoder

log = logging.getLogger("armt.generate")


class GraphDecoder(TorchDecoder):
    backend = "torch-graph"

    def __init__(self, model, device: str = "cpu", precision: str = "fp32", use_graph: bool | None = None):
        super().__init__(model, device=device, precision=precision)
        self.use_graph = self.model.device.type == "cuda" if use_graph is None else use_graph
        self.replays = 0  # graph replays of the current call
        self.static_steps = 0  # steps of the current call through the static step (graph or eager)

    def applies(self) -> bool:
        b = self.cfg.base
        return self.kind == "armt" and b.architecture == "llama"

    def start(self, state, capacity: int) -> None:
        super().start(state, capacity)
        self.replays = self.static_steps = 0
        key = (state.batch, capacity)
        kept = getattr(self, "_kept", None)
        if kept is not None and kept[0] == key:
            # the same shapes as the previous call: keep its cache buffers and captured graph (places
            # at or past a row's length are never read, so the old contents need no clearing)
            _, self._graph, self._static, self._out, self.cache.k, self.cache.v = kept
        else:
            self._graph, self._static, self._out = None, None, None
        self._key = key

    def _keep(self) -> None:
        self._kept = (self._key, self._graph, self._static, self._out, self.cache.k, self.cache.v)

    # ---------------------------------------------------------------- the static step
    def _buffers(self, B: int) -> dict:
        dev = self.model.device
        return {"ids": torch.zeros(B, 1, dtype=torch.int64, device=dev),
                "lengths": torch.zeros(B, dtype=torch.int64, device=dev),
                "positions": torch.zeros(B, 1, dtype=torch.int64, device=dev),
                "places": torch.arange(self.cache.capacity, device=dev),
                "memory": [t.clone() for t in self.memory]}

    def _compute(self) -> torch.Tensor:
        """One token per row through every layer against the cache -> logits (B, 1, V) fp32."""
        m, s, spec = self.model, self._static, self.cfg.base
        B = s["ids"].shape[0]
        Hkv, hd = spec.n_kv_heads, spec.head_dim
        h = m.globals["embed"][s["ids"]]  # (B, 1, d)
        rope = rope_tables(s["positions"][None], m.inv_freq, m.dtype)
        allowed = (s["places"][None, :] <= s["lengths"][:, None])[:, None, None, :]  # (B, 1, 1, C)
        at = s["lengths"][:, None, None, None].expand(B, Hkv, 1, hd)  # each row's new place
        A, z, written = s["memory"]
        for l in range(spec.n_layers):
            h = memory_read(h[None], m.mem["w_q"][l:l + 1], A[l:l + 1], z[l:l + 1], written[l:l + 1],
                            self.cfg.armt.nu)[0]
            h = self._block(l, h[None], rope, allowed, at)[0]
        return self._head(h).float()

    def _block(self, l: int, h: torch.Tensor, rope, allowed: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """graphs.decode._layer's LLaMA block for n = 1, the K/V stored at device places `at`."""
        m, spec = self.model, self.cfg.base
        p = {key: w[l:l + 1] for key, w in m.layers.items()}
        Hq, Hkv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
        x = rms_norm(h, p["attn_norm"], spec.norm_eps)
        qkv = linear(x, p["qkv"], p.get("qkv_bias"))
        q = _split_heads(qkv[..., : Hq * hd], Hq, hd)  # (1, B, Hq, 1, hd)
        k = _split_heads(qkv[..., Hq * hd: (Hq + Hkv) * hd], Hkv, hd)
        v = _split_heads(qkv[..., (Hq + Hkv) * hd:], Hkv, hd)
        cos, sin = rope
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        self.cache.k[l].scatter_(2, at, k[0])
        self.cache.v[l].scatter_(2, at, v[0])
        a = _merge_heads(_attend_cached(q[0], self.cache.k[l], self.cache.v[l], allowed)[None])
        h = h + linear(a, p["o"], p.get("o_bias"))
        x = rms_norm(h, p["mlp_norm"], spec.norm_eps)
        gate_up = linear(x, p["gate_up"], p.get("gate_up_bias"))
        gate, up = gate_up[..., : spec.d_ff], gate_up[..., spec.d_ff:]
        return h + linear(torch.nn.functional.silu(gate) * up, p["down"], p.get("down_bias"))

    def _run_static(self) -> torch.Tensor:
        if not self.use_graph:
            return self._compute()
        if self._graph is None:
            side = torch.cuda.Stream(self.model.device)
            side.wait_stream(torch.cuda.current_stream(self.model.device))
            with torch.cuda.stream(side):  # warm-up off the capture (allocations, kernel selection)
                for _ in range(2):
                    self._compute()
            torch.cuda.current_stream(self.model.device).wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._out = self._compute()
            log.debug("captured the decode step: batch %d, cache capacity %d", self._static["ids"].shape[0],
                      self.cache.capacity)
            self._keep()
        self._graph.replay()
        self.replays += 1
        return self._out

    @torch.no_grad()
    def step(self, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        if not self.applies() or ids.shape[1] != 1:
            return super().step(ids, counts)
        self.cache.check_room(1)
        B = ids.shape[0]
        if self._static is None:
            self._static = self._buffers(B)
            self._keep()
        s = self._static
        for i, current in enumerate(self.memory):  # a boundary's write replaced the memory: into the buffers
            if current is not s["memory"][i]:
                s["memory"][i].copy_(current)
                self.memory[i] = s["memory"][i]
        lengths = self.cache.lengths.astype(np.int64)
        s["ids"].copy_(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)))
        s["lengths"].copy_(torch.from_numpy(lengths))
        s["positions"].copy_(torch.from_numpy(np.where(counts > 0, lengths, 0)[:, None].astype(np.int64)))
        logits = self._run_static().cpu().numpy().copy()  # (B, 1, V)
        self.static_steps += 1
        self.cache.advance(counts)
        return logits
