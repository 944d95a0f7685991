"""Model directories: ``config.json`` (base HF config), ``armt_config.json``, ``model.safetensors``.

``armt_config.json`` records the model kind ("kind": "armt" or "rmt"; a file without it is an ARMT,
as every directory written before RMT support is), so one loader serves both: `load_model_dir`
returns a graphs.model.ArmtModel or a graphs.rmt.RmtModel (`model_class`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from graphs.atomic import atomic_directory
from graphs.config import ModelConfig, parse_base_config, wrapper_config_file, wrapper_config_from_dict
from graphs.errors import CheckpointError, ConfigError
from graphs.hf_layout import hf_from_params, params_from_hf
from graphs.model import ArmtModel

CONFIG = "config.json"
ARMT_CONFIG = "armt_config.json"
WEIGHTS = "model.safetensors"


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what}: {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what}: {path} is not valid JSON ({exc})") from None


def load_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"model directory {model_dir} does not exist")
    base = parse_base_config(read_json(model_dir / CONFIG, "base config"))
    armt = wrapper_config_from_dict(read_json(model_dir / ARMT_CONFIG, "ARMT config"))
    return ModelConfig(base, armt)


def model_class(cfg: ModelConfig) -> type:
    """The torch model of a config's kind: ArmtModel or RmtModel."""
    if cfg.kind == "rmt":
        from graphs.rmt import RmtModel
        return RmtModel
    return ArmtModel


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None


def model_from_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> ArmtModel:
    """Build a model of the config's kind (fp32, eval mode) from HF-named tensors."""
    params = params_from_hf(cfg, tensors, source)
    model = model_class(cfg)(cfg)
    with torch.no_grad():
        for group, values in params.items():
            if not values:
                continue  # an RMT has no memory weights
            target = getattr(model, group)
            for name, tensor in values.items():
                target[name].copy_(tensor)
    return model.eval()


def load_model_dir(model_dir: str | Path) -> ArmtModel:
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    return model_from_tensors(cfg, load_safetensors(model_dir / WEIGHTS), str(model_dir / WEIGHTS))


def save_model_dir(model: ArmtModel, model_dir: str | Path, overwrite: bool = False,
                   extra_files: dict[str, str] | None = None) -> Path:
    """Write a model directory atomically. `extra_files`: name -> text (a model card, say)."""
    from safetensors.torch import save_file
    cfg = model.cfg
    with atomic_directory(model_dir, overwrite=overwrite) as stage:
        (stage / CONFIG).write_text(json.dumps(cfg.base.hf_config, indent=2, sort_keys=True) + "\n")
        (stage / ARMT_CONFIG).write_text(json.dumps(wrapper_config_file(cfg.armt), indent=2) + "\n")
        save_file(hf_from_params(model), str(stage / WEIGHTS), metadata={"format": "pt"})
        for name, text in (extra_files or {}).items():
            (stage / name).write_text(text)
    return Path(model_dir)
