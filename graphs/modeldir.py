"""Model directories: ``config.json`` (base HF config), ``armt_config.json``, ``model.safetensors``.

``armt_config.json`` records the model kind ("kind": "armt" or "rmt"; a file without it is an ARMT,
as every directory written before RMT support is), so one loader serves both: `load_model_dir`
returns a graphs.model.ArmtModel or a graphs.rmt.RmtModel (`model_class`).

The model id (graphs/identity.py: config and every weight, either kind) is computed when the
directory is written and recorded in the safetensors header (metadata key ``armt_model_id``);
loading reads it from the header and sets the model's ``recorded_model_id`` (no hashing). A weights
file without it (written by another tool) gets its id computed from the tensors when one is needed.
"""

from __future__ import annotations

import copy
import json
import struct
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
MODEL_ID_KEY = "armt_model_id"


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


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (8-byte length, then JSON), {} when it has none."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return {}
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def recorded_model_id(model_dir: str | Path) -> str | None:
    """The model id recorded when the directory was written (None for weights written elsewhere)."""
    return safetensors_metadata(Path(model_dir) / WEIGHTS).get(MODEL_ID_KEY) or None


def load_model_dir(model_dir: str | Path) -> ArmtModel:
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    model = model_from_tensors(cfg, load_safetensors(model_dir / WEIGHTS), str(model_dir / WEIGHTS))
    recorded = recorded_model_id(model_dir)
    # the id covers the config too: a config edited after writing makes the recorded id stale
    model.recorded_model_id = recorded if recorded and recorded.split("-")[0] == cfg.fingerprint() else None
    return model


def save_model_dir(model: ArmtModel, model_dir: str | Path, overwrite: bool = False,
                   extra_files: dict[str, str] | None = None, tokenizer_dir: str | Path | None = None) -> Path:
    """Write a model directory atomically. `extra_files`: name -> text (a model card, say);
    `tokenizer_dir`: a directory whose HF tokenizer files are copied in (loaded first as a check, and
    refused when its vocabulary is larger than the model's; graphs/tokenizer.py). Tokenizer files do
    not enter the model id."""
    from safetensors.torch import save_file
    cfg = model.cfg
    # the id of the weights as they will load (fp32)
    model_id = (model if model.dtype == torch.float32 else copy.deepcopy(model).cast(torch.float32)).model_id()
    with atomic_directory(model_dir, overwrite=overwrite) as stage:
        (stage / CONFIG).write_text(json.dumps(cfg.base.hf_config, indent=2, sort_keys=True) + "\n")
        (stage / ARMT_CONFIG).write_text(json.dumps(wrapper_config_file(cfg.armt), indent=2) + "\n")
        save_file(hf_from_params(model), str(stage / WEIGHTS),
                  metadata={"format": "pt", MODEL_ID_KEY: model_id})
        for name, text in (extra_files or {}).items():
            (stage / name).write_text(text)
        if tokenizer_dir is not None:
            from graphs.tokenizer import copy_tokenizer, load_tokenizer
            copy_tokenizer(tokenizer_dir, stage)
            load_tokenizer(stage).check_fits(cfg.base.vocab_size)
    return Path(model_dir)
