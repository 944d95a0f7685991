"""The graph I/O contract as the runtimes use it: names in call order, which outputs feed which inputs,
dtype tables, and checking feeds against specs.

The contract is fixed in docs/architecture.md, implemented in torch by graphs/cells.py and written as
TensorSpecs by exporter/specs.py (`graph_io`); ONNX Runtime and TensorRT runners read the same specs
from the export's manifest.
"""

from __future__ import annotations

from typing import Mapping

import torch

from exporter.manifest import TensorSpec
from graphs.errors import ExportError, InputError

ROLES = ("segment", "diagonal_step")

INPUTS = {
    "segment": ("input_ids", "positions", "key_valid", "write", "A_in", "z_in", "written_in"),
    "diagonal_step": ("input_ids", "hidden_in", "positions", "key_valid", "active", "write",
                      "A_in", "z_in", "written_in"),
}
OUTPUTS = {
    "segment": ("logits", "hidden", "A_out", "z_out", "written_out"),
    "diagonal_step": ("hidden_out", "logits", "hidden", "A_out", "z_out", "written_out"),
}
# output -> the input it feeds at the next call (the loop passes the runner's output buffer back in)
RECURRENT = {
    "segment": {"A_out": "A_in", "z_out": "z_in", "written_out": "written_in"},
    "diagonal_step": {"hidden_out": "hidden_in", "A_out": "A_in", "z_out": "z_in", "written_out": "written_in"},
}

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# ONNX TensorProto element types (IO binding takes these ints for every dtype, bfloat16 included)
ONNX_ELEMENT_TYPES = {"float32": 1, "int32": 6, "int64": 7, "bool": 9, "float16": 10, "bfloat16": 16}


def check_contract(role: str, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], where: str) -> None:
    """Refuse a graph whose I/O names differ from the contract (a swapped or foreign graph)."""
    got_in, got_out = tuple(s.name for s in inputs), tuple(s.name for s in outputs)
    if set(got_in) != set(INPUTS[role]) or set(got_out) != set(OUTPUTS[role]):
        raise ExportError(f"{where}: graph {role} has inputs {list(got_in)} and outputs {list(got_out)}, "
                          f"the {role} contract needs {list(INPUTS[role])} -> {list(OUTPUTS[role])}")


def resolve_dims(specs: tuple[TensorSpec, ...], feeds: Mapping[str, torch.Tensor], graph: str) -> dict[str, int]:
    """Check every feed against its spec (name, dtype, rank, fixed sizes, consistent named dims);
    return the named dims' sizes, e.g. {"batch": 2, "width": 6, "slot": 9}."""
    names = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in feeds]
    extra = sorted(set(feeds) - names)
    if missing or extra:
        raise InputError(f"graph {graph}: missing inputs {missing}, unexpected inputs {extra}")
    dims: dict[str, int] = {}
    for spec in specs:
        t = feeds[spec.name]
        want_dtype = TORCH_DTYPES[spec.dtype]
        if t.dtype != want_dtype:
            got = DTYPE_NAMES.get(t.dtype, t.dtype)
            raise InputError(f"graph {graph} input {spec.name} must be {spec.dtype}, got {got}")
        if t.dim() != len(spec.shape):
            raise InputError(f"graph {graph} input {spec.name} must have shape {_fmt(spec.shape)}, "
                             f"got {tuple(t.shape)}")
        for want, got in zip(spec.shape, t.shape):
            if isinstance(want, str):
                if dims.setdefault(want, int(got)) != int(got):
                    raise InputError(f"graph {graph} input {spec.name} has {want}={got}, other inputs have "
                                     f"{want}={dims[want]}")
            elif int(want) != int(got):
                raise InputError(f"graph {graph} input {spec.name} must have shape {_fmt(spec.shape)}, "
                                 f"got {tuple(t.shape)}")
    return dims


def _fmt(shape: tuple[int | str, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"
