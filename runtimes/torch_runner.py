"""The torch backend: graphs/cells.py's cells as a runner (the reference), and `run_torch`, which
runs a whole input on the fast executor (runtimes/fast_torch.py) where it applies and through the
schedule loop on a TorchRunner elsewhere."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from graphs.cells import cell_for
from graphs.contracts import contract
from graphs.dtypes import check_precision, compute_dtype, dtype_name, torch_dtype
from graphs.errors import BackendUnavailable
from graphs.model import ArmtModel
from graphs.rmt import RmtModel
from graphs.state import MemoryState, to_numpy
from runtimes.base import Device, Runner, parse_device

log = logging.getLogger("armt.run")


def check_torch_device(device: str | Device) -> torch.device:
    """A torch device the runtime supports here, or BackendUnavailable."""
    dev = parse_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable("device cuda requested but no CUDA GPU is visible to torch here")
        return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    return torch.device("cpu")


def to_torch(x: Any, device: torch.device) -> torch.Tensor:
    """A numpy array (bfloat16 from ml_dtypes too) or tensor as a tensor on `device`."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    x = np.asarray(x)
    if dtype_name(x.dtype) == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, model: ArmtModel | RmtModel, role: str, device: str = "cpu", precision: str = "fp32",
                 fused: bool = False):
        """`model` (ARMT or RMT) in fp32; it is moved to `device` and cast to `precision` (ARMT memory weights stay fp32)
        on activation, as a copy. `fused`: PyTorch's fused attention (the reference's rounding twin)."""
        dev = check_torch_device(device)
        check_precision(precision)
        super().__init__(contract(model.cfg, role, precision), str(dev), model.model_id())
        self.torch_device = dev
        self.fused = fused
        self._model = model
        self._module: torch.nn.Module | None = None

    @classmethod
    def from_path(cls, model_dir: str | Path, role: str, device: str = "cpu", precision: str | None = None,
                  **kw) -> "TorchRunner":
        from graphs.modeldir import load_model_dir
        return cls(load_model_dir(model_dir), role, device=device, precision=precision or "fp32", **kw)

    def _activate(self) -> None:
        model = self._model
        dtype = torch_dtype(self.compute_dtype)
        if dtype != model.dtype or model.device != self.torch_device:
            model = copy.deepcopy(model).to(self.torch_device)  # never cast or move the caller's model
            model.cast(dtype)
        self._module = cell_for(model, self.role, self.fused)

    def _deactivate(self) -> None:
        self._module = None

    def _infer(self, feeds: Mapping[str, Any], dims: dict[str, int]) -> dict[str, torch.Tensor]:
        args = [to_torch(feeds[n], self.torch_device) for n in self.contract.input_names]
        with torch.no_grad():
            out = self._module(*args)
        return dict(zip(self.contract.output_names, out))

    def to_numpy(self, value: torch.Tensor) -> np.ndarray:
        return to_numpy(value)

    def synchronize(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)


# ------------------------------------------------------------------------------------------ whole runs
def fast_executor_applies(model: ArmtModel, input_ids, attention_mask) -> str | None:
    """None when the fast executor covers this run, else why not (LLaMA without biases, rows of
    equal length)."""
    b = model.cfg.base
    if model.cfg.kind != "armt":
        return f"the fast executor covers the ARMT only (this is an {model.cfg.kind.upper()})"
    if b.architecture != "llama":
        return f"the fast executor covers LLaMA only (this is {b.architecture})"
    if b.attention_bias or b.mlp_bias:
        return "the fast executor does not cover LLaMA biases"
    if attention_mask is not None and not bool(np.all(to_numpy(attention_mask) == 1)):
        return "rows of different lengths (attention mask)"
    if input_ids.shape[1] == 0:
        return "an empty input"
    return None


def run_torch(model: ArmtModel, input_ids, attention_mask=None, state: MemoryState | None = None,
              schedule: str = "diagonal", device: str = "cpu", precision: str = "fp32",
              collect: tuple[str, ...] = ("logits", "hidden"), progress: bool = False):
    """A whole run on torch: the fast executor where it applies, the schedule loop on a TorchRunner
    elsewhere (logged at debug level). Returns a runtimes.execute.RunResult (numpy)."""
    import time

    from graphs.contracts import role_for
    from graphs.schedule import build_schedule
    from graphs.segments import check_ids
    from runtimes.execute import run_schedule
    role = role_for(model.cfg, schedule)  # an RMT refuses the diagonal schedule here
    why = fast_executor_applies(model, input_ids, attention_mask)
    if why is None:
        from runtimes.execute import RunResult
        from runtimes.fast_torch import FastArmt
        dev = check_torch_device(device)
        check_precision(precision)
        check_ids(input_ids, model.cfg.base.vocab_size, attention_mask)
        log.debug("torch backend: fast executor (%s schedule)", schedule)
        work = copy.deepcopy(model).to(dev)
        work.cast(torch_dtype(compute_dtype(precision)))
        fast = FastArmt(work, exact_memory=True)
        start = time.perf_counter()
        ids = to_torch(input_ids, dev).to(torch.int64)
        res = fast.run(ids, schedule, state=None if state is None else _torch_state(state, dev),
                       collect=bool(collect), head="logits" in collect)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        S = -(-ids.shape[1] // model.cfg.armt.segment_size)
        return RunResult(to_numpy(res.logits) if "logits" in collect else None,
                         to_numpy(res.hidden) if "hidden" in collect else None, res.state.numpy(),
                         build_schedule(schedule, model.cfg.base.n_layers, S), time.perf_counter() - start)
    log.debug("torch backend: reference cells through the schedule loop (%s)", why)
    with TorchRunner(model, role, device=device, precision=precision) as runner:
        return run_schedule(runner, input_ids, attention_mask, state=state, collect=collect, progress=progress)


def _torch_state(state: MemoryState, dev: torch.device) -> MemoryState:
    from graphs.model import torch_state
    return torch_state(state, dev)

