"""A fast torch executor for LLaMA-based ARMTs: diagonal and sequential schedules, plus full attention.

Same math as graphs.model.ArmtModel (the reference), organised for speed on a GPU:

  * one activation buffer X (L+1, B, P, d): X[0] is the slot entering layer 0, X[l+1] is layer l's
    output. Layer l reads X[l] and writes X[l+1], so the diagonal "shift one layer down" costs
    nothing: step t runs layers lo..hi on the contiguous slice X[lo..hi] and writes X[lo+1..hi+1]
    (the input slice is consumed by the memory read before the outputs are written):

        X:   [ emb(seg t) | out l0 | out l1 | ... | out l(L-1) ]       step t, layers lo..hi
               ^ read by l0  ^ read by l1                ^ leaves the pipeline (segment t-L+1)

  * stacked (L, in, out) weights, one torch.bmm per matmul over the active layers; the RMSNorm
    weights are folded into the following matmul (qkv, gate_up) and the residual adds are fused into
    the output GEMMs (baddbmm);
  * attention over the layers folded into the batch with SDPA (is_causal, grouped-query heads):
    a full slot's attention mask *is* the causal mask, so only a short last segment needs a mask;
  * the memory write's three projections (w_k | w_v | w_b) as one GEMM; the read's division by
    q.z folded into q before the (q A) product, with h added by the same baddbmm;
  * on CUDA: one CUDA graph per step shape (lo, hi), captured after its first eager run and
    replayed afterwards (the steady state repeats one graph; the ramps have one each), no host
    synchronisation inside the loop, SiLU(gate) * up in one Triton kernel when Triton is present;
  * the memory state A, z stays fp32; in bf16 the read's two token-sized products run in bf16
    (fp32 accumulation), in fp16 as TF32 (fp16's range overflows there); the write's small products
    run as TF32 in both; `exact_memory=True` keeps fp32 throughout, as the reference.

Limits: LLaMA without biases; every batch row has the same length (no attention mask) - padded
batches go through the reference. GPT-2 is not covered (ConfigError).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from graphs.blocks import attention_mask, rope_tables
from graphs.errors import ConfigError, InputError
from graphs.memory import EPS, dpfp
from graphs.model import ArmtModel
from graphs.schedule import build_schedule
from graphs.state import MemoryState

log = logging.getLogger("armt.fast")

Emit = Callable[[int, torch.Tensor], None]  # (segment index, last layer's slot (B, P, d))

_SILU_MUL = None  # the Triton kernel, compiled on first use


def _triton_silu_mul():
    global _SILU_MUL
    if _SILU_MUL is None:
        try:
            import triton
            import triton.language as tl
        except ImportError:  # no Triton: eager fallback
            _SILU_MUL = False
            return _SILU_MUL

        @triton.jit
        def kernel(gu_ptr, out_ptr, F_: tl.constexpr, BLOCK: tl.constexpr):
            row = tl.program_id(0).to(tl.int64)
            col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            ok = col < F_
            g = tl.load(gu_ptr + row * (2 * F_) + col, mask=ok).to(tl.float32)
            u = tl.load(gu_ptr + row * (2 * F_) + F_ + col, mask=ok).to(tl.float32)
            # as eager torch rounds: silu(g) to the compute dtype, then the product
            s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
            tl.store(out_ptr + row * F_ + col, (s * u).to(out_ptr.dtype.element_ty), mask=ok)

        def silu_mul(gu: torch.Tensor) -> torch.Tensor:
            F_ = gu.shape[-1] // 2
            rows = gu.numel() // (2 * F_)
            out = torch.empty(*gu.shape[:-1], F_, dtype=gu.dtype, device=gu.device)
            kernel[(rows, triton.cdiv(F_, 1024))](gu, out, F_, BLOCK=1024)
            return out

        _SILU_MUL = silu_mul
    return _SILU_MUL


_ROPE = None  # the Triton rotary kernel, compiled on first use


def _triton_rope():
    global _ROPE
    if _ROPE is None:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            _ROPE = False
            return _ROPE

        @triton.jit
        def kernel(qkv_ptr, cos_ptr, sin_ptr, out_ptr, P, W_IN: tl.constexpr, HEADS: tl.constexpr,
                   HALF: tl.constexpr, BLOCK: tl.constexpr):
            row = tl.program_id(0).to(tl.int64)
            p = row % P
            i = tl.arange(0, BLOCK)
            ok = i < HEADS * HALF
            head, j = i // HALF, i % HALF
            src = qkv_ptr + row * W_IN + head * (2 * HALF) + j
            x1 = tl.load(src, mask=ok)
            x2 = tl.load(src + HALF, mask=ok)
            c = tl.load(cos_ptr + p * HALF + j, mask=ok)
            s = tl.load(sin_ptr + p * HALF + j, mask=ok)
            dt = x1.dtype
            # rounded as eager torch does it: each product, then the sum, in the compute dtype
            o1 = ((x1 * c).to(dt).to(tl.float32) - (x2 * s).to(dt).to(tl.float32)).to(dt)
            o2 = ((x2 * c).to(dt).to(tl.float32) + (x1 * s).to(dt).to(tl.float32)).to(dt)
            dst = out_ptr + row * (HEADS * 2 * HALF) + head * (2 * HALF) + j
            tl.store(dst, o1, mask=ok)
            tl.store(dst + HALF, o2, mask=ok)

        def rope(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            """qkv (N, P, H_all, hd) contiguous; rotate its first `heads` heads with cos/sin (P, hd/2)
            -> (N, P, heads, hd) contiguous."""
            N, P, H_all, hd = qkv.shape
            out = torch.empty(N, P, heads, hd, dtype=qkv.dtype, device=qkv.device)
            half = hd // 2
            kernel[(N * P,)](qkv, cos, sin, out, P, W_IN=H_all * hd, HEADS=heads, HALF=half,
                             BLOCK=triton.next_power_of_2(heads * half))
            return out

        _ROPE = rope
    return _ROPE


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu (..., 2F) -> silu(gu[..., :F]) * gu[..., F:] (..., F)."""
    if gu.is_cuda and gu.is_contiguous():
        fn = _triton_silu_mul()
        if fn:
            return fn(gu)
    F_ = gu.shape[-1] // 2
    return F.silu(gu[..., :F_]) * gu[..., F_:]


@dataclass
class FastResult:
    state: MemoryState  # final memory state (clones of the executor's buffers)
    hidden: torch.Tensor | None  # (B, N, d) fp32 after the final norm, when collected
    last_hidden: torch.Tensor  # (B, c, d) fp32: the last segment's normed hidden states
    logits: torch.Tensor | None  # (B, N, V) fp32, when collected with the head


class FastArmt:
    """Holds a model's weights re-laid for speed and the buffers of one batch size."""

    def __init__(self, model: ArmtModel, cuda_graphs: bool | None = None, exact_memory: bool = False):
        cfg = model.cfg
        b, a = cfg.base, cfg.armt
        if b.architecture != "llama":
            raise ConfigError("the fast torch executor covers LLaMA-based ARMTs; use the reference for GPT-2")
        if b.attention_bias or b.mlp_bias:
            raise ConfigError("the fast torch executor does not cover LLaMA biases; use the reference")
        self.model, self.cfg = model, cfg
        self.L, self.d, self.T, self.M = b.n_layers, b.d_model, a.segment_size, a.num_mem_tokens
        self.P = self.T + self.M
        self.Hq, self.Hkv, self.hd, self.F = b.n_heads, b.n_kv_heads, b.head_dim, b.d_ff
        self.K, self.nu, self.eps = a.d_key, a.nu, b.norm_eps
        self.correction = a.correction
        self.device, self.dtype = model.device, model.dtype
        self.graphs_on = (self.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        self.tf32 = self.device.type == "cuda" and self.dtype != torch.float32 and not exact_memory
        # half precision: the memory read's token-sized products in the compute dtype (see _memory_read_half)
        # (bf16 only: fp16's range overflows on q / (q z + eps) and on A of a long run)
        self.half_read = self.dtype == torch.bfloat16 and not exact_memory
        with torch.no_grad():
            p, m, g = model.layers, model.mem, model.globals
            # RMSNorm weights folded into the next matmul: (w * n(x)) @ W == n(x) @ (w[:, None] * W)
            self.w_qkv = (p["attn_norm"][:, :, None] * p["qkv"]).contiguous()  # (L, d, qkv)
            self.w_o = p["o"].detach().contiguous()  # (L, Hq hd, d)
            self.w_gu = (p["mlp_norm"][:, :, None] * p["gate_up"]).contiguous()  # (L, d, 2F)
            self.w_down = p["down"].detach().contiguous()  # (L, F, d)
            self.w_q = m["w_q"].detach().float().contiguous()  # (L, d, dm)
            self.w_q_half = self.w_q.to(self.dtype)
            kvb = torch.cat([m["w_k"], m["w_v"], m["w_b"]], -1).float()  # (L, d, dm+d+1)
            pad = -kvb.shape[-1] % 64  # an odd width (2113) sends cuBLAS to a slow unaligned kernel
            self.w_kvb = F.pad(kvb, (0, pad)).contiguous()  # (L, d, dm+d+1+pad), zero columns at the end
            self.b_b = m["b_b"].detach().float()  # (L, 1)
            self.embed_w = g["embed"].detach()
            self.mem_tokens = g["memory"].detach()
            self.final_w = g["final_norm_w"].detach()
            self.head_w = g["embed"].detach().t() if b.tie_word_embeddings else g["lm_head"].detach()
            pos = torch.cat([torch.arange(self.T), torch.arange(self.T, self.T + self.M)]).to(self.device)
            cos, sin = rope_tables(pos[None, None], model.inv_freq, self.dtype)  # (1, 1, 1, P, hd)
            half = self.hd // 2
            self.cos = cos[0, 0, 0, :, None, :half].contiguous()  # (P, 1, hd/2)
            self.sin = sin[0, 0, 0, :, None, :half].contiguous()
        self._B = None
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None

    # ------------------------------------------------------------------ buffers
    def _buffers(self, B: int) -> None:
        if self._B == B:
            return
        L, P, d, K = self.L, self.P, self.d, self.K
        dev = self.device
        self.X = torch.zeros(L + 1, B, P, d, dtype=self.dtype, device=dev)  # (L+1, B, P, d)
        self.X[0, :, self.T:] = self.mem_tokens  # memory tokens of the entering slot never change
        self.A = torch.zeros(L, B, K, d, dtype=torch.float32, device=dev)  # (L, B, K, d)
        self.z = torch.zeros(L, B, K, dtype=torch.float32, device=dev)  # (L, B, K)
        self.written = torch.zeros(L, B, dtype=torch.bool, device=dev)  # (L, B)
        self.ids_buf = torch.zeros(B, self.T, dtype=torch.int64, device=dev)  # (B, T)
        self._B = B
        self._graphs.clear()

    @contextlib.contextmanager
    def _precision(self):
        if not self.tf32:
            yield
            return
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old

    # ------------------------------------------------------------------ the cells of one step
    def _embed_entering(self) -> None:
        B = self._B
        e = torch.index_select(self.embed_w, 0, self.ids_buf.view(-1)).view(B, self.T, self.d)
        self.X[0, :, : self.T].copy_(e)

    def _memory_read(self, lo: int, hi: int) -> torch.Tensor:
        """X[lo..hi] (n, B, P, d) -> h + read (n, B, P, d) in the compute dtype."""
        if self.half_read:
            return self._memory_read_half(lo, hi)
        n, B, P, d, K = hi - lo + 1, self._B, self.P, self.d, self.K
        h32 = self.X[lo:hi + 1].float().view(n, B * P, d)  # (n, B P, d) f32
        q = dpfp(torch.bmm(h32, self.w_q[lo:hi + 1]), self.nu).view(n * B, P, K)  # (n B, P, K)
        A = self.A[lo:hi + 1].view(n * B, K, d)
        z = self.z[lo:hi + 1].view(n * B, K, 1)
        den = torch.bmm(q, z) + EPS  # (n B, P, 1)
        seen = self.written[lo:hi + 1].view(n * B, 1, 1).to(torch.float32)
        # h + (q A) / (q z + eps) where written; h + 0 (exact) where not
        out = torch.baddbmm(h32.view(n * B, P, d), q * (seen / den), A)  # (n B, P, d) f32
        return out.view(n, B, P, d).to(self.dtype)

    def _memory_read_half(self, lo: int, hi: int) -> torch.Tensor:
        """The read with its two big products in the compute dtype (fp32 accumulation): q = phi(h Wq)
        and h + (q / (q z + eps)) A as one baddbmm. A and z stay fp32 in the state; the division is
        fp32. Saves the fp32 copy of the slot (2x its bytes) and two fp32 GEMMs."""
        n, B, P, d, K = hi - lo + 1, self._B, self.P, self.d, self.K
        h = self.X[lo:hi + 1].view(n, B * P, d)  # (n, B P, d)
        q = dpfp(torch.bmm(h, self.w_q_half[lo:hi + 1]).float(), self.nu).view(n * B, P, K)  # (n B, P, K) f32
        den = torch.bmm(q, self.z[lo:hi + 1].view(n * B, K, 1)) + EPS  # (n B, P, 1)
        seen = self.written[lo:hi + 1].view(n * B, 1, 1).to(torch.float32)
        qs = (q * (seen / den)).to(self.dtype)
        A = self.A[lo:hi + 1].view(n * B, K, d).to(self.dtype)
        return torch.baddbmm(h.view(n * B, P, d), qs, A).view(n, B, P, d)

    def _memory_write(self, lo: int, hi: int, mem_rows: torch.Tensor) -> None:
        """mem_rows (n, B, M, d): the memory tokens' outputs; update A, z, written of layers lo..hi."""
        n, B, M, d, K = hi - lo + 1, self._B, self.M, self.d, self.K
        dm = self.cfg.armt.d_mem
        kvb = torch.bmm(mem_rows.float().reshape(n, B * M, d), self.w_kvb[lo:hi + 1])  # (n, B M, dm+d+1)
        k = dpfp(kvb[..., :dm], self.nu).view(n * B, M, K)  # (n B, M, K)
        v = kvb[..., dm:dm + d].reshape(n * B, M, d)
        beta = torch.sigmoid(kvb[..., dm + d:dm + d + 1] + self.b_b[lo:hi + 1, None, :]).view(n * B, M, 1)
        A = self.A[lo:hi + 1].view(n * B, K, d)
        z = self.z[lo:hi + 1].view(n * B, K)
        seen = self.written[lo:hi + 1].view(n * B, 1, 1)
        kz = torch.bmm(k, z[..., None]) + EPS  # (n B, M, 1)
        v_prev = torch.where(seen, torch.bmm(k, A) / kz, torch.zeros((), device=k.device))
        if self.correction:
            gamma = torch.clamp(1 - kz / ((k * k).sum(-1, keepdim=True) + EPS), 0.0, 1.0)
            gamma = torch.where(seen, gamma, torch.ones((), device=k.device))
        else:
            gamma = torch.ones_like(kz)
        A.baddbmm_((k * beta).transpose(1, 2), v - v_prev)  # A += (k beta)^T (v - v_prev)
        z.add_((gamma * k).sum(1))
        self.written[lo:hi + 1] = True

    def _attention(self, qkv: torch.Tensor, rope, allowed) -> torch.Tensor:
        """qkv (N, P, Hq+2Hkv, hd) -> attention output (N, P, Hq hd); N = layers x rows."""
        Hq, Hkv, hd = self.Hq, self.Hkv, self.hd
        half = hd // 2
        N, P = qkv.shape[:2]
        cos, sin = rope  # (P, 1, hd/2) or (N, P, 1, hd/2)
        kernel = _triton_rope() if (qkv.is_cuda and allowed is None and qkv.is_contiguous()) else None
        if kernel:
            qk = kernel(qkv, Hq + Hkv, cos.view(P, half), sin.view(P, half))  # (N, P, Hq+Hkv, hd)
        else:
            qk = qkv[:, :, : Hq + Hkv]  # (N, P, Hq+Hkv, hd)
            x1, x2 = qk[..., :half], qk[..., half:]
            qk = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # rotate-half rotary
        q = qk[:, :, :Hq].transpose(1, 2)  # (N, Hq, P, hd)
        k = qk[:, :, Hq:].transpose(1, 2)  # (N, Hkv, P, hd)
        v = qkv[:, :, Hq + Hkv:].transpose(1, 2)
        if allowed is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hq != Hkv)
        else:  # a short slot: padding keys hidden (reference mask); grouped heads repeated for the kernel
            rep = Hq // Hkv
            a = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                               attn_mask=allowed)
        return a.transpose(1, 2).reshape(N, P, Hq * hd)

    def _block(self, lo: int, hi: int, h: torch.Tensor, rope, allowed, out: torch.Tensor) -> None:
        """LLaMA layer on h (n, B, P', d), writing h + attn + mlp into out (n, B, P', d)."""
        n, B, P, d = h.shape
        x = F.rms_norm(h, (d,), eps=self.eps).view(n, B * P, d)
        qkv = torch.bmm(x, self.w_qkv[lo:hi + 1])  # (n, B P, (Hq+2Hkv) hd)
        a = self._attention(qkv.view(n * B, P, -1, self.hd), rope, allowed)  # (n B, P, Hq hd)
        # in place: h is the memory read's fresh output (never a view of X), so no copy before the GEMM
        h = h.view(n, B * P, d).baddbmm_(a.view(n, B * P, -1), self.w_o[lo:hi + 1])  # (n, B P, d)
        x = F.rms_norm(h, (d,), eps=self.eps)
        act = silu_mul(torch.bmm(x, self.w_gu[lo:hi + 1]))  # (n, B P, F)
        torch.baddbmm(h, act, self.w_down[lo:hi + 1], out=out.view(n, B * P, d))

    def _cells(self, lo: int, hi: int, geometry=None) -> None:
        """Layers lo..hi, each on its slot: X[l] -> X[l+1], memory state of lo..hi updated."""
        rope, allowed = geometry if geometry is not None else ((self.cos, self.sin), None)
        h = self._memory_read(lo, hi)  # (n, B, P, d); X[lo..hi] is consumed here
        out = self.X[lo + 1:hi + 2]
        self._block(lo, hi, h, rope, allowed, out)
        self._memory_write(lo, hi, out[:, :, self.T:])

    def _step(self, lo: int, hi: int, embed: bool, geometry=None) -> None:
        """One graph call: embed the entering slot (if layer 0 works) and run layers lo..hi."""
        if geometry is not None or not self.graphs_on:
            if embed:
                self._embed_entering()
            self._cells(lo, hi, geometry)
            return
        key = (lo, hi, embed)
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            return

        def body():
            if embed:
                self._embed_entering()
            self._cells(lo, hi)

        # first time: snapshot the live state, run a warm-up on it (lazy inits), restore it,
        # capture (capture runs nothing), then replay for this step's real result
        saved = [t.clone() for t in (self.X, self.A, self.z, self.written)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream().wait_stream(side)
        for t, s in zip((self.X, self.A, self.z, self.written), saved):
            t.copy_(s)
        del saved
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                body()
        except RuntimeError as exc:  # capture refused: run eagerly from now on
            log.warning("CUDA graph capture failed (%s); running the steps eagerly", str(exc).splitlines()[0])
            self.graphs_on = False
            self._graphs.clear()
            body()
            return
        self._graphs[key] = graph
        graph.replay()

    # ------------------------------------------------------------------ geometry of a short slot
    def _short_geometry(self, segs: list[int], counts: list[int]):
        """Rotary tables and masks for slots some of which are short (B rows alike)."""
        B, T, M = self._B, self.T, self.M
        j = torch.arange(T, device=self.device)
        pos, kv = [], []
        for s in segs:
            c = counts[s]
            tok = j < c
            pos.append(torch.cat([torch.where(tok, j, 0), c + torch.arange(M, device=self.device)]))
            kv.append(torch.cat([tok, torch.ones(M, dtype=torch.bool, device=self.device)]))
        pos_t = torch.stack(pos)[:, None].expand(-1, B, -1)  # (n, B, P)
        kv_t = torch.stack(kv)[:, None].expand(-1, B, -1)
        cos, sin = rope_tables(pos_t, self.model.inv_freq, self.dtype)  # (n, B, 1, P, hd)
        half = self.hd // 2
        n, P = len(segs), self.P
        cos = cos[..., :half].reshape(n * B, 1, P, half).transpose(1, 2)  # (n B, P, 1, hd/2)
        sin = sin[..., :half].reshape(n * B, 1, P, half).transpose(1, 2)
        allowed = attention_mask(kv_t).reshape(n * B, 1, P, P)
        return (cos, sin), allowed

    # ------------------------------------------------------------------ schedules
    def run(self, input_ids: torch.Tensor, schedule: str = "diagonal", state: MemoryState | None = None,
            collect: bool = False, head: bool = False) -> FastResult:
        """input_ids (B, N) int (every row N tokens). `collect`: return all hidden states (and logits
        with `head`); otherwise only the last segment's (memory stays flat in N)."""
        if schedule not in ("diagonal", "sequential"):
            raise InputError(f"schedule must be diagonal or sequential, got {schedule!r}")
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise InputError(f"input ids must be (batch, tokens) with tokens >= 1, got {tuple(input_ids.shape)}")
        B, N = input_ids.shape
        L, T = self.L, self.T
        S = -(-N // T)
        counts = [min(T, N - s * T) for s in range(S)]
        self._buffers(B)
        ids = torch.zeros(B, S * T, dtype=torch.int64, device=self.device)
        ids[:, :N] = input_ids.to(self.device, torch.int64)
        hidden = torch.empty(B, N, self.d, device=self.device) if collect else None
        logits = torch.empty(B, N, self.head_w.shape[1], device=self.device) if collect and head else None
        last: list[torch.Tensor] = []

        def emit(s: int) -> None:
            if not collect and s != S - 1 and not head:
                return
            c = counts[s]
            x = F.rms_norm(self.X[L][:, :c], (self.d,), eps=self.eps) * self.final_w  # (B, c, d)
            if head:
                lg = x @ self.head_w  # (B, c, V)
                if logits is not None:
                    logits[:, s * T: s * T + c] = lg.float()
            if collect:
                hidden[:, s * T: s * T + c] = x.float()
            if s == S - 1:
                last.append(x.float())

        with torch.no_grad(), self._precision():
            self._reset(state, B)
            for step in build_schedule(schedule, L, S).steps:
                if step.entering is not None:
                    s = step.entering
                    self.ids_buf.copy_(ids[:, s * T:(s + 1) * T])
                if schedule == "diagonal":
                    segs = list(step.segments)
                    short = any(counts[s] < T for s in segs)
                    self._step(step.lo, step.hi, step.lo == 0, self._short_geometry(segs, counts) if short else None)
                else:  # the segment graph's call, layer by layer
                    s = step.entering
                    geo = self._short_geometry([s], counts) if counts[s] < T else None
                    for l in range(L):
                        self._step(l, l, l == 0, geo)
                if step.leaving is not None:
                    emit(step.leaving)
            final = MemoryState(self.A.clone(), self.z.clone(), self.written.clone())
        return FastResult(state=final, hidden=hidden, last_hidden=last[0], logits=logits)

    def steady_step(self, B: int = 1):
        """A callable running one steady diagonal step (layers 0..L-1, the entering slot embedded) on
        this executor's buffers of B rows (state zeroed once): what a long diagonal run repeats,
        for timing it alone (armt bench --steady-step)."""
        self._buffers(B)
        self._reset(None, B)

        def step() -> None:
            with torch.no_grad(), self._precision():
                self._step(0, self.L - 1, True)
        return step

    def _reset(self, state: MemoryState | None, B: int) -> None:
        if state is None:
            self.A.zero_()
            self.z.zero_()
            self.written.zero_()
        else:
            state.check_fits(self.L, B, self.K, self.d)
            self.A.copy_(state.A)
            self.z.copy_(state.z)
            self.written.copy_(state.written)

    # ------------------------------------------------------------------ the base model, no memory
    def full_attention(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The base model on the whole sequence in one pass (no memory, no head): (B, N) -> (B, N, d)
        normed hidden in the compute dtype. Same layer math and kernels as the cells."""
        B, N = input_ids.shape
        with torch.no_grad():
            h = self.embed_w[input_ids.to(self.device)][None]  # (1, B, N, d)
            pos = torch.arange(N, device=self.device)
            cos, sin = rope_tables(pos[None, None], self.model.inv_freq, self.dtype)
            half = self.hd // 2
            rope = (cos[0, 0, 0, :, None, :half].contiguous(), sin[0, 0, 0, :, None, :half].contiguous())  # (N, 1, hd/2)
            for l in range(self.L):
                out = torch.empty_like(h)
                self._block(l, l, h, rope, None, out)
                h = out
            return F.rms_norm(h[0], (self.d,), eps=self.eps) * self.final_w
