"""Random-weight ARMTs of a preset's shape (graphs.synthetic), built directly in the export dtype.

`ArmtModel(cfg)` allocates fp32 weights; for a LLaMA-1B shape that alone is ~5 GB. Here the model is
made on the meta device and each parameter is then allocated once, in its final dtype (layers,
embeddings, head: the export precision; memory weights: fp32), and filled like ArmtModel's
initialiser does (norm weights 1, biases 0, the rest N(0, std)). Peak memory ~ the weights' size.
"""

from __future__ import annotations

import logging

import torch

from graphs.blocks import rope_inv_freq
from graphs.model import ArmtModel
from graphs.synthetic import synthetic_config

log = logging.getLogger("armt.export")


def synthetic_model(preset: str, dtype: torch.dtype = torch.float32, seed: int = 0, init_std: float = 0.02,
                    **config_overrides) -> ArmtModel:
    cfg = synthetic_config(preset, **config_overrides)
    with torch.device("meta"):
        model = ArmtModel(cfg, init_std=init_std)
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for group_name in ("globals", "layers", "mem"):
        group = getattr(model, group_name)
        target = torch.float32 if group_name == "mem" else dtype
        for name, p in group.items():
            if name.endswith(("norm", "norm_w", "ln1_w", "ln2_w")):
                t = torch.ones(p.shape, dtype=target)
            elif name.endswith(("_bias", "_b", "b_b")):
                t = torch.zeros(p.shape, dtype=target)
            else:
                t = torch.empty(p.shape, dtype=target)
                for row in t.view(t.shape[0], -1) if t.dim() > 1 else [t]:  # fill in slices: no fp32 copy
                    row.copy_(torch.randn(row.shape, generator=gen) * init_std)
            group[name] = torch.nn.Parameter(t, requires_grad=False)
            total += t.numel() * t.element_size()
    if model.inv_freq is not None:
        model.inv_freq = rope_inv_freq(cfg.base)
    log.info("synthetic %s model: %.2f GB of random weights", preset, total / 1e9)
    return model.eval()
