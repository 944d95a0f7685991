"""The one dtype table: export precisions, tensor dtype names, and their numpy / torch / ONNX forms.

Graph contracts, manifests and runners name dtypes by their ONNX/numpy names ("float32", "float16",
"bfloat16", "int64", "int32", "bool"). numpy has no bfloat16: `numpy_dtype("bfloat16")` is
ml_dtypes' (a dependency of onnx). torch is imported only by `torch_dtype`, so a host without torch
can use everything else here.
"""

from __future__ import annotations

from typing import Any

from graphs.errors import InputError

PRECISIONS = ("fp32", "fp16", "bf16")
# the compute dtype of layers, embeddings and head per precision (the memory state is float32 in all)
COMPUTE_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
FLOATS = ("float32", "float16", "bfloat16")
# ONNX TensorProto element types (IO binding takes these ints for every dtype, bfloat16 included)
ONNX_ELEMENT_TYPES = {"float32": 1, "int32": 6, "int64": 7, "bool": 9, "float16": 10, "bfloat16": 16}
# onnxruntime's type strings ("tensor(float)") -> our names
ORT_TYPE_NAMES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
                  "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def compute_dtype(precision: str) -> str:
    return COMPUTE_DTYPE[check_precision(precision)]


def numpy_dtype(name: str):
    """The numpy dtype of a dtype name (bfloat16 from ml_dtypes)."""
    import numpy as np
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}")
    return np.dtype(name)


def torch_dtype(name: str):
    """The torch dtype of a dtype name (imports torch)."""
    import torch
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
    if name not in table:
        raise InputError(f"unknown dtype {name!r}")
    return table[name]


def dtype_name(dtype: Any) -> str:
    """The name of a numpy or torch dtype ("float32", ...); its str() when it has none of ours."""
    text = str(dtype)
    if text.startswith("torch."):
        text = text[len("torch."):]
    return {"float": "float32", "half": "float16", "long": "int64", "int": "int32"}.get(text, text)
