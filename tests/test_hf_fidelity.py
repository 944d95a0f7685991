"""The first segment equals the HF transformers base model fed [token embeddings; memory tokens].

On the first segment nothing is read from memory, so an ARMT is exactly the base model applied to
the token embeddings followed by the M memory vectors (positions 0..c+M-1, or for GPT-2 wrap_pos the
last M rows of the enlarged position table). This checks our decoder blocks, norms, rotary, GQA,
biases, position handling and head against transformers' own LlamaForCausalLM / GPT2LMHeadModel
(eager attention), and the first write against the memory rows of HF's hidden states.
"""

from __future__ import annotations

import pytest
import torch

from graphs.hf_layout import hf_from_params
from tests.helpers import rel_err, tiny_model

transformers = pytest.importorskip("transformers")

TOL = 5e-6  # measured at most ~1e-6 (transformers 5.23, torch 2.13 CPU)
T = 6  # segment size of tests.helpers.tiny_config

CASES = {
    "llama-gqa-bias": ("llama", dict(attention_bias=True, rope_theta=500.0), {}),
    "llama-mlp-bias-tied": ("llama", dict(mlp_bias=True, num_key_value_heads=1, tie_word_embeddings=True), {}),
    "llama3-rope": ("llama", dict(rope_theta=500000.0, rope_scaling=None, rope_parameters=None), {}),  # see LLAMA3
    "gpt2": ("gpt2", {}, {}),
    "gpt2-wrap-pos": ("gpt2", {}, dict(wrap_pos=True)),
}


# llama3 rope scaling (Llama 3.1/3.2): with head_dim 8 the four frequencies have wavelengths 6.3, 167,
# 4440 and 118000 at theta 5e5; an original context of 512 with low/high factors 1/8 puts them in all
# three bands (below 64: kept, 64..512: smoothed, above 512: divided by the factor)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
          "original_max_position_embeddings": 512}


def _base_kw(base_kw: dict) -> dict:
    """A case's base-config overrides, with the llama3 rope parameters filled in (both spellings:
    transformers 5 reads rope_parameters, 4.x rope_scaling; ours reads either)."""
    if "rope_parameters" not in base_kw:
        return base_kw
    return dict(base_kw, rope_parameters=dict(LLAMA3, rope_theta=base_kw["rope_theta"]), rope_scaling=dict(LLAMA3))


def hf_model(model) -> torch.nn.Module:
    """The base model in transformers, carrying our model's base weights (all of them, strictly)."""
    cfg = model.cfg
    hf_cfg = dict(cfg.base.hf_config)
    if cfg.base.architecture == "llama":
        config = transformers.LlamaConfig(**hf_cfg)
        cls = transformers.LlamaForCausalLM
    else:
        hf_cfg["n_positions"] = cfg.pos_table_rows  # wrap_pos: the enlarged table
        hf_cfg.update(bos_token_id=0, eos_token_id=0)  # GPT-2's defaults (50256) lie outside the tiny vocab
        config = transformers.GPT2Config(**hf_cfg)
        cls = transformers.GPT2LMHeadModel
    config._attn_implementation = "eager"
    hf = cls(config).eval()
    tensors = {k: v for k, v in hf_from_params(model).items() if not k.startswith("armt.")}
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    allowed = {"lm_head.weight"} if cfg.base.tie_word_embeddings else set()  # tied: the embedding is it
    assert not unexpected and set(missing) <= allowed, (missing, unexpected)
    assert torch.equal(hf.get_output_embeddings().weight,
                       hf.get_input_embeddings().weight) == cfg.base.tie_word_embeddings
    return hf


@pytest.mark.parametrize("n_tokens", [T + 4, 4])  # a full first segment (+ a second one), a short only one
@pytest.mark.parametrize("case", sorted(CASES))
def test_first_segment_equals_hf_base_model(case, n_tokens):
    arch, base_kw, armt_kw = CASES[case]
    model = tiny_model(arch, seed=3, **armt_kw, **_base_kw(base_kw))
    hf = hf_model(model)
    cfg = model.cfg
    M = cfg.armt.num_mem_tokens
    ids = torch.randint(0, cfg.base.vocab_size, (2, n_tokens), generator=torch.Generator().manual_seed(5))
    c = min(n_tokens, T)
    with torch.no_grad():
        ours = model(ids, schedule="sequential", trace=True)
        embeds = torch.cat([hf.get_input_embeddings()(ids[:, :c]),
                            model.globals["memory"][None].expand(2, -1, -1)], dim=1)  # (B, c+M, d)
        kwargs = {}
        if cfg.armt.wrap_pos:
            R = cfg.pos_table_rows
            kwargs["position_ids"] = torch.cat([torch.arange(c), torch.arange(R - M, R)])[None].expand(2, -1)
        ref = hf(inputs_embeds=embeds, output_hidden_states=True, **kwargs)
    err = rel_err(ours.logits[:, :c], ref.logits[:, :c])
    assert err < TOL, err

    # the first write of layers 0..L-2 from HF's hidden states at the memory rows (no read yet, so
    # A = sum_i beta_i k_i^T v_i and z = sum_i k_i)
    first = ours.segment_states[0]
    for l in range(cfg.base.n_layers - 1):  # HF's last hidden state is after the final norm
        m = ref.hidden_states[l + 1][:, c:].double()  # (B, M, d): layer l's output at the memory rows
        w = {k: v[l].detach().double() for k, v in model.mem.items()}
        x = m @ w["w_k"]
        u = torch.cat([x.clamp_min(0), (-x).clamp_min(0)], -1)
        k = torch.cat([u * u.roll(j, -1) for j in range(1, cfg.armt.nu + 1)], -1)  # (B, M, K)
        beta = torch.sigmoid(m @ w["w_b"] + w["b_b"])  # (B, M, 1)
        A = torch.einsum("bik,bid->bkd", k * beta, m @ w["w_v"])
        assert rel_err(first.A[l], A) < TOL and rel_err(first.z[l], k.sum(1)) < TOL, l


def test_rope_theta_is_honoured():
    """Our rotary frequencies equal transformers' for a non-default theta."""
    model = tiny_model("llama", rope_theta=500.0)
    hf = hf_model(model)
    assert torch.allclose(model.inv_freq, hf.model.rotary_emb.inv_freq.float(), rtol=1e-6, atol=0)


def test_llama3_rope_scaling_equals_transformers():
    """llama3 rope scaling: our inverse frequencies equal transformers' in each of the three bands
    (kept, smoothed, divided by the factor); the logits are checked by test_first_segment_equals_hf_base_model."""
    model = tiny_model("llama", **_base_kw(CASES["llama3-rope"][1]))
    assert dict(model.cfg.base.rope_scaling)["factor"] == 8.0
    hf = hf_model(model)
    theirs = hf.model.rotary_emb.inv_freq.float()
    plain = tiny_model("llama", rope_theta=500000.0).inv_freq
    assert torch.allclose(model.inv_freq, theirs, rtol=1e-6, atol=0)
    ratio = (plain / model.inv_freq).tolist()
    assert ratio[0] == 1.0 and 1.0 < ratio[1] < 8.0 and ratio[2] == pytest.approx(8.0) and ratio[3] == pytest.approx(8.0)
