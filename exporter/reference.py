"""The torch reference rebuilt from an export directory alone (manifest "parameters" + weights.data).

Every model parameter was written into the export's shared weights file and indexed by name
(exporter/weights.py SharedWeights.index_parameters), in the export precision (memory weights fp32),
so `armt verify EXPORT_DIR` needs no model directory: the model here is exactly the one the graphs
were traced from, already at the export precision.
"""

from __future__ import annotations

import numpy as np
import torch

from exporter.manifest import Manifest
from graphs.dtypes import numpy_dtype, torch_dtype
from graphs.errors import ExportError
from graphs.model import ArmtModel
from graphs.modeldir import model_class


def model_from_export(manifest: Manifest) -> ArmtModel:
    """An ArmtModel or RmtModel (eval mode, CPU) holding the export's own weights at the export precision."""
    if not manifest.parameters:
        raise ExportError(f"export {manifest.root} does not index its model parameters (made by an older "
                          "armt): pass --model MODEL_DIR, or export again")
    cfg = manifest.model_config()
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    names = {name for name, _ in model.named_parameters()}
    if set(manifest.parameters) != names:
        missing, extra = sorted(names - set(manifest.parameters)), sorted(set(manifest.parameters) - names)
        raise ExportError(f"export {manifest.root}: parameter index does not fit the model (missing {missing[:3]}, "
                          f"unexpected {extra[:3]})")
    state = {}
    for name, rec in manifest.parameters.items():
        if "parts" in rec:  # column blocks (a fused export's separate projections), concatenated
            t = torch.cat([_read(manifest, name, part) for part in rec["parts"]], dim=-1)
            if list(t.shape) != list(rec["shape"]) or str(t.dtype).replace("torch.", "") != rec["dtype"]:
                raise ExportError(f"export {manifest.root}: parameter {name}'s parts do not give its shape {rec['shape']}")
            state[name] = t
        else:
            state[name] = _read(manifest, name, rec)
    model.load_state_dict(state, assign=True)
    if model.inv_freq is not None:
        from graphs.blocks import rope_inv_freq
        model.inv_freq = rope_inv_freq(cfg.base)
    return model.eval()


def _read(manifest: Manifest, name: str, rec: dict) -> torch.Tensor:
    """One tensor record (file, offset, length, dtype, shape) of the parameter index."""
    try:
        path = manifest.path(rec["file"])
        dtype, shape = rec["dtype"], rec["shape"]
        count = int(np.prod(shape, dtype=np.int64))
        raw = np.fromfile(path, dtype=np.uint8, count=int(rec["length"]), offset=int(rec["offset"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"export {manifest.root}: parameter {name} has a malformed record ({exc})") from None
    if raw.size != count * numpy_dtype(dtype).itemsize:
        raise ExportError(f"export {manifest.root}: parameter {name} does not fit its record in {rec['file']}")
    if dtype == "bfloat16":
        t = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
    else:
        t = torch.from_numpy(raw.view(numpy_dtype(dtype)).copy())
    return t.reshape(shape).to(torch_dtype(dtype))
