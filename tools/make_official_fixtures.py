#!/usr/bin/env python3
"""Build the official-checkpoint test fixtures by running the official ARMT code.

The official implementation (RodkinIvan/associative-recurrent-memory-transformer,
``modeling_amt/language_modeling.py``) is *not* part of this project: point ``--official-repo`` at a
checkout of it (any directory that holds ``modeling_amt/language_modeling.py``). It needs
transformers 4.x (it was written for 4.3x-4.4x; 4.46.3 works), so run this script with such an
environment, e.g.

    /path/to/venv-with-transformers-4.46/bin/python tools/make_official_fixtures.py \\
        --official-repo /path/to/associative-recurrent-memory-transformer

For every fixture it builds a tiny base model (random weights, eager attention, fp32), wraps it as
``AssociativeRecurrentWrapper(AssociativeMemoryCell(base))``, sets every weight from a seeded
generator (the official init zeros ``W_mv``, which would make the memory do nothing), runs the
wrapper on a batch of 2 rows with several segments and a short last one, and writes to
``tests/fixtures/official/<name>/``:

    checkpoint.pt     the wrapper's state_dict (torch.save): what a user of the official code has
    config.json       the base model's HF config
    armt.json         the wrapper settings (convert-official's options) and provenance
    input_ids.npy     (2, N) int64
    logits.npy        (2, N, V) float32: the official output
    hidden.npy        (2, N, d) float32: the official last hidden state (after the final norm)
    memory_A.npy      (L, 2, K, d) float32: every layer's associative matrix after the last segment
    memory_z.npy      (L, 2, K) float32: every layer's normaliser after the last segment

Nothing here is copied from the official code; it is imported and run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "official"

# name -> base HF config (without model_type-specific defaults), wrapper settings, run shape, scales
FIXTURES: dict[str, dict] = {
    "llama": dict(
        base=dict(model_type="llama", vocab_size=64, hidden_size=32, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, rms_norm_eps=1e-6,
                  rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False,
                  attention_bias=False),
        armt=dict(segment_size=5, num_mem_tokens=3, d_mem=4, correction=True, wrap_pos=False),
        tokens=17, seed=11),
    "llama-nocorr-bias": dict(
        base=dict(model_type="llama", vocab_size=64, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, intermediate_size=40, rms_norm_eps=1e-5,
                  rope_theta=500.0, max_position_embeddings=64, tie_word_embeddings=True,
                  attention_bias=True),
        armt=dict(segment_size=4, num_mem_tokens=2, d_mem=3, correction=False, wrap_pos=False),
        tokens=14, seed=12),
    "gpt2": dict(
        base=dict(model_type="gpt2", vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=24, n_inner=48,
                  layer_norm_epsilon=1e-5, activation_function="gelu_new"),
        armt=dict(segment_size=6, num_mem_tokens=3, d_mem=4, correction=True, wrap_pos=False),
        tokens=21, seed=13),
    "gpt2-wrap-pos": dict(
        base=dict(model_type="gpt2", vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=24, n_inner=48,
                  layer_norm_epsilon=1e-5, activation_function="gelu_new"),
        armt=dict(segment_size=6, num_mem_tokens=3, d_mem=4, correction=True, wrap_pos=True),
        tokens=21, seed=14),
}

BASE_STD = 0.15  # every base matrix and embedding
NORM_STD = 0.1  # norm scales are 1 + NORM_STD * noise (so a swapped norm is caught)
BIAS_STD = 0.05
MEM_STD = 0.03  # W_mq, W_mk, W_mv, W_mb: keeps q . z well above the 1e-5 epsilon yet lets memory matter
BATCH = 2


def import_official(repo: Path) -> types.ModuleType:
    if not (repo / "modeling_amt" / "language_modeling.py").is_file():
        sys.exit(f"error: {repo} does not hold modeling_amt/language_modeling.py")
    if importlib.util.find_spec("wandb") is None:
        sys.modules["wandb"] = types.ModuleType("wandb")  # imported at the top, only used in comments
    sys.path.insert(0, str(repo))
    return importlib.import_module("modeling_amt.language_modeling")


def build_base(spec: dict) -> torch.nn.Module:
    import transformers
    base = dict(spec["base"])
    arch = base.pop("model_type")
    cfg_cls, model_cls, layers = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, "model.layers"),
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, "transformer.h"),
    }[arch]
    config = cfg_cls(**base)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    if model.config._attn_implementation != "eager":
        raise RuntimeError("could not select eager attention")
    return model, layers


def set_weights(wrapper: torch.nn.Module, seed: int) -> None:
    """Every parameter from one seeded generator (named_parameters visits aliased modules once)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapper.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if any(m in name for m in (".W_mq.", ".W_mk.", ".W_mv.", ".W_mb.")):
                p.copy_(noise * (MEM_STD if name.endswith("weight") else BIAS_STD))
            elif name.endswith("memory_cell.memory"):
                p.copy_(noise * BASE_STD)
            elif p.dim() == 1 and ("norm" in name or ".ln_" in name) and name.endswith("weight"):
                p.copy_(1.0 + NORM_STD * noise)
            elif p.dim() == 1:
                p.copy_(noise * BIAS_STD)
            else:
                p.copy_(noise * BASE_STD)


class StateRecorder:
    """Wraps memory_cell.zero_mem so the memory state is captured before the wrapper clears it."""

    def __init__(self, cell: torch.nn.Module):
        self.cell = cell
        self.last: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._orig = cell.zero_mem
        cell.zero_mem = self._zero_mem

    def _zero_mem(self) -> None:
        self.last = [(layer.W_mem.detach().clone(), layer.z.detach().clone()) for layer in self.cell.layers]
        self._orig()


def make_fixture(lm: types.ModuleType, name: str, spec: dict, out_dir: Path) -> dict:
    torch.manual_seed(spec["seed"])
    base, layers_attr = build_base(spec)
    a = spec["armt"]
    cell = lm.AssociativeMemoryCell(base, num_mem_tokens=a["num_mem_tokens"], d_mem=a["d_mem"],
                                    layers_attr=layers_attr, wrap_pos=a["wrap_pos"],
                                    correction=a["correction"])
    wrapper = lm.AssociativeRecurrentWrapper(cell, segment_size=a["segment_size"]).eval()
    set_weights(wrapper, spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"] + 1000)
    V = base.config.vocab_size
    ids = torch.randint(0, V, (BATCH, spec["tokens"]), generator=gen)
    recorder = StateRecorder(cell)
    with torch.no_grad():
        out = wrapper(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    state = recorder.last
    A = torch.stack([s[0].expand(BATCH, -1, -1) for s in state])  # (L, B, K, d)
    z = torch.stack([s[1].expand(BATCH, -1) for s in state])  # (L, B, K)

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(wrapper.state_dict(), out_dir / "checkpoint.pt")
    hf = base.config.to_dict()
    hf.pop("_attn_implementation_autoset", None)
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    import transformers
    meta = dict(a, nu=3, transformers_version=transformers.__version__, torch_version=torch.__version__,
                batch=BATCH, tokens=spec["tokens"], seed=spec["seed"])
    (out_dir / "armt.json").write_text(json.dumps(meta, indent=2) + "\n")
    np.save(out_dir / "input_ids.npy", ids.numpy().astype(np.int64))
    np.save(out_dir / "logits.npy", out.logits.float().numpy())
    np.save(out_dir / "hidden.npy", out.hidden_states[-1].float().numpy())
    np.save(out_dir / "memory_A.npy", A.float().numpy())
    np.save(out_dir / "memory_z.npy", z.float().numpy())
    return {"name": name, "logits": tuple(out.logits.shape), "A": tuple(A.shape),
            "max|logit|": float(out.logits.abs().max())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-repo", required=True, type=Path,
                        help="directory holding modeling_amt/language_modeling.py of the official code")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixtures directory")
    parser.add_argument("--only", action="append", choices=sorted(FIXTURES), help="build only these")
    args = parser.parse_args()
    lm = import_official(args.official_repo.resolve())
    for name in args.only or FIXTURES:
        info = make_fixture(lm, name, FIXTURES[name], args.out / name)
        print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
