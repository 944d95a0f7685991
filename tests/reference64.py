"""An independent numpy re-derivation of the ARMT equations, in float64 (or float32), for tests.

Written from the equations, one batch row and one segment at a time, on HF-named weights (the layout
of a model directory, graphs/hf_layout.py). It shares no code with graphs/ beyond the config parser
and the weight-name mapping, so it can tell the model's equations apart from its rounding:

    segment s of a row: x = [E[tokens]; MEM] (+ position table rows for GPT-2)
    for each layer l:   s > 0: q = phi(x Wq^T);  x += (q A) / (q . z + 1e-5)
                        x = block(x)
                        m = x[-M:]; k = phi(m Wk^T); v = m Wv^T; beta = sigmoid(m Wb^T + bb)
                        s = 0: v_prev = 0, gamma = 1
                        else:  v_prev = (k A) / (k . z + eps), gamma = clip(1 - (k . z + eps) / (|k|^2 + eps), 0, 1)
                        A += sum_i beta_i k_i^T (v_i - v_prev_i);  z += sum_i gamma_i k_i
    logits = head(final_norm(x[:c]))

`dtype=np.float32` runs the same equations in fp32 with numpy's own kernels and summation order: an
fp32 realisation of the computation that is independent of torch's (tests/precision.py uses the
spread between the two fp32 realisations and the float64 one to set fp32 bounds).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from graphs.config import BaseSpec, ModelConfig

EPS = 1e-5


@dataclass
class Trace:
    """What the data exercised: read size relative to the hidden state, and the gamma values."""

    read: list[float] = field(default_factory=list)
    gamma: list[float] = field(default_factory=list)


@dataclass
class RowResult:
    logits: np.ndarray  # (n, V)
    hidden: np.ndarray  # (n, d) after the final norm
    A: np.ndarray  # (L, K, d)
    z: np.ndarray  # (L, K)


# ------------------------------------------------------------------------------------ pieces
def phi(x: np.ndarray, nu: int) -> np.ndarray:
    """DPFP: u = [relu(x), relu(-x)]; concat over j = 1..nu of u * roll(u, j)."""
    u = np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], axis=-1)
    return np.concatenate([u * np.roll(u, j, axis=-1) for j in range(1, nu + 1)], axis=-1)


def softmax_causal(scores: np.ndarray) -> np.ndarray:
    P = scores.shape[0]
    scores = np.where(np.tril(np.ones((P, P), dtype=bool)), scores, -np.inf)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def rms_norm(x, w, eps):
    return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def rotate(x: np.ndarray, pos: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotary embedding, rotate-half convention: x (P, hd) at positions pos (P,)."""
    hd = x.shape[-1]
    freq = pos[:, None] * inv_freq[None, :]  # (P, hd/2)
    cos, sin = np.cos(np.concatenate([freq, freq], -1)), np.sin(np.concatenate([freq, freq], -1))
    rot = np.concatenate([-x[:, hd // 2:], x[:, : hd // 2]], -1)
    return (x * cos + rot * sin).astype(x.dtype)


def _lin(x, w, p, name, bias: bool):
    """torch Linear layout: y = x W^T (+ b)."""
    y = x @ w[p + name + ".weight"].T
    return y + w[p + name + ".bias"] if bias else y


def llama_layer(x, w, p, b: BaseSpec, pos, inv_freq):
    H, Hkv, hd = b.n_heads, b.n_kv_heads, b.head_dim
    xn = rms_norm(x, w[p + "input_layernorm.weight"], b.norm_eps)
    q = _lin(xn, w, p, "self_attn.q_proj", b.attention_bias)
    k = _lin(xn, w, p, "self_attn.k_proj", b.attention_bias)
    v = _lin(xn, w, p, "self_attn.v_proj", b.attention_bias)
    heads = []
    for h in range(H):
        g = h // (H // Hkv)  # grouped-query attention: query head h reads key/value head g
        qh = rotate(q[:, h * hd:(h + 1) * hd], pos, inv_freq)
        kh = rotate(k[:, g * hd:(g + 1) * hd], pos, inv_freq)
        heads.append(softmax_causal(qh @ kh.T / np.sqrt(hd).astype(x.dtype)) @ v[:, g * hd:(g + 1) * hd])
    x = x + _lin(np.concatenate(heads, -1), w, p, "self_attn.o_proj", b.attention_bias)
    xn = rms_norm(x, w[p + "post_attention_layernorm.weight"], b.norm_eps)
    gate, up = _lin(xn, w, p, "mlp.gate_proj", b.mlp_bias), _lin(xn, w, p, "mlp.up_proj", b.mlp_bias)
    return x + _lin(gate / (1 + np.exp(-gate)) * up, w, p, "mlp.down_proj", b.mlp_bias)


def gpt2_layer(x, w, p, b: BaseSpec, pos, inv_freq):
    d, H = x.shape[1], b.n_heads
    hd = d // H
    qkv = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], b.norm_eps) @ w[p + "attn.c_attn.weight"] \
        + w[p + "attn.c_attn.bias"]
    q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
    heads = [softmax_causal(q[:, s] @ k[:, s].T / np.sqrt(hd).astype(x.dtype)) @ v[:, s]
             for s in (slice(h * hd, (h + 1) * hd) for h in range(H))]
    x = x + np.concatenate(heads, -1) @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
    a = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], b.norm_eps) @ w[p + "mlp.c_fc.weight"] \
        + w[p + "mlp.c_fc.bias"]
    a = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi).astype(x.dtype) * (a + 0.044715 * a ** 3)))
    return x + a @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]


def default_inv_freq(b: BaseSpec, dtype=np.float64) -> np.ndarray:
    """Rotary inverse frequencies without scaling, (head_dim / 2,)."""
    hd = b.head_dim
    return (b.rope_theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)).astype(dtype)


# ------------------------------------------------------------------------------------ one row
def reference_row(w: dict[str, np.ndarray], cfg: ModelConfig, ids: np.ndarray, trace: Trace | None = None,
                  inv_freq: np.ndarray | None = None, dtype=np.float64) -> RowResult:
    """One batch row alone (its real tokens `ids`, (n,)) through every segment, in `dtype`.

    `w`: HF-named weights (any float dtype; cast to `dtype`). `inv_freq`: the rotary table for LLaMA
    (default: unscaled, from rope_theta; pass the model's own for llama3 scaling)."""
    b, a = cfg.base, cfg.armt
    if b.architecture == "llama" and b.rope_scaling and inv_freq is None:
        raise ValueError("llama3 rope scaling: pass the model's inv_freq")
    w = {k: np.asarray(v, dtype=dtype) for k, v in w.items()}
    trace = trace if trace is not None else Trace()
    llama = b.architecture == "llama"
    L, T, M, nu = b.n_layers, a.segment_size, a.num_mem_tokens, a.nu
    d = w["armt.memory"].shape[1]
    K = 2 * nu * a.d_mem
    if llama:
        inv_freq = np.asarray(inv_freq if inv_freq is not None else default_inv_freq(b), dtype=dtype)
    A, z = np.zeros((L, K, d), dtype=dtype), np.zeros((L, K), dtype=dtype)
    eps = dtype(EPS)
    logits, hidden = [], []
    for s, start in enumerate(range(0, len(ids), T)):
        tok = ids[start:start + T]
        c = len(tok)
        if llama:
            x = np.concatenate([w["model.embed_tokens.weight"][tok], w["armt.memory"]])
            pos = np.arange(c + M)
        else:
            x = np.concatenate([w["transformer.wte.weight"][tok], w["armt.memory"]])
            rows = w["transformer.wpe.weight"].shape[0]
            pos = np.concatenate([np.arange(c), np.arange(rows - M, rows)]) if a.wrap_pos else np.arange(c + M)
            x = x + w["transformer.wpe.weight"][pos]
        for l in range(L):
            mem = f"armt.layers.{l}."
            if s > 0:  # read
                q = phi(x @ w[mem + "W_mq.weight"].T, nu)  # (P, K)
                read = (q @ A[l]) / (q @ z[l] + eps)[:, None]
                trace.read.append(float(np.abs(read).max() / np.abs(x).max()))
                x = x + read
            layer = llama_layer if llama else gpt2_layer
            x = layer(x, w, f"{'model.layers' if llama else 'transformer.h'}.{l}.", b, pos.astype(dtype), inv_freq)
            m = x[c:]  # the M memory rows
            dA, dz = np.zeros_like(A[l]), np.zeros_like(z[l])
            for i in range(M):  # write, one memory row at a time
                k = phi(m[i] @ w[mem + "W_mk.weight"].T, nu)  # (K,)
                v = m[i] @ w[mem + "W_mv.weight"].T  # (d,)
                beta = 1 / (1 + np.exp(-(m[i] @ w[mem + "W_mb.weight"][0] + w[mem + "W_mb.bias"][0])))
                if s == 0:
                    v_prev, gamma = np.zeros(d, dtype=dtype), dtype(1.0)
                else:
                    kz = k @ z[l] + eps
                    v_prev = (k @ A[l]) / kz
                    gamma = np.clip(1 - kz / (k @ k + eps), 0, 1) if a.correction else dtype(1.0)
                    trace.gamma.append(float(gamma))
                dA += beta * np.outer(k, v - v_prev)
                dz += gamma * k
            A[l], z[l] = A[l] + dA, z[l] + dz
        if llama:
            h = rms_norm(x[:c], w["model.norm.weight"], b.norm_eps)
            head = w["model.embed_tokens.weight"] if b.tie_word_embeddings else w["lm_head.weight"]
        else:
            h = layer_norm(x[:c], w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], b.norm_eps)
            head = w["transformer.wte.weight"] if b.tie_word_embeddings or "lm_head.weight" not in w \
                else w["lm_head.weight"]
        hidden.append(h)
        logits.append(h @ head.T)
    return RowResult(np.concatenate(logits), np.concatenate(hidden), A, z)


# ------------------------------------------------------------------------------------ a whole model
def hf_weights(model) -> dict[str, np.ndarray]:
    """The model's weights under their HF names, as float64 numpy arrays (exact copies of fp32 values)."""
    from graphs.hf_layout import hf_from_params
    return {k: v.detach().cpu().double().numpy() for k, v in hf_from_params(model).items()}


def reference_batch(model, ids, lengths=None, dtype=np.float64, trace: Trace | None = None) -> dict[str, np.ndarray]:
    """The ARMT `model` (graphs.model.ArmtModel) re-derived row by row in `dtype` on the same weights.

    ids (B, N) ints; lengths (B,) real tokens per row (default: all N). Returns padded arrays like the
    model's output: logits (B, N, V), hidden (B, N, d) (zero at padding places), A (L, B, K, d),
    z (L, B, K)."""
    ids = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids)
    B, N = ids.shape
    lengths = [N] * B if lengths is None else [int(n) for n in lengths]
    w = hf_weights(model)
    inv = model.inv_freq.detach().cpu().double().numpy() if getattr(model, "inv_freq", None) is not None else None
    inv = inv if model.cfg.base.rope_scaling else None
    rows = [reference_row(w, model.cfg, ids[r, :n], trace, inv, dtype) for r, n in enumerate(lengths)]
    V, d = rows[0].logits.shape[-1], rows[0].hidden.shape[-1]
    logits, hidden = np.zeros((B, N, V), dtype), np.zeros((B, N, d), dtype)
    for r, (row, n) in enumerate(zip(rows, lengths)):
        logits[r, :n], hidden[r, :n] = row.logits, row.hidden
    return {"logits": logits, "hidden": hidden, "A": np.stack([r.A for r in rows], 1),
            "z": np.stack([r.z for r in rows], 1)}
