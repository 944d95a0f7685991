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
        path = manifest.path(rec["file"])
        dtype = rec["dtype"]
        count = int(np.prod(rec["shape"], dtype=np.int64))
        raw = np.fromfile(path, dtype=np.uint8, count=int(rec["length"]), offset=int(rec["offset"]))
        if raw.size != count * numpy_dtype(dtype).itemsize:
            raise ExportError(f"export {manifest.root}: parameter {name} does not fit its record in {rec['file']}")
        if dtype == "bfloat16":
            t = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(raw.view(numpy_dtype(dtype)).copy())
        state[name] = t.reshape(rec["shape"]).to(torch_dtype(dtype))
    model.load_state_dict(state, assign=True)
    if model.inv_freq is not None:
        from graphs.blocks import rope_inv_freq
        model.inv_freq = rope_inv_freq(cfg.base)
    return model.eval()
