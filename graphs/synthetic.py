"""Base-model shapes for synthetic (random-weight) ARMTs: tests, benchmarks, export-size checks."""

from __future__ import annotations

from typing import Any

from graphs.config import ArmtConfig, ModelConfig, parse_base_config
from graphs.errors import ConfigError

# HF config.json dicts with the shapes of public base models (weights are random)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(model_type="llama", vocab_size=128, hidden_size=64, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, rms_norm_eps=1e-6,
                 rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=4096),
    "tiny-gpt2": dict(model_type="gpt2", vocab_size=128, n_embd=64, n_layer=4, n_head=4, n_positions=256,
                      layer_norm_epsilon=1e-5, activation_function="gelu_new", tie_word_embeddings=True),
    "llama-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192, head_dim=64,
                     rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                     max_position_embeddings=131072),
    "llama-3b": dict(model_type="llama", vocab_size=128256, hidden_size=3072, num_hidden_layers=28,
                     num_attention_heads=24, num_key_value_heads=8, intermediate_size=8192, head_dim=128,
                     rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                     max_position_embeddings=131072),
    "llama-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, head_dim=128,
                     rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                     max_position_embeddings=131072),
}


def synthetic_config(preset: str, segment_size: int = 1024, num_mem_tokens: int = 128, d_mem: int = 64,
                     **overrides: Any) -> ModelConfig:
    """A ModelConfig of a preset's shape; `overrides` change HF config keys (e.g. num_hidden_layers=2)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown synthetic model {preset!r} (choose from {', '.join(PRESETS)})")
    hf = dict(PRESETS[preset], **overrides)
    base = parse_base_config(hf)
    return ModelConfig(base, ArmtConfig(base.architecture, segment_size, num_mem_tokens, d_mem))
