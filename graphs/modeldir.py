"""Model directories: ``config.json`` (base HF config), ``armt_config.json``, ``model.safetensors``
(or shards ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``: graphs/tensorfile.py).

``armt_config.json`` records the model kind ("kind": "armt" or "rmt"; a file without it is an ARMT,
as every directory written before RMT support is), so one loader serves both: `load_model_dir`
returns a graphs.model.ArmtModel or a graphs.rmt.RmtModel (`model_class`).

The model id (graphs/identity.py: config and every weight, either kind) is computed when the
directory is written and recorded in the safetensors header (metadata key ``armt_model_id``);
loading reads it from the header and sets the model's ``recorded_model_id`` (no hashing). A weights
file without it (written by another tool) gets its id computed from the tensors when one is needed.
The id does not depend on the file layout: the same tensors sharded or not have the same id.

Large models: loading maps the files (no read until a tensor is used), builds the model on the meta
device (no random initialisation) and assigns the stacked tensors (`load_state_dict(assign=True)`),
each allocated once and filled layer by layer; the stored dtype is kept (a bf16 directory loads as
bf16; the ARMT memory weights are always fp32). Saving writes each tensor in its own dtype, tensor by
tensor (`shard_bytes`: shards of at most that many bytes, with an index).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from graphs.atomic import atomic_directory
from graphs.config import ModelConfig, parse_base_config, wrapper_config_file, wrapper_config_from_dict
from graphs.errors import CheckpointError, ConfigError
from graphs.hf_layout import hf_tensors, params_from_hf
from graphs.model import ArmtModel
from graphs import tensorfile

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
    """Every tensor of one safetensors file, mapped lazily (graphs/tensorfile.read_file)."""
    return tensorfile.read_file(path)


def model_from_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: str,
                       dtype: torch.dtype | None = None) -> ArmtModel:
    """Build a model of the config's kind (eval mode) from HF-named tensors: built on the meta device,
    the stacked tensors assigned (no initialisation, one copy of the weights). `dtype`: of the base
    weights (default: the stored one, graphs/hf_layout.stored_dtype); memory weights stay fp32."""
    params = params_from_hf(cfg, tensors, source, dtype)
    model = model_class(cfg)(cfg, empty=True)
    state = {f"{group}.{name}": t for group, values in params.items() for name, t in values.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def recorded_model_id(model_dir: str | Path) -> str | None:
    """The model id recorded when the directory was written (None for weights written elsewhere)."""
    return tensorfile.dir_metadata(model_dir).get(MODEL_ID_KEY) or None


def weights_source(model_dir: Path) -> str:
    """The weights of a model directory, as error messages name them."""
    index = model_dir / tensorfile.INDEX
    return str(index if index.is_file() else model_dir / WEIGHTS)


def load_model_dir(model_dir: str | Path) -> ArmtModel:
    """The model of a directory (either kind), in its stored dtype."""
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    model = model_from_tensors(cfg, tensorfile.read_dir(model_dir), weights_source(model_dir))
    recorded = recorded_model_id(model_dir)
    # the id covers the config too: a config edited after writing makes the recorded id stale
    model.recorded_model_id = recorded if recorded and recorded.split("-")[0] == cfg.fingerprint() else None
    return model


def stored_model_id(model) -> str:
    """The id of `model` as save_model_dir stores it and load_model_dir gives it back (the base weights
    in one dtype, the memory weights fp32; graphs/hf_layout.hf_tensors)."""
    from graphs.hf_layout import base_dtype
    from graphs.identity import config_json, weights_id
    cfg = model.cfg
    dtype = base_dtype(model)
    named = [(n, p.detach().float() if n.startswith("mem.") else p.detach().to(dtype))
             for n, p in model.named_parameters()]
    return weights_id(cfg.fingerprint(), config_json(cfg.base.hf_config, cfg.armt.to_dict()), named)


def save_model_dir(model: ArmtModel, model_dir: str | Path, overwrite: bool = False,
                   extra_files: dict[str, str] | None = None, shard_bytes: int | None = None,
                   tokenizer_dir: str | Path | None = None) -> Path:
    """Write a model directory atomically, the weights in the model's own dtype (no fp32 copy of a
    bf16 model). `extra_files`: name -> text (a model card, say). `shard_bytes`: split the weights
    into shards of at most that many bytes, with model.safetensors.index.json (None: one file).
    `tokenizer_dir`: a directory whose HF tokenizer files are copied in (loaded first as a check, and
    refused when its vocabulary is larger than the model's; graphs/tokenizer.py). Tokenizer files do
    not enter the model id."""
    cfg = model.cfg
    model_id = stored_model_id(model)  # of the weights as they will load
    with atomic_directory(model_dir, overwrite=overwrite) as stage:
        (stage / CONFIG).write_text(json.dumps(cfg.base.hf_config, indent=2, sort_keys=True) + "\n")
        (stage / ARMT_CONFIG).write_text(json.dumps(wrapper_config_file(cfg.armt), indent=2) + "\n")
        tensorfile.write_dir(stage, hf_tensors(model), {"format": "pt", MODEL_ID_KEY: model_id}, shard_bytes)
        for name, text in (extra_files or {}).items():
            (stage / name).write_text(text)
        if tokenizer_dir is not None:
            from graphs.tokenizer import copy_tokenizer, load_tokenizer
            copy_tokenizer(tokenizer_dir, stage)
            load_tokenizer(stage).check_fits(cfg.base.vocab_size)
    return Path(model_dir)
