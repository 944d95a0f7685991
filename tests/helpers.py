"""Tiny models and comparisons shared by the tests."""

from __future__ import annotations

import numpy as np
import torch

from graphs.config import ArmtConfig, ModelConfig, RmtConfig, parse_base_config
from graphs.model import ArmtModel
from graphs.rmt import RmtModel
from graphs.synthetic import PRESETS

TINY_BASES = {
    "llama": dict(PRESETS["tiny"], hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, vocab_size=61),
    "gpt2": dict(PRESETS["tiny-gpt2"], n_embd=32, n_layer=3, n_head=4, n_positions=40, vocab_size=61),
}


def tiny_config(arch: str = "llama", segment_size: int = 6, num_mem_tokens: int = 3, d_mem: int = 4,
                wrap_pos: bool = False, correction: bool = True, **base_overrides) -> ModelConfig:
    base = parse_base_config(dict(TINY_BASES[arch], **base_overrides))
    return ModelConfig(base, ArmtConfig(arch, segment_size, num_mem_tokens, d_mem,
                                        correction=correction, wrap_pos=wrap_pos))


def tiny_model(arch: str = "llama", seed: int = 0, **kw) -> ArmtModel:
    """Random weights scaled so that the memory changes the outputs clearly (reads move logits by ~20%)
    while the memory state stays well-conditioned (fp32 vs float64 ~1e-6; std 0.15 amplified rounding
    to 1e-5..2e-4 in the memory of GPT-2 wrap_pos models, see tests/precision.py)."""
    return ArmtModel(tiny_config(arch, **kw), init_std=0.1, mem_init_std=0.03, seed=seed).eval()


def tiny_rmt_config(arch: str = "llama", segment_size: int = 6, num_mem_tokens: int = 3, wrap_pos: bool = False,
                    **base_overrides) -> ModelConfig:
    base = parse_base_config(dict(TINY_BASES[arch], **base_overrides))
    return ModelConfig(base, RmtConfig(arch, segment_size, num_mem_tokens, wrap_pos=wrap_pos))


def tiny_rmt(arch: str = "llama", seed: int = 0, **kw) -> RmtModel:
    """A tiny RMT with random weights (the carried memory is a normed hidden state: it matters)."""
    return RmtModel(tiny_rmt_config(arch, **kw), init_std=0.15, seed=seed).eval()


def as_torch(x) -> torch.Tensor:
    """A torch tensor of a numpy array (runner results) or a tensor (the model's own results)."""
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def same(a, b) -> bool:
    """Equal element for element (numpy arrays or tensors)."""
    return torch.equal(as_torch(a).cpu(), as_torch(b).cpu())


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (NaN anywhere gives inf); numpy arrays or tensors."""
    a, b = as_torch(a).double().cpu(), as_torch(b).double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def flip_bits(path, offset: int, mask: int) -> None:
    """Corrupt one byte of a file in place (XOR with `mask`): a stand-in for a damaged artifact."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ mask]))
