"""Runner-owned tensor buffers for the ONNX Runtime and TensorRT runners (one code path for both).

Every graph input and output is bound to a buffer the runner owns, so addresses stay stable from call
to call (what IO binding, tensor addresses and CUDA-graph replay want):

  * inputs: a feed that *is* one of the runner's output buffers (the state or hidden states of the
    previous call, passed back by the schedule loop) is bound as it is, without a copy; any other
    feed is copied into the input's staging buffer (device to device, or host to device once when
    the loop starts from a host state).
  * outputs: two buffers per output (ping-pong). A call writes each output into the buffer that no
    input of that call occupies, so A_in = previous A_out and A_out never alias.

Buffers grow to the largest size seen and are viewed at the current shape, so a shape change (the
short last segment of the sequential schedule) does not reallocate, and repeated shapes reuse the
same addresses.

    call t:    A_in <- A_out[0]          A_out -> A_out[1]          (hidden_in/out alike)
    call t+1:  A_in <- A_out[1]          A_out -> A_out[0]
"""

from __future__ import annotations

from typing import Mapping

import torch

from exporter.manifest import TensorSpec
from runtimes.graphio import TORCH_DTYPES


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1 and a1 > a0 and b1 > b0


class BufferSet:
    """Staging buffers for inputs and ping-pong pairs for outputs, on one device."""

    def __init__(self, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], device: torch.device):
        self.device = device
        self._in_specs = {s.name: s for s in inputs}
        self._out_specs = {s.name: s for s in outputs}
        self._flat: dict[tuple[str, str, int], torch.Tensor] = {}  # (kind, name, slot) -> 1-D storage

    def _view(self, key: tuple[str, str, int], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        flat = self._flat.get(key)
        if flat is None or flat.dtype != dtype or flat.numel() < numel:
            flat = torch.empty(max(numel, 1), dtype=dtype, device=self.device)
            self._flat[key] = flat
        return flat[:numel].view(shape)

    def owned_outputs(self) -> list[torch.Tensor]:
        return [t for (kind, _, _), t in self._flat.items() if kind == "out"]

    def bind_inputs(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors to bind for each input: own output buffers as they are, anything else staged."""
        owned = self.owned_outputs()
        bound = {}
        for name, feed in feeds.items():
            if feed.device == self.device and feed.is_contiguous() and any(
                    feed.data_ptr() == o.data_ptr() for o in owned):
                bound[name] = feed  # the previous call's output: no copy
                continue
            spec = self._in_specs[name]
            buf = self._view(("in", name, 0), TORCH_DTYPES[spec.dtype], tuple(feed.shape))
            buf.copy_(feed, non_blocking=True)
            bound[name] = buf
        return bound

    def bind_outputs(self, dims: dict[str, int], bound_inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """For each output, the ping-pong buffer (at this call's shape) that no bound input occupies."""
        out = {}
        for name, spec in self._out_specs.items():
            shape = spec.concrete_shape(dims)
            dtype = TORCH_DTYPES[spec.dtype]
            for slot in (0, 1):
                buf = self._view(("out", name, slot), dtype, shape)
                if not any(overlaps(buf, t) for t in bound_inputs.values()):
                    out[name] = buf
                    break
            else:  # both buffers occupied by inputs: only possible if a caller fed the same buffer twice
                raise RuntimeError(f"no free output buffer for {name}: both ping-pong buffers are bound as inputs")
        return out
