"""The torch runner: the reference backend, executing graphs/cells.py's SegmentCell or DiagonalStep."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping

import torch

from exporter.manifest import TensorSpec
from graphs.cells import DiagonalStep, SegmentCell
from graphs.errors import BackendUnavailable, InputError
from graphs.model import ArmtModel
from exporter.specs import graph_io
from runtimes.graphio import INPUTS, OUTPUTS, PRECISION_DTYPES
from runtimes.runner import Runner


def check_device(device: str) -> torch.device:
    """A torch device the runtime supports here, or BackendUnavailable."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"device must be cpu or cuda[:N], got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device must be cpu or cuda[:N], got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable("device cuda requested but no CUDA GPU is visible to torch here")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, model: ArmtModel, role: str, device: str = "cpu", precision: str = "fp32"):
        """`model` in fp32; it is moved to `device` and cast to `precision` (memory weights stay fp32)."""
        dev = check_device(device)
        super().__init__(role, str(dev))
        if precision not in PRECISION_DTYPES:
            raise InputError(f"precision must be one of {', '.join(PRECISION_DTYPES)}, got {precision!r}")
        self.cfg = model.cfg
        self.model_id = model.model_id()  # of the fp32 weights, before any cast (as the exporter records it)
        self.precision = precision
        self.compute_dtype = PRECISION_DTYPES[precision]
        self._model = model
        self._module: torch.nn.Module | None = None
        self._inputs, self._outputs = graph_io(self.cfg, role, precision)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, role: str, **kw) -> "TorchRunner":
        from graphs.modeldir import load_model_dir
        return cls(load_model_dir(model_dir), role, **kw)

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def output_specs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def _activate(self) -> None:
        model = self._model
        if self.compute_dtype != torch.float32 or model.device != self.device:
            model = copy.deepcopy(model).to(self.device)  # never cast or move the caller's model
            model.cast(self.compute_dtype)
        self._module = (SegmentCell(model) if self.role == "segment" else DiagonalStep(model)).eval()

    def _deactivate(self) -> None:
        self._module = None

    def _infer(self, feeds: Mapping[str, torch.Tensor], dims: dict[str, int]) -> dict[str, torch.Tensor]:
        args = [feeds[n].to(self.device, non_blocking=True) for n in INPUTS[self.role]]
        with torch.no_grad():
            out = self._module(*args)
        return dict(zip(OUTPUTS[self.role], out))
