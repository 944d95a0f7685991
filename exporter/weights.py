"""One shared external-data file for every graph of an export.

Both graphs carry the same weights (embedding, stacked layers, memory, head). torch writes each
graph with its own `<graph>.onnx.data`; `SharedWeights.adopt` moves each graph's external tensors into
one `weights.data`, writing a tensor's bytes once and pointing every graph that holds identical
bytes at the same (offset, length). Blobs of 1 MB and more are 4096-byte aligned (so ONNX Runtime
can memory-map them), smaller ones 64-byte aligned.

Sharing happens for tensors that reach both graphs unchanged: for real-sized models every weight
stack (the optimizer folds no constant over 8192 elements). In tiny models the optimizer folds
per-layer slices into their own small initializers, which are then stored separately.
Tensors are streamed one at a time (never the whole model in memory), so >2 GB models work.

    segment.onnx --------\\
                          +--> weights.data  [embed | layer stacks | memory | head | ...]
    diagonal_step.onnx --/
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
from pathlib import Path
from typing import Callable

import onnx
import torch
from onnx.external_data_helper import ExternalDataInfo

from graphs.errors import ExportError

log = logging.getLogger("armt.export")

WEIGHTS_FILE = "weights.data"
ALIGN_LARGE, ALIGN_SMALL, LARGE = 4096, 64, 1 << 20
INLINE_BYTES = 1024  # smaller initializers stay inside the .onnx


class SharedWeights:
    """Appends unique tensor blobs to `root/weights.data`."""

    def __init__(self, root: Path, name: str = WEIGHTS_FILE):
        self.root = root
        self.name = name
        self.path = root / name
        self.index: dict[tuple[str, int], tuple[int, int]] = {}  # (sha256, length) -> (offset, length)
        self.size = 0
        self.path.touch()

    def _append(self, blob: memoryview) -> int:
        align = ALIGN_LARGE if len(blob) >= LARGE else ALIGN_SMALL
        offset = -(-self.size // align) * align
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(blob)
        self.size = offset + len(blob)
        return offset

    def add(self, blob: memoryview) -> tuple[int, int]:
        """(offset, length) of `blob` in the shared file, appending it unless identical bytes are there."""
        key = (hashlib.sha256(blob).hexdigest(), len(blob))
        if key not in self.index:
            self.index[key] = (self._append(blob), len(blob))
        return self.index[key]

    def _index_tensor(self, t: torch.Tensor) -> dict:
        import numpy as np
        t = t.detach().contiguous().cpu()
        dtype = str(t.dtype).replace("torch.", "")
        array = t.view(torch.int16).numpy() if dtype == "bfloat16" else t.numpy()
        offset, length = self.add(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
        return {"file": self.name, "offset": offset, "length": length, "dtype": dtype, "shape": list(t.shape)}

    def index_parameters(self, model, parts: dict[str, list[torch.Tensor]] | None = None) -> dict[str, dict]:
        """Every model parameter in the shared file (mostly bytes the graphs already hold: weight stacks
        reach the graphs unchanged): name ("layers.qkv") -> file, offset, length, dtype, shape.
        `parts`: parameters the graphs hold as column blocks (a fused export's separate q, k, v, gate,
        up: exporter/trace.py separate_view), recorded as those blocks ("parts": the records of each,
        concatenated along the last axis give the parameter), so the file holds their bytes once."""
        out = {}
        for name, p in model.named_parameters():
            if parts and name in parts:
                out[name] = {"file": self.name, "dtype": str(p.dtype).replace("torch.", ""), "shape": list(p.shape),
                             "parts": [self._index_tensor(t) for t in parts[name]]}
            else:
                out[name] = self._index_tensor(p)
        return out

    def adopt_ir(self, model, path: Path, edit: Callable[[onnx.ModelProto], None] | None = None) -> onnx.ModelProto:
        """Write the traced onnx_ir `model` to `path`, its large initializers into the shared file
        (streamed from the torch parameters' memory: no second copy of the weights), then apply `edit`
        to the (weight-less) proto."""
        import numpy as np
        import onnx_ir as ir
        written = reused = 0
        for value in list(model.graph.initializers.values()):
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < INLINE_BYTES:
                continue
            array = np.ascontiguousarray(tensor.numpy())  # a view of the torch parameter when contiguous
            blob = memoryview(array.reshape(-1).view(np.uint8))
            size_before = self.size
            offset, length = self.add(blob)
            if self.size == size_before:
                reused += length
            else:
                written += length
            value.const_value = ir.ExternalTensor(self.name, offset, length, tensor.dtype, shape=tensor.shape,
                                                  name=value.name, base_dir=str(self.root))
            del array, blob
        ir.save(model, str(path))  # tensors already external stay as they are
        proto = onnx.load(str(path), load_external_data=False)
        if edit is not None:
            edit(proto)
            onnx.save_model(proto, str(path))
        log.info("%s: %.1f MB of new weights written to %s, %.1f MB shared with earlier graphs",
                 path.name, written / 1e6, self.name, reused / 1e6)
        return proto

    def adopt(self, model_path: Path, edit: Callable[[onnx.ModelProto], None] | None = None) -> onnx.ModelProto:
        """Re-point `model_path`'s external tensors at the shared file, delete its own data files,
        apply `edit` to the (weight-less) proto, rewrite the .onnx; returns the proto."""
        model = onnx.load(str(model_path), load_external_data=False)
        if edit is not None:
            edit(model)
        own_files: set[Path] = set()
        maps: dict[Path, tuple[object, mmap.mmap]] = {}
        reused = written = 0  # bytes
        try:
            for tensor in _all_tensors(model):
                if tensor.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                info = ExternalDataInfo(tensor)
                src = (model_path.parent / info.location).resolve()
                if src.parent != model_path.parent.resolve() or not src.is_file():
                    raise ExportError(f"tensor {tensor.name} points at unexpected data file {info.location}")
                own_files.add(src)
                if src not in maps:
                    f = open(src, "rb")
                    maps[src] = (f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(src) else None)
                mm = maps[src][1]
                offset = info.offset or 0
                length = info.length if info.length is not None else (len(mm) - offset if mm else 0)
                blob = memoryview(mm)[offset:offset + length] if mm else memoryview(b"")
                size_before = self.size
                new_offset, new_length = self.add(blob)
                if self.size == size_before:
                    reused += length
                else:
                    written += length
                blob.release()
                del tensor.external_data[:]
                for k, v in (("location", self.name), ("offset", str(new_offset)), ("length", str(new_length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = k, v
        finally:
            for f, mm in maps.values():
                if mm is not None:
                    mm.close()
                f.close()
        for src in own_files:
            src.unlink()
        onnx.save_model(model, str(model_path))
        log.info("%s: %.1f MB of new weights written to %s, %.1f MB shared with earlier graphs",
                 model_path.name, written / 1e6, self.name, reused / 1e6)
        return model


def _all_tensors(model: onnx.ModelProto):
    """Initializers and Constant-node tensors of the main graph and its subgraphs."""
    def walk(graph: onnx.GraphProto):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g)
    yield from walk(model.graph)
