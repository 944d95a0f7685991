"""The torch decoder with its single-token step captured in a CUDA graph (static KV cache).

The graph, its buffers and the cache are kept across calls of the same batch and cache capacity
(a bench's repeated calls capture once).

A decode step of a 1B model at batch 1 is a few hundred small kernels; run from Python one at a time
they cost more than the weights' read. `GraphDecoder` is a `runtimes.torch_generate.TorchDecoder`
whose one-token steps (an ARMT on a LLaMA base, n = 1: every step after the last prompt segment)
run as one replay of a CUDA graph captured at the first such step of a call:

    host, per step      ids, each row's cache length and position: one (B, 3) int64 staging buffer
                        (pinned on CUDA) -> one non-blocking copy to the device
    per segment         the frozen memory as one (L, B, K, d+1) fp32 table [A | z], zero where a
                        layer is unwritten (recomputed only when the memory changes: start, boundary)
    graph               embed -> per layer: memory read (one GEMM to both DPFP factors, one batched
                        GEMV against [A | z] with the eps in its bias, one addcdiv), LLaMA block on
                        (B, d) rows with 2-D GEMMs (residual adds in addmm), rotary from a
                        precomputed (capacity, hd) table, K/V written at each row's length, SDPA over
                        the fixed-capacity cache (a KV head's query heads as the query axis, keys
                        0 .. length visible: one additive mask per step, rows aligned to 16)
                        -> final norm, head GEMV, (B, V) fp32
    host                (B, V) logits -> pinned host buffer (one copy, one sync); cache lengths advanced;
                        greedy without scores (step_greedy): only the (B,) argmax and finiteness come back

The math is graphs/decode.py's for n = 1, re-associated only where the result is the same up to
rounding: DPFP as relu(h [W | -W] gathered) products (u * roll(u, j) as two gathered weight column
sets), the read's num and den from one product with [A | z], fused residual adds, SDPA instead of
the written-out softmax, RMSNorm and its weight in one op. fp32: within rounding of the eager
decoder; bf16: one rounding less in the norms, the residual adds and the attention probabilities,
so greedy tokens can part where two logits tie within bf16 rounding. `use_graph=False` runs the
same static step eagerly (that is how it is tested on a CPU). Everything else (the prompt's
completed segments, the last prompt segment, the memory write at a boundary, RMTs, GPT-2) is
TorchDecoder's own code.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
import torch.nn.functional as F

from graphs.blocks import rope_tables
from graphs.errors import NonFiniteError
from graphs.memory import EPS
from runtimes.fast_torch import silu_mul
from runtimes.torch_generate import TorchDecoder

log = logging.getLogger("armt.generate")


class GraphDecoder(TorchDecoder):
    backend = "torch-graph"

    def __init__(self, model, device: str = "cpu", precision: str = "fp32", use_graph: bool | None = None,
                 exact_memory: bool = True):
        super().__init__(model, device=device, precision=precision, exact_memory=exact_memory)
        self.use_graph = self.model.device.type == "cuda" if use_graph is None else use_graph
        self.replays = 0  # graph replays of the current call
        self.static_steps = 0  # steps of the current call through the static step (graph or eager)
        self._weights = self._layer_weights() if self.applies() else None

    def applies(self) -> bool:
        b = self.cfg.base
        return self.kind == "armt" and b.architecture == "llama"

    def _layer_weights(self) -> list[dict]:
        """Per layer: the block's 2-D weights (views) and the memory read's DPFP weight (d, 2K) fp32:
        columns [W[:, left] | W[:, right]] of W2 = [w_q | -w_q], so that relu(h W2) holds u = dpfp's
        relu(x), relu(-x) and q = relu(h Wl) * relu(h Wr) = cat_j u * roll(u, j)."""
        m, nu = self.model, self.cfg.armt.nu
        dm = m.mem["w_q"].shape[-1]
        i = torch.arange(2 * dm)
        left = i.repeat(nu)  # (K,)
        right = torch.cat([(i - j) % (2 * dm) for j in range(1, nu + 1)])  # roll(u, j)[i] = u[i - j]
        out = []
        with torch.no_grad():
            for l in range(self.cfg.base.n_layers):
                w = {key: t[l] for key, t in m.layers.items()}  # (d,), (d, out), (out,)
                w2 = torch.cat([m.mem["w_q"][l], -m.mem["w_q"][l]], -1).float()  # (d, 2 dm)
                w["dpfp"] = torch.cat([w2[:, left.to(w2.device)], w2[:, right.to(w2.device)]], -1).contiguous()
                out.append(w)
        return out

    def start(self, state, capacity: int) -> None:
        super().start(state, capacity)
        self.replays = self.static_steps = 0
        self._mem_src = None  # the memory tensors the static table was built from
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
        m, dev, C = self.model, self.model.device, self.cache.capacity
        L, K, d = self.cfg.base.n_layers, self.cfg.armt.d_key, self.cfg.base.d_model
        cos, sin = rope_tables(torch.arange(C, device=dev)[None, None], m.inv_freq, m.dtype)  # (1, 1, 1, C, hd)
        cos, sin = cos[0, 0, 0], sin[0, 0, 0]  # (C, hd): the rotary tables of every place a row can reach
        half = cos.shape[-1] // 2
        cuda = dev.type == "cuda"
        return {"feed": torch.zeros(B, 3, dtype=torch.int64, device=dev),  # ids, lengths, positions
                "feed_host": torch.zeros(B, 3, dtype=torch.int64, pin_memory=cuda),
                "places": torch.arange(-(-C // 16) * 16, device=dev),  # C rounded up to 16
                "cos": cos.contiguous(),
                # rotate_half(x) * sin == roll(x, half) * [-sin_1 | sin_2]: the sign in the table
                "sin": torch.cat([-sin[:, :half], sin[:, half:]], -1).contiguous(),
                "Az": torch.zeros(L, B, K, d + 1, dtype=torch.float32, device=dev),  # [A | z], 0 where unwritten
                "eps": F.pad(torch.zeros(1, 1, d, device=dev), (0, 1), value=EPS),  # (1, 1, d+1): [0 | eps]
                "logits_host": torch.zeros(B, self.cfg.base.vocab_size, dtype=torch.float32, pin_memory=cuda),
                "pick_host": torch.zeros(2, B, dtype=torch.int64, pin_memory=cuda)}

    def _memory_table(self) -> None:
        """The memory the segment reads (fixed until the next boundary) as the static [A | z] table."""
        A, z, written = self.memory  # (L, B, K, d), (L, B, K), (L, B)
        Az = torch.cat([A.float(), z.float()[..., None]], -1)  # (L, B, K, d+1)
        self._static["Az"].copy_(torch.where(written[:, :, None, None], Az, torch.zeros((), device=Az.device)))
        self._mem_src = list(self.memory)

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row through every layer against the cache -> logits (B, V) fp32 and
        (2, B) int64: each row's greedy token (argmax, the first of equal maxima as numpy's) and
        whether its logits are all finite."""
        m, s, spec = self.model, self._static, self.cfg.base
        B = s["feed"].shape[0]
        ids, lengths, positions = s["feed"][:, 0], s["feed"][:, 1], s["feed"][:, 2]  # (B,) each
        Hkv, hd = spec.n_kv_heads, spec.head_dim
        h = m.globals["embed"][ids]  # (B, d)
        cos, sin = s["cos"][positions][:, None], s["sin"][positions][:, None]  # (B, 1, hd)
        # the additive mask SDPA would make of the boolean one (0 / -inf), once per step instead of per
        # layer; its rows padded to a multiple of 16 places (the memory-efficient kernel's alignment)
        C = self.cache.capacity
        hidden = s["places"][None, :] > lengths[:, None]  # (B, C16)
        allowed = torch.zeros(hidden.shape, dtype=m.dtype, device=hidden.device).masked_fill_(hidden, float("-inf"))
        allowed = allowed[:, None, None, :C]  # (B, 1, 1, C)
        at = lengths[:, None, None, None].expand(B, Hkv, 1, hd)  # each row's new place
        with _sdpa_backends(h.device):
            for l, w in enumerate(self._weights):
                h = self._read(h, w["dpfp"], s["Az"][l])
                h = self._block(l, w, h, (cos, sin), allowed, at)
        x = _rms(h, m.globals["final_norm_w"], spec.norm_eps)
        logits = torch.mm(x, self._head_w()).float()  # (B, V)
        return logits, torch.stack([logits.argmax(-1), torch.isfinite(logits).all(-1).long()])

    def _head_w(self) -> torch.Tensor:
        g = self.model.globals
        return g["embed"].t() if self.cfg.base.tie_word_embeddings else g["lm_head"]  # (d, V)

    def _read(self, h: torch.Tensor, w_dpfp: torch.Tensor, Az: torch.Tensor) -> torch.Tensor:
        """graphs.memory.memory_read for one place per row: h (B, d) -> h + (q A) / (q z + eps)."""
        K = w_dpfp.shape[1] // 2
        h32 = h.float()
        r = torch.relu(torch.mm(h32, w_dpfp))  # (B, 2K): both DPFP factors
        q = r[:, :K] * r[:, K:]  # (B, K)
        d = h.shape[1]
        nd = torch.baddbmm(self._static["eps"], q[:, None], Az)[:, 0]  # (B, d+1): q A | q z + eps
        return torch.addcdiv(h32, nd[:, :d], nd[:, d:], out=torch.empty_like(h))  # rounded to h's dtype once

    def _block(self, l: int, w: dict, h: torch.Tensor, rope, allowed: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """graphs.decode._layer's LLaMA block for one place per row h (B, d), the K/V stored at `at`;
        allowed (B, 1, 1, C) the additive key mask (0 for keys 0 .. length, -inf beyond)."""
        spec = self.cfg.base
        B = h.shape[0]
        Hq, Hkv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
        qkv = _mm(_rms(h, w["attn_norm"], spec.norm_eps), w["qkv"], w.get("qkv_bias"))  # (B, (Hq+2Hkv) hd)
        qk = qkv[:, : (Hq + Hkv) * hd].view(B, Hq + Hkv, hd)
        cos, sin = rope  # (B, 1, hd)
        qk = torch.addcmul(qk * cos, torch.roll(qk, hd // 2, -1), sin)  # rotate-half rotary
        k = qk[:, Hq:, None]  # (B, Hkv, 1, hd)
        v = qkv[:, (Hq + Hkv) * hd:].view(B, Hkv, 1, hd)
        kc, vc = self.cache.k[l], self.cache.v[l]  # (B, Hkv, C, hd)
        kc.scatter_(2, at, k)
        vc.scatter_(2, at, v)
        q = qk[:, :Hq].reshape(B, Hkv, Hq // Hkv, hd)  # a kv head's query heads as its query axis
        a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=allowed).reshape(B, Hq * hd)
        h = _mm(a, w["o"], w.get("o_bias"), h)
        gu = _mm(_rms(h, w["mlp_norm"], spec.norm_eps), w["gate_up"], w.get("gate_up_bias"))  # (B, 2F)
        return _mm(silu_mul(gu), w["down"], w.get("down_bias"), h)

    def _run_static(self) -> tuple[torch.Tensor, torch.Tensor]:
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
            log.debug("captured the decode step: batch %d, cache capacity %d", self._static["feed"].shape[0],
                      self.cache.capacity)
            self._keep()
        self._graph.replay()
        self.replays += 1
        return self._out

    def _static_step(self, ids: np.ndarray, counts: np.ndarray, greedy: bool = False) -> np.ndarray:
        """ids (B, 1), counts (B,) -> logits (B, V) float32 through the static step; `greedy`: only
        each row's greedy token (B,) int64 comes back (NonFiniteError if any row's logits are not finite)."""
        self.cache.check_room(1)
        B = ids.shape[0]
        if self._static is None:
            self._static = self._buffers(B)
            self._keep()
        s = self._static
        if self._mem_src is None or any(a is not b for a, b in zip(self.memory, self._mem_src)):
            self._memory_table()  # a new call or a boundary's write replaced the memory
        lengths = self.cache.lengths.astype(np.int64)
        feed = s["feed_host"].numpy()  # (B, 3), pinned on CUDA
        feed[:, 0] = ids[:, 0]
        feed[:, 1] = lengths
        feed[:, 2] = np.where(counts > 0, lengths, 0)
        s["feed"].copy_(s["feed_host"], non_blocking=True)
        logits, pick = self._run_static()  # (B, V) fp32, (2, B) int64 on the device
        host = s["pick_host"] if greedy else s["logits_host"]
        host.copy_(pick if greedy else logits, non_blocking=True)
        if self.model.device.type == "cuda":
            torch.cuda.current_stream(self.model.device).synchronize()  # the copy done; the staging free
        out = host.numpy().copy()
        if greedy and not out[1].all():
            raise NonFiniteError("the logits hold NaN or Inf: no token can be chosen")
        self.static_steps += 1
        self.cache.advance(counts)
        return out[0] if greedy else out

    @torch.no_grad()
    def step(self, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        if not self.applies() or ids.shape[1] != 1:
            return super().step(ids, counts)
        return self._static_step(ids, counts)[:, None]  # (B, 1, V)

    @torch.no_grad()
    def step_last(self, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        if not self.applies() or ids.shape[1] != 1:
            return super().step_last(ids, counts)
        return self._static_step(ids, counts)

    @torch.no_grad()
    def step_greedy(self, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """As step_last, then the greedy token of each row (B,) int64, chosen on the device: only B
        ids (and B finiteness flags) cross to the host (runtimes.generate with scores=False)."""
        if not self.applies() or ids.shape[1] != 1:
            from graphs.sampling import Sampler, SamplingConfig
            return Sampler(SamplingConfig(), ids.shape[0])(super().step_last(ids, counts))
        return self._static_step(ids, counts, greedy=True)


def _sdpa_backends(device: torch.device):
    """CUDA: SDPA's memory-efficient kernel (boolean masks, capturable in a CUDA graph), math as the
    fallback; CPU: torch's own choice."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _rms(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """graphs.blocks.rms_norm on rows h (B, d): normalised in fp32 and scaled by w in one op (F.rms_norm
    upcasts half inputs; fp32: the reference's arithmetic; half: its result rounded once, not twice)."""
    return F.rms_norm(h, (h.shape[-1],), w, eps)


def _mm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
        ) -> torch.Tensor:
    """x (B, in) @ w (in, out) [+ bias (out,)] [+ residual (B, out), in the GEMM] -> (B, out)."""
    y = torch.mm(x, w) if residual is None else torch.addmm(residual, x, w)
    return y if bias is None else y + bias
