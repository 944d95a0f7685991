"""The fp32 model against an independent float64 re-derivation of the ARMT equations (issue 2).

The reference below is written from the equations, one batch row and one segment at a time, in numpy
float64, with its own weights (random, HF names). The model receives the same weights (rounded to fp32)
through the model-directory loader, runs the padded batch with both schedules, and must agree on
every real token's logits and on every layer's final memory (A, z).

    segment s of a row: x = [E[tokens]; MEM] (+ position table rows for GPT-2)
    for each layer l:   s > 0: q = phi(x Wq^T);  x += (q A) / (q . z + 1e-5)
                        x = block(x)
                        m = x[-M:]; k = phi(m Wk^T); v = m Wv^T; beta = sigmoid(m Wb^T + bb)
                        s = 0: v_prev = 0, gamma = 1
                        else:  v_prev = (k A) / (k . z + eps), gamma = clip(1 - (k . z + eps) / (|k|^2 + eps), 0, 1)
                        A += sum_i beta_i k_i^T (v_i - v_prev_i);  z += sum_i gamma_i k_i
    logits = head(final_norm(x[:c]))
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphs.config import ArmtConfig, ModelConfig, parse_base_config
from graphs.modeldir import model_from_tensors
from tests.helpers import rel_err

EPS = 1e-5
T, M, D_MEM, NU = 5, 3, 4, 3
LENGTHS = (17, 12)  # row 0: 4 segments (last has 2 tokens); row 1: 3 segments, none in the 4th
TOL = 5e-6  # measured max 2.1e-6 (gpt2 logits); see docs/checkpoints.md

CASES = {
    "llama": dict(model_type="llama", vocab_size=61, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, rms_norm_eps=1e-6, rope_theta=10000.0,
                  attention_bias=True, tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", vocab_size=61, n_embd=32, n_layer=3, n_head=4, n_positions=24, n_inner=40,
                 layer_norm_epsilon=1e-5, activation_function="gelu_new"),
    "gpt2-wrap-pos": dict(model_type="gpt2", vocab_size=61, n_embd=32, n_layer=3, n_head=4, n_positions=24,
                          n_inner=40, layer_norm_epsilon=1e-5, activation_function="gelu_new"),
}


# ------------------------------------------------------------------------------------ weights
def make_weights(hf: dict, seed: int) -> dict[str, np.ndarray]:
    """HF-named float64 weights (already rounded to fp32 values), torch Linear layout for LLaMA."""
    rng = np.random.default_rng(seed)
    V, L = hf["vocab_size"], hf.get("num_hidden_layers", hf.get("n_layer"))
    d = hf.get("hidden_size", hf.get("n_embd"))

    def mat(*shape, std=0.15):
        return rng.standard_normal(shape) * std

    def norm(n):
        return 1.0 + 0.1 * rng.standard_normal(n)

    w = {"armt.memory": mat(M, d)}
    if hf["model_type"] == "llama":
        H, Hkv, F = hf["num_attention_heads"], hf["num_key_value_heads"], hf["intermediate_size"]
        hd = d // H
        w.update({"model.embed_tokens.weight": mat(V, d), "model.norm.weight": norm(d), "lm_head.weight": mat(V, d)})
        for i in range(L):
            p = f"model.layers.{i}."
            w.update({p + "input_layernorm.weight": norm(d), p + "post_attention_layernorm.weight": norm(d),
                      p + "self_attn.q_proj.weight": mat(H * hd, d), p + "self_attn.k_proj.weight": mat(Hkv * hd, d),
                      p + "self_attn.v_proj.weight": mat(Hkv * hd, d), p + "self_attn.o_proj.weight": mat(d, H * hd),
                      p + "self_attn.q_proj.bias": mat(H * hd, std=0.05), p + "self_attn.k_proj.bias": mat(Hkv * hd, std=0.05),
                      p + "self_attn.v_proj.bias": mat(Hkv * hd, std=0.05), p + "self_attn.o_proj.bias": mat(d, std=0.05),
                      p + "mlp.gate_proj.weight": mat(F, d), p + "mlp.up_proj.weight": mat(F, d),
                      p + "mlp.down_proj.weight": mat(d, F)})
    else:
        F = hf["n_inner"]
        rows = hf["n_positions"] + (M if hf.get("_wrap_pos") else 0)
        w.update({"transformer.wte.weight": mat(V, d), "transformer.wpe.weight": mat(rows, d, std=0.1),
                  "transformer.ln_f.weight": norm(d), "transformer.ln_f.bias": mat(d, std=0.05)})
        for i in range(L):
            p = f"transformer.h.{i}."
            w.update({p + "ln_1.weight": norm(d), p + "ln_1.bias": mat(d, std=0.05),
                      p + "attn.c_attn.weight": mat(d, 3 * d), p + "attn.c_attn.bias": mat(3 * d, std=0.05),
                      p + "attn.c_proj.weight": mat(d, d), p + "attn.c_proj.bias": mat(d, std=0.05),
                      p + "ln_2.weight": norm(d), p + "ln_2.bias": mat(d, std=0.05),
                      p + "mlp.c_fc.weight": mat(d, F), p + "mlp.c_fc.bias": mat(F, std=0.05),
                      p + "mlp.c_proj.weight": mat(F, d), p + "mlp.c_proj.bias": mat(d, std=0.05)})
    for i in range(L):
        p = f"armt.layers.{i}."
        w.update({p + "W_mq.weight": mat(D_MEM, d, std=0.03), p + "W_mk.weight": mat(D_MEM, d, std=0.03),
                  p + "W_mv.weight": mat(d, d, std=0.03), p + "W_mb.weight": mat(1, d, std=0.03),
                  p + "W_mb.bias": mat(1, std=0.05)})
    return {k: v.astype(np.float32).astype(np.float64) for k, v in w.items()}


# ------------------------------------------------------------------------------------ the reference
def phi(x: np.ndarray) -> np.ndarray:
    """DPFP: u = [relu(x), relu(-x)]; concat over j = 1..nu of u * roll(u, j)."""
    u = np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], axis=-1)
    return np.concatenate([u * np.roll(u, j, axis=-1) for j in range(1, NU + 1)], axis=-1)


def softmax_causal(scores: np.ndarray) -> np.ndarray:
    P = scores.shape[0]
    scores = np.where(np.tril(np.ones((P, P), dtype=bool)), scores, -np.inf)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def rms_norm(x, w, eps):
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def rotate(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """Rotary embedding, rotate-half convention: x (P, hd) at positions pos (P,)."""
    hd = x.shape[-1]
    freq = pos[:, None] * theta ** (-np.arange(0, hd, 2) / hd)[None, :]  # (P, hd/2)
    cos, sin = np.cos(np.concatenate([freq, freq], -1)), np.sin(np.concatenate([freq, freq], -1))
    rot = np.concatenate([-x[:, hd // 2:], x[:, : hd // 2]], -1)
    return x * cos + rot * sin


def llama_layer(x, w, p, hf, pos):
    d, H, Hkv = x.shape[1], hf["num_attention_heads"], hf["num_key_value_heads"]
    hd = d // H
    eps = hf["rms_norm_eps"]
    xn = rms_norm(x, w[p + "input_layernorm.weight"], eps)
    q = xn @ w[p + "self_attn.q_proj.weight"].T + w[p + "self_attn.q_proj.bias"]
    k = xn @ w[p + "self_attn.k_proj.weight"].T + w[p + "self_attn.k_proj.bias"]
    v = xn @ w[p + "self_attn.v_proj.weight"].T + w[p + "self_attn.v_proj.bias"]
    heads = []
    for h in range(H):
        g = h // (H // Hkv)  # grouped-query attention: query head h reads key/value head g
        qh = rotate(q[:, h * hd:(h + 1) * hd], pos, hf["rope_theta"])
        kh = rotate(k[:, g * hd:(g + 1) * hd], pos, hf["rope_theta"])
        heads.append(softmax_causal(qh @ kh.T / np.sqrt(hd)) @ v[:, g * hd:(g + 1) * hd])
    x = x + np.concatenate(heads, -1) @ w[p + "self_attn.o_proj.weight"].T + w[p + "self_attn.o_proj.bias"]
    xn = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
    gate, up = xn @ w[p + "mlp.gate_proj.weight"].T, xn @ w[p + "mlp.up_proj.weight"].T
    return x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T


def gpt2_layer(x, w, p, hf, pos):
    d, H = x.shape[1], hf["n_head"]
    hd, eps = d // H, hf["layer_norm_epsilon"]
    qkv = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps) @ w[p + "attn.c_attn.weight"] \
        + w[p + "attn.c_attn.bias"]
    q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
    heads = [softmax_causal(q[:, s] @ k[:, s].T / np.sqrt(hd)) @ v[:, s]
             for s in (slice(h * hd, (h + 1) * hd) for h in range(H))]
    x = x + np.concatenate(heads, -1) @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
    a = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps) @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"]
    a = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)))
    return x + a @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]


def reference_row(w: dict, hf: dict, ids: np.ndarray, wrap_pos: bool, correction: bool, trace: dict):
    """One batch row alone: logits (n, V) and final A (L, K, d), z (L, K), all float64."""
    llama = hf["model_type"] == "llama"
    L = hf["num_hidden_layers"] if llama else hf["n_layer"]
    d = w["armt.memory"].shape[1]
    K = 2 * NU * D_MEM
    A, z = np.zeros((L, K, d)), np.zeros((L, K))
    logits = []
    for s, start in enumerate(range(0, len(ids), T)):
        tok = ids[start:start + T]
        c = len(tok)
        if llama:
            x = np.concatenate([w["model.embed_tokens.weight"][tok], w["armt.memory"]])
            pos = np.arange(c + M)
        else:
            x = np.concatenate([w["transformer.wte.weight"][tok], w["armt.memory"]])
            rows = w["transformer.wpe.weight"].shape[0]
            pos = np.concatenate([np.arange(c), np.arange(rows - M, rows)]) if wrap_pos else np.arange(c + M)
            x = x + w["transformer.wpe.weight"][pos]
        for l in range(L):
            mem = f"armt.layers.{l}."
            if s > 0:  # read
                q = phi(x @ w[mem + "W_mq.weight"].T)  # (P, K)
                read = (q @ A[l]) / (q @ z[l] + EPS)[:, None]
                trace["read"].append(np.abs(read).max() / np.abs(x).max())
                x = x + read
            x = (llama_layer if llama else gpt2_layer)(x, w, f"{'model.layers' if llama else 'transformer.h'}.{l}.",
                                                       hf, pos.astype(np.float64))
            m = x[c:]  # the M memory rows
            dA, dz = np.zeros_like(A[l]), np.zeros_like(z[l])
            for i in range(M):  # write, one memory row at a time
                k = phi(m[i] @ w[mem + "W_mk.weight"].T)  # (K,)
                v = m[i] @ w[mem + "W_mv.weight"].T  # (d,)
                beta = 1 / (1 + np.exp(-(m[i] @ w[mem + "W_mb.weight"][0] + w[mem + "W_mb.bias"][0])))
                if s == 0:
                    v_prev, gamma = np.zeros(d), 1.0
                else:
                    kz = k @ z[l] + EPS
                    v_prev = (k @ A[l]) / kz
                    gamma = float(np.clip(1 - kz / (k @ k + EPS), 0, 1)) if correction else 1.0
                    trace["gamma"].append(gamma)
                dA += beta * np.outer(k, v - v_prev)
                dz += gamma * k
            A[l], z[l] = A[l] + dA, z[l] + dz
        if llama:
            h = rms_norm(x[:c], w["model.norm.weight"], hf["rms_norm_eps"])
            logits.append(h @ w["lm_head.weight"].T)
        else:
            h = layer_norm(x[:c], w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], hf["layer_norm_epsilon"])
            logits.append(h @ w["transformer.wte.weight"].T)
    return np.concatenate(logits), A, z


# ------------------------------------------------------------------------------------ the comparison
def setup(case: str, correction: bool = True):
    hf = dict(CASES[case])
    wrap_pos = case.endswith("wrap-pos")
    w = make_weights(dict(hf, _wrap_pos=wrap_pos), seed=sorted(CASES).index(case))
    base = parse_base_config(hf)
    cfg = ModelConfig(base, ArmtConfig(base.architecture, T, M, D_MEM, nu=NU, correction=correction,
                                       wrap_pos=wrap_pos))
    model = model_from_tensors(cfg, {k: torch.tensor(v, dtype=torch.float32) for k, v in w.items()}, "reference")
    rng = np.random.default_rng(100)
    ids = rng.integers(0, hf["vocab_size"], size=(len(LENGTHS), max(LENGTHS)))
    mask = (np.arange(ids.shape[1])[None, :] < np.array(LENGTHS)[:, None]).astype(np.int64)
    return hf, w, model, ids, mask, wrap_pos


@pytest.mark.parametrize("correction", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_model_matches_float64_reference(case, correction):
    hf, w, model, ids, mask, wrap_pos = setup(case, correction)
    trace = {"read": [], "gamma": []}
    refs = [reference_row(w, hf, ids[b, :n], wrap_pos, correction, trace) for b, n in enumerate(LENGTHS)]
    for schedule in ("sequential", "diagonal"):
        with torch.no_grad():
            out = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), schedule=schedule)
        for b, n in enumerate(LENGTHS):
            logits, A, z = refs[b]
            errs = (rel_err(out.logits[b, :n], torch.from_numpy(logits)),
                    rel_err(out.state.A[:, b], torch.from_numpy(A)), rel_err(out.state.z[:, b], torch.from_numpy(z)))
            assert max(errs) < TOL, (schedule, b, errs)
            assert torch.equal(out.logits[b, n:], torch.zeros_like(out.logits[b, n:]))  # padding places
    # the data exercise what is being tested: reads move the hidden state, and (with correction)
    # gamma takes values strictly between 0 and 1 as well as clipped ones
    assert max(trace["read"]) > 0.05
    if correction:
        gammas = np.array(trace["gamma"])
        assert ((gammas > 0.01) & (gammas < 0.99)).any()


def test_reference_is_sensitive_to_the_correction():
    """A model without the correction differs from the reference with it: the test can fail."""
    hf, w, model, ids, mask, wrap_pos = setup("llama", correction=False)
    logits, _, _ = reference_row(w, hf, ids[0, :LENGTHS[0]], wrap_pos, True, {"read": [], "gamma": []})
    with torch.no_grad():
        out = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), schedule="sequential")
    assert rel_err(out.logits[0, :LENGTHS[0]], torch.from_numpy(logits)) > 100 * TOL
