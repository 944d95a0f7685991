"""Model identities: one id over the configuration and every weight tensor.

    model id = "<config fingerprint, 16 hex>-<sha256 over config + every tensor, 16 hex>"

The second part hashes the canonical JSON of the configuration, then each parameter of the
reference model (graphs.model.ArmtModel or graphs.rmt.RmtModel: `torch_model_id`, one function for
both kinds; an RMT's configuration carries "kind": "rmt") in name order: its name, dtype, shape and raw bytes (fp32
as loaded; a cast model hashes its cast values, which are other weights). Noise on any one weight
changes the id; the same weights give the same id whatever file layout they came from.

Computed once when a model directory (graphs/modeldir.py: safetensors metadata `armt_model_id`) or an
export (manifest.json model.model_id, and the ONNX metadata of every graph) is written, and recorded
there; loading reads the recorded id (a header, no hashing). State files carry the id and are
refused by a model with another; `armt verify --model` recomputes the model directory's id from its
tensors before comparing it with the export's. Nothing here imports torch (tensors are hashed through
their numpy view).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import numpy as np

ID_SCHEME = "armt-model-id/2"  # hashed first: ids of another scheme never collide with these


def config_json(hf_config: dict[str, Any], armt_config: dict[str, Any]) -> str:
    """The canonical JSON of a model's configuration (what the manifest's model section holds)."""
    return json.dumps({"config": hf_config, "armt_config": armt_config}, sort_keys=True, separators=(",", ":"))


def config_sha256(hf_config: dict[str, Any], armt_config: dict[str, Any]) -> str:
    return hashlib.sha256(config_json(hf_config, armt_config).encode()).hexdigest()


def _host_bytes(tensor: Any) -> tuple[str, tuple[int, ...], memoryview]:
    """(dtype name, shape, raw bytes) of a numpy array or torch tensor, without copying where possible."""
    if hasattr(tensor, "detach"):  # torch: bf16 has no numpy dtype, hash its 16-bit pattern
        t = tensor.detach().cpu().contiguous()
        name = str(t.dtype).replace("torch.", "")
        if name == "bfloat16":
            import torch  # only reached with a torch tensor in hand
            t = t.view(torch.int16)
        array = t.numpy()
    else:
        array = np.ascontiguousarray(tensor)
        name = str(array.dtype)
    return name, tuple(array.shape), memoryview(array).cast("B")


def weights_id(fingerprint: str, config: str, tensors: Iterable[tuple[str, Any]]) -> str:
    """The model id of a configuration (`fingerprint`, its canonical JSON `config`) and its named tensors."""
    h = hashlib.sha256()
    h.update(ID_SCHEME.encode() + b"\0" + config.encode() + b"\0")
    for name, tensor in sorted(tensors, key=lambda kv: kv[0]):
        dtype, shape, data = _host_bytes(tensor)
        h.update(json.dumps([name, dtype, list(shape), data.nbytes]).encode() + b"\0")
        h.update(data)
    return f"{fingerprint}-{h.hexdigest()[:16]}"


def torch_model_id(model: Any) -> str:
    """The id of a reference model of either kind (graphs.model.ArmtModel, graphs.rmt.RmtModel) over its
    config and every parameter as they are now (`named_parameters`: layers, embeddings, head, memory)."""
    cfg = model.cfg
    return weights_id(cfg.fingerprint(), config_json(cfg.base.hf_config, cfg.armt.to_dict()), model.named_parameters())


def known_model_id(model: Any) -> str:
    """The id a model directory recorded for the weights `model` was loaded from (graphs/modeldir.py sets
    `recorded_model_id`), else `torch_model_id(model)`."""
    return getattr(model, "recorded_model_id", None) or torch_model_id(model)
