"""Decoding with a KV cache on the torch models: the pieces generation is made of (ARMT and RMT).

One function runs new places through every layer against the cache (`cached_layers`): each layer
(ARMT) first reads its frozen memory into every new hidden state, computes the new keys/values,
writes them into the cache at each row's own places (graphs/kv_cache.py) and attends over the
cache with an explicit (query, key) mask. The same function serves

    prefill of the last prompt segment     n = that segment's widest row (an RMT: [memory | tokens])
    one new token                          n = 1 (an RMT row that starts a segment: [memory | token])
    the memory write at a segment boundary the M memory places (ARMT: written into (A, z) after every
                                           layer; RMT: the write block, whose final-norm hidden state
                                           is the next memory); not kept in the cache

so the cached path computes, place for place, what `armt run` computes over the whole segment:
causal attention means the segment's tokens never see the memory places behind them.

    x        (B, n, d)            new places, embedded
    cache.k  (L, B, Hkv, C, hd)   keys of the current segment (C = capacity)
    A, z     (L, B, K, d), (L, B, K)  the memory every layer reads (ARMT)
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from graphs.blocks import (_merge_heads, _projections, _rotate_half, _split_heads, gelu_tanh,
                           layer_norm, linear, rms_norm, rope_tables)
from graphs.kv_cache import KvCache
from graphs.memory import memory_read, memory_read_fast, memory_write

LayerHook = Callable[[int, torch.Tensor], None]


def empty_cache(model, batch: int, capacity: int) -> KvCache:
    """A torch KV cache for `model` (either kind) on its device and dtype."""
    b = model.cfg.base
    shape = (b.n_layers, batch, b.n_kv_heads if b.architecture == "llama" else b.n_heads, capacity, b.head_dim)
    k = torch.zeros(shape, dtype=model.dtype, device=model.device)
    return KvCache(k, torch.zeros_like(k), np.zeros(batch, dtype=np.int64))


def _attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """q (B, H, n, hd), k/v (B, Hkv, C, hd), allowed (B, 1, n, C) -> (B, H, n, hd); the math of
    graphs.blocks.attend (scaled scores, -inf where hidden, fp32 softmax)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, n, C)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def key_mask(lengths: torch.Tensor, n: int, capacity: int) -> torch.Tensor:
    """(B, n, capacity) bool, as tensors (traceable): query j of row b sees keys 0 .. lengths[b] + j
    (graphs.kv_cache.step_key_mask's rule)."""
    keys = torch.arange(capacity, device=lengths.device)[None, None, :]
    last = lengths[:, None, None] + torch.arange(n, device=lengths.device)[None, :, None]
    return keys <= last


def _store(k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Write new keys/values k, v (B, Hkv, n, hd) into one layer's k_cache/v_cache (B, Hkv, C, hd) at
    places lengths[b] .. lengths[b]+n-1 (lengths (B,) int64 tensor). `inplace` False: new tensors
    (the traced graphs: a graph never writes its inputs)."""
    n = k.shape[2]
    idx = lengths[:, None] + torch.arange(n, device=k.device)[None, :]  # (B, n)
    idx = idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, Hkv, n, hd)
    if inplace:
        return k_cache.scatter_(2, idx, k), v_cache.scatter_(2, idx, v)
    return k_cache.scatter(2, idx, k), v_cache.scatter(2, idx, v)


def _layer(spec, p: dict[str, torch.Tensor], h: torch.Tensor, rope, allowed: torch.Tensor, k_cache: torch.Tensor,
           v_cache: torch.Tensor, lengths: torch.Tensor, inplace: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decoder block with weights p {name: (1, ...)} on new places h (B, n, d) against its layer's
    cache (B, Hkv, C, hd) -> (B, n, d), the layer's cache with the new keys/values stored."""
    h = h[None]  # (1, B, n, d): the block functions' layer axis
    if spec.architecture == "llama":
        Hq, Hkv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
        x = rms_norm(h, p["attn_norm"], spec.norm_eps)
        q, k, v = _projections(x, p, spec, "qkv")  # separate or sliced
        q, k, v = _split_heads(q, Hq, hd), _split_heads(k, Hkv, hd), _split_heads(v, Hkv, hd)  # (1, B, H, n, hd)
        cos, sin = rope
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
    else:
        H, hd, d = spec.n_heads, spec.head_dim, spec.d_model
        x = layer_norm(h, p["ln1_w"], p["ln1_b"], spec.norm_eps)
        qkv = linear(x, p["qkv"], p["qkv_bias"])
        q, k, v = (_split_heads(qkv[..., i * d: (i + 1) * d], H, hd) for i in range(3))
    k_cache, v_cache = _store(k_cache, v_cache, lengths, k[0], v[0], inplace)
    a = _merge_heads(_attend_cached(q[0], k_cache, v_cache, allowed)[None])  # (1, B, n, H hd)
    if spec.architecture == "llama":
        h = h + linear(a, p["o"], p.get("o_bias"))
        x = rms_norm(h, p["mlp_norm"], spec.norm_eps)
        gate, up = _projections(x, p, spec, "gate_up")
        h = h + linear(torch.nn.functional.silu(gate) * up, p["down"], p.get("down_bias"))
    else:
        h = h + linear(a, p["o"], p["o_bias"])
        x = layer_norm(h, p["ln2_w"], p["ln2_b"], spec.norm_eps)
        h = h + linear(gelu_tanh(linear(x, p["fc"], p["fc_bias"])), p["proj"], p["proj_bias"])
    return h[0], k_cache, v_cache


def decode_geometry(model, positions: torch.Tensor, lengths: torch.Tensor, capacity: int):
    """The rotary tables (LLaMA: cos, sin (1, B, 1, n, hd); GPT-2: None) and the cache mask
    (B, 1, n, capacity) of new places at `positions` (B, n) against caches holding `lengths` (B,)."""
    allowed = key_mask(lengths, positions.shape[1], capacity)[:, None]  # (B, 1, n, C)
    rope = rope_tables(positions[None], model.inv_freq, model.dtype) if model.inv_freq is not None else None
    return rope, allowed


def armt_layer_write(cfg, mem: dict[str, torch.Tensor], h: torch.Tensor, A: torch.Tensor, z: torch.Tensor,
                     written: torch.Tensor, write: torch.Tensor):
    """One layer's ARMT memory write from its M memory places' output h (B, M, d), with that layer's
    memory weights mem {name: (1, ...)} and state A (1, B, K, d), z (1, B, K), written (1, B); rows of
    `write` (B,) -> the new (A, z, written)."""
    a = cfg.armt
    return memory_write(h[None], mem["w_k"], mem["w_v"], mem["w_b"], mem["b_b"], A, z, written, write[None],
                        a.nu, a.correction)


def decode_layer(cfg, p: dict[str, torch.Tensor], w_q: torch.Tensor | None, h: torch.Tensor, rope,
                 allowed: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                 memory=None, inplace: bool = False, fast_memory: bool = False):
    """One layer of `decode_layers` with its weights: p {name: (1, ...)}, w_q (1, d, K) (the memory
    read's, with memory = this layer's (A, z, written) (1, B, ...) each; None: nothing read); h (B, n, d);
    k_cache/v_cache (B, Hkv, C, hd) -> h (B, n, d), the layer's caches with the new places stored."""
    if memory is not None:
        read = memory_read_fast if fast_memory else memory_read
        h = read(h[None], w_q, *memory, cfg.armt.nu)[0]
    return _layer(cfg.base, p, h, rope, allowed, k_cache, v_cache, lengths, inplace)


def decode_layers(model, x: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, memory=None, hook: LayerHook | None = None, inplace: bool = False,
                  fast_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tensor core of `cached_layers` (no numpy: what the decode graphs trace). x (B, n, d);
    positions (B, n) int64; lengths (B,) int64; k_cache/v_cache (L, B, Hkv, C, hd); memory: (A, z,
    written) read by every layer (None: nothing read) -> last hidden state (B, n, d) before the final
    norm, and the caches with the new places stored (inplace: the given tensors, written; else new ones).
    `fast_memory`: the read of graphs.memory.memory_read_fast (the fp16/bf16 opset-23 decode graphs)."""
    rope, allowed = decode_geometry(model, positions, lengths, k_cache.shape[3])
    h = x
    ks, vs = [], []
    for l in range(model.cfg.base.n_layers):
        layer_memory = None if memory is None else tuple(t[l:l + 1] for t in memory)
        h, k_l, v_l = decode_layer(model.cfg, {key: w[l:l + 1] for key, w in model.layers.items()},
                                   model.mem["w_q"][l:l + 1] if memory is not None else None, h, rope, allowed,
                                   k_cache[l], v_cache[l], lengths, layer_memory, inplace, fast_memory)
        ks.append(k_l)
        vs.append(v_l)
        if hook is not None:
            hook(l, h)
    if inplace:
        return h, k_cache, v_cache
    return h, torch.stack(ks), torch.stack(vs)


def cached_layers(model, x: torch.Tensor, positions: np.ndarray, cache: KvCache, memory=None,
                  advance: np.ndarray | None = None, hook: LayerHook | None = None) -> torch.Tensor:
    """New places x (B, n, d) through every layer against `cache` -> last hidden state (B, n, d),
    before the final norm. positions (B, n) int64 (rotary tables, LLaMA). memory: an ARMT's
    (A, z, written) torch tensors every layer reads (None: nothing read, an RMT). advance (B,): the
    real places each row adds to the cache (None: nothing kept, the memory-write pass). hook(l, h):
    called with layer l's output (the ARMT's memory write). The cache is written in place."""
    cache.check_room(x.shape[1])
    pos = torch.from_numpy(np.array(positions, dtype=np.int64)).to(x.device)  # (B, n), a writable copy
    lengths = torch.from_numpy(np.array(cache.lengths, dtype=np.int64)).to(x.device)  # (B,)
    h, _, _ = decode_layers(model, x, pos, lengths, cache.k, cache.v, memory, hook, inplace=True)
    if advance is not None:
        cache.advance(advance)
    return h


class ArmtMemoryWrites:
    """The hook of the ARMT's memory-write pass: after layer l, the M memory places' output h (B, M, d)
    is written into layer l's (A, z) of the rows in `write` (B,) bool (memory_write, as in `armt run`).
    `memory` = (A, z, written) is only read: layer l reads and writes layer l alone, so every layer's
    write starts from the memory the pass began with. `stacked()` -> the new (A, z, written), (L, ...)
    each, after the pass; each layer's new state is computed once and stacked once (no per-layer
    copy of the whole state: the memory_write graph traces L writes and one Concat each)."""

    def __init__(self, model, memory, write: torch.Tensor):
        self.model, self.memory, self.write = model, tuple(memory), write
        self.layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, l: int, h: torch.Tensor) -> None:  # called for l = 0, 1, ..., L-1 in turn
        mem = {k: w[l:l + 1] for k, w in self.model.mem.items()}
        state = (t[l:l + 1] for t in self.memory)
        self.layers.append(armt_layer_write(self.model.cfg, mem, h, *state, self.write))  # (1, B, K, d), (1, B, K), (1, B)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.cat(parts) for parts in zip(*self.layers))  # (L, B, K, d), (L, B, K), (L, B)
