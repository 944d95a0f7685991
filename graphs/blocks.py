"""Decoder-block math for LLaMA and GPT-2, written once for a stack of layers.

Every function takes weights with a leading layer axis n (a slice of the model's stacked (L, ...)
parameters) and hidden states with the same leading axis:

    h        (n, B, P, d)     n layers, B rows, P = slot length (segment tokens + M memory tokens)
    W        (n, d_in, d_out) applied as x @ W (HF Linear weights are stored transposed)

The sequential schedule calls these with n = 1, the diagonal schedule with n = the number of
layers active on the current anti-diagonal. The math follows HF transformers' eager implementations
(RMSNorm in fp32, rotate-half rotary embedding, fp32 softmax) so results match to rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from graphs.config import BaseSpec

Params = dict[str, torch.Tensor]


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (n, ..., d_in) @ w (n, d_in, d_out) [+ b (n, d_out)] -> (n, ..., d_out), one batched GEMM."""
    n, d_in = x.shape[0], x.shape[-1]
    y = torch.bmm(x.reshape(n, -1, d_in), w)  # (n, rows, d_out)
    if b is not None:
        y = y + b[:, None, :]
    return y.reshape(*x.shape[:-1], w.shape[-1])


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in fp32, scale in the input dtype. w (n, d) -> broadcast over (B, P)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w[:, None, None, :] * x32.to(dtype)


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm with per-layer affine weights w, b (n, d)."""
    y = F.layer_norm(x, x.shape[-1:], eps=eps)
    return y * w[:, None, None, :] + b[:, None, None, :]


def rope_inv_freq(spec: BaseSpec) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim / 2,), fp32, as HF computes them (default or llama3 rope)."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if spec.rope_scaling:
        s = dict(spec.rope_scaling)
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (n, B, P) int -> cos, sin (n, B, 1, P, head_dim) in `dtype` (computed in fp32)."""
    freqs = positions.float()[..., None] * inv_freq  # (n, B, P, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (n, B, P, hd)
    return emb.cos().to(dtype)[:, :, None], emb.sin().to(dtype)[:, :, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """key_valid (n, B, P) bool -> allowed (n, B, 1, P, P): causal, padding keys hidden.

    A query always sees itself, so a padding query never has an empty row (no NaN); padding keys
    are never seen by real queries, which is what makes a padded slot exact.
    """
    P = key_valid.shape[-1]
    idx = torch.arange(P, device=key_valid.device)
    causal = idx[None, :] <= idx[:, None]  # (P, P) query i sees key j <= i
    diag = idx[None, :] == idx[:, None]
    return (causal & (key_valid[:, :, None, :] | diag))[:, :, None]  # (n, B, 1, P, P)


ONNX_ATTENTION = "onnx"  # `fused` mode: trace one ONNX opset-23 Attention node per call (exporter only)
ONNX_CAUSAL = "onnx_causal"  # the same node with is_causal=1 and no mask input (full slots: graphs/contracts.py)
Fused = bool | str  # False: the math written out; True: torch SDPA; ONNX_ATTENTION / ONNX_CAUSAL: torch.onnx.ops.attention


def _onnx_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """One opset-23 Attention node: the layer axis folded into the batch, GQA from the 4-D head counts
    (no repeat of k/v), the same boolean mask as the written-out path (True = the key is seen).
    `allowed` None: `is_causal=1` and no mask input (exactly the slot mask when every key is valid).
    The exporter traces this for fp16/bf16 graphs; in eager torch it runs torch's own reference."""
    n, B, H, P, hd = q.shape
    Hkv = k.shape[2]
    mask = None if allowed is None else allowed.reshape(n * B, 1, P, P)  # (n B, 1, P, P)
    y, _, _, _ = torch.onnx.ops.attention(
        q.reshape(n * B, H, P, hd), k.reshape(n * B, Hkv, P, hd), v.reshape(n * B, Hkv, P, hd),
        mask, is_causal=allowed is None, scale=1.0 / math.sqrt(hd))  # (n B, H, P, hd)
    return y.reshape(n, B, H, P, hd)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
           fused: Fused = False) -> torch.Tensor:
    """q (n, B, H, P, hd), k/v (n, B, Hkv, P, hd), allowed (n, B, 1, P, P) -> (n, B, H, P, hd).

    `fused=False` writes the math out (what the exporter traces for fp32, and the torch reference);
    `fused=True` uses PyTorch's fused SDPA kernels (the fast GPU path); `fused=ONNX_ATTENTION` traces
    one ONNX Attention node (the exporter, fp16/bf16 at opset 23 only); `fused=ONNX_CAUSAL` the same
    node with is_causal=1 and `allowed` ignored (the causal graph variants: every key valid, so the
    slot mask is exactly causal). All fold the layer axis into the batch.
    """
    if fused == ONNX_ATTENTION:
        return _onnx_attention(q, k, v, allowed)
    if fused == ONNX_CAUSAL:
        return _onnx_attention(q, k, v, None)
    n, B, H, P, hd = q.shape
    rep = H // k.shape[2]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
    if fused:
        out = F.scaled_dot_product_attention(
            q.reshape(n * B, H, P, hd), k.reshape(n * B, H, P, hd), v.reshape(n * B, H, P, hd),
            attn_mask=allowed.reshape(n * B, 1, P, P))
        return out.reshape(n, B, H, P, hd)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))  # (n, B, H, P, P)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU, tanh approximation, written out (portable to every ONNX consumer)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _split_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(n, B, P, heads * hd) -> (n, B, heads, P, hd)."""
    n, B, P, _ = x.shape
    return x.reshape(n, B, P, heads, head_dim).transpose(2, 3)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(n, B, H, P, hd) -> (n, B, P, H * hd)."""
    n, B, H, P, hd = x.shape
    return x.transpose(2, 3).reshape(n, B, P, H * hd)


PROJECTION_PARTS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}  # fused weight -> its column blocks


def block_names(name: str) -> tuple[str, ...] | None:
    """The names of the column blocks of fused LLaMA parameter `name` ("qkv" -> q, k, v; "gate_up_bias"
    -> gate_bias, up_bias), None for a parameter that is not fused."""
    base = name[:-5] if name.endswith("_bias") else name
    return tuple(part + name[len(base):] for part in PROJECTION_PARTS[base]) if base in PROJECTION_PARTS else None


def projection_widths(spec: BaseSpec) -> dict[str, tuple[int, ...]]:
    """LLaMA's fused weight -> the widths of its column blocks, in PROJECTION_PARTS order."""
    Hq, Hkv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    return {"qkv": (Hq * hd, Hkv * hd, Hkv * hd), "gate_up": (spec.d_ff, spec.d_ff)}


def separate_projections(spec: BaseSpec, layers: Params) -> Params:
    """LLaMA's stacked qkv / gate_up weights (and biases) as separate contiguous tensors q, k, v,
    gate, up (+ `_bias`): what the fused fp16/bf16 graphs multiply by (one MatMul each, no Split of a
    fused output; exporter/trace.py). Other weights are passed through; a GPT-2 dict is returned as is."""
    if spec.architecture != "llama":
        return dict(layers)
    widths = projection_widths(spec)
    out = {}
    for name, w in layers.items():
        blocks = block_names(name)
        if blocks is None:
            out[name] = w
            continue
        for block_name, block in zip(blocks, torch.split(w, widths[name.removesuffix("_bias")], dim=-1)):
            out[block_name] = block.contiguous()  # (n, d, width) / (n, width)
    return out


def _projections(x: torch.Tensor, p: Params, spec: BaseSpec, fused: str) -> tuple[torch.Tensor, ...]:
    """x @ W for each block of the fused weight `fused` (PROJECTION_PARTS): separate MatMuls when `p`
    holds the blocks (separate_projections), else one MatMul of the fused weight and column slices."""
    parts = PROJECTION_PARTS[fused]
    if parts[0] in p:
        return tuple(linear(x, p[n], p.get(n + "_bias")) for n in parts)
    y = linear(x, p[fused], p.get(fused + "_bias"))
    widths = projection_widths(spec)[fused]
    ends = [sum(widths[:i + 1]) for i in range(len(widths))]
    return tuple(y[..., e - w: e] for w, e in zip(widths, ends))


def _onnx_rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                         allowed: torch.Tensor | None, Hq: int, Hkv: int, hd: int) -> torch.Tensor:
    """Rotary + attention as ONNX opset-23 RotaryEmbedding and Attention nodes on 3-D (n B, P, heads hd)
    tensors (num_heads attributes): no head transposes in the graph. cos/sin are the rows' own tables
    (n B, P, hd/2), no position_ids input (so no cos cache with a batch-1 shape). `allowed` None:
    is_causal=1 and no mask. q (n, B, P, Hq hd), k/v (n, B, P, Hkv hd) -> (n, B, P, Hq hd)."""
    n, B, P, _ = q.shape
    cos, sin = (t[:, :, 0, :, : hd // 2].reshape(n * B, P, hd // 2) for t in rope)  # (n B, P, hd/2)
    q3 = torch.onnx.ops.rotary_embedding(q.reshape(n * B, P, Hq * hd), cos, sin, num_heads=Hq)
    k3 = torch.onnx.ops.rotary_embedding(k.reshape(n * B, P, Hkv * hd), cos, sin, num_heads=Hkv)
    mask = None if allowed is None else allowed.reshape(n * B, 1, P, P)  # (n B, 1, P, P)
    y, _, _, _ = torch.onnx.ops.attention(q3, k3, v.reshape(n * B, P, Hkv * hd), mask, is_causal=allowed is None,
                                          q_num_heads=Hq, kv_num_heads=Hkv, scale=1.0 / math.sqrt(hd))
    return y.reshape(n, B, P, Hq * hd)  # (n B, P, Hq hd) -> (n, B, P, Hq hd)


def llama_block(spec: BaseSpec, p: Params, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                allowed: torch.Tensor, fused: Fused = False) -> torch.Tensor:
    """One LLaMA decoder layer per slot of the n axis. h (n, B, P, d) -> (n, B, P, d).

    With `fused` ONNX_ATTENTION / ONNX_CAUSAL (the exporter's fp16/bf16 graphs) rotary and attention
    are ONNX RotaryEmbedding + Attention nodes on 3-D tensors; otherwise the math written out (or SDPA)."""
    Hq, Hkv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    x = rms_norm(h, p["attn_norm"], spec.norm_eps)
    q, k, v = _projections(x, p, spec, "qkv")  # (n, B, P, H hd)
    if fused in (ONNX_ATTENTION, ONNX_CAUSAL):
        a = _onnx_rope_attention(q, k, v, rope, allowed if fused == ONNX_ATTENTION else None, Hq, Hkv, hd)
    else:
        q, k, v = _split_heads(q, Hq, hd), _split_heads(k, Hkv, hd), _split_heads(v, Hkv, hd)  # (n, B, H, P, hd)
        cos, sin = rope
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        a = _merge_heads(attend(q, k, v, allowed, fused))  # (n, B, P, Hq hd)
    h = h + linear(a, p["o"], p.get("o_bias"))
    x = rms_norm(h, p["mlp_norm"], spec.norm_eps)
    gate, up = _projections(x, p, spec, "gate_up")  # (n, B, P, F)
    return h + linear(F.silu(gate) * up, p["down"], p.get("down_bias"))


def gpt2_block(spec: BaseSpec, p: Params, h: torch.Tensor, rope: None, allowed: torch.Tensor,
               fused: Fused = False) -> torch.Tensor:
    """One GPT-2 block per slot of the n axis. h (n, B, P, d) -> (n, B, P, d)."""
    H, hd, d = spec.n_heads, spec.head_dim, spec.d_model
    x = layer_norm(h, p["ln1_w"], p["ln1_b"], spec.norm_eps)
    qkv = linear(x, p["qkv"], p["qkv_bias"])  # (n, B, P, 3 d)
    q, k, v = (_split_heads(qkv[..., i * d: (i + 1) * d], H, hd) for i in range(3))
    a = _merge_heads(attend(q, k, v, allowed, fused))
    h = h + linear(a, p["o"], p["o_bias"])
    x = layer_norm(h, p["ln2_w"], p["ln2_b"], spec.norm_eps)
    x = gelu_tanh(linear(x, p["fc"], p["fc_bias"]))
    return h + linear(x, p["proj"], p["proj_bias"])


BLOCKS = {"llama": llama_block, "gpt2": gpt2_block}
