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
from graphs.errors import BackendUnavailable, InputError
from graphs.model import ArmtModel
from graphs.rmt import RmtModel
from graphs.state import MemoryState, RmtState, to_numpy
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
        super().__init__(contract(model.cfg, role, precision), str(dev), model.model_id)  # hashed when first asked
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

    def companion(self, role: str) -> "TorchRunner":
        return TorchRunner(self._model, role, device=str(self.torch_device), precision=self.precision,
                           fused=self.fused)


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


def run_torch(model: ArmtModel | RmtModel, input_ids, attention_mask=None, state: MemoryState | RmtState | None = None,
              schedule: str = "diagonal", device: str = "cpu", precision: str = "fp32",
              collect: tuple[str, ...] = ("logits", "hidden"), progress: bool = False,
              cuda_graph: bool | None = None):
    """A whole run on torch: the fast executor where it applies, the schedule loop on a TorchRunner
    elsewhere (logged at debug level). Returns a runtimes.execute.RunResult (numpy); `collect` as
    run_schedule's ("logits", "last_logits", "hidden"; runtimes.execute.collect_for). Both continue
    the state's unfinished segments (runtimes.execute.Continuation): the fast executor runs the rows'
    complete segments and their unfinished one as two pieces, the state between them being the one
    the next call continues from. `cuda_graph`: the fast executor's CUDA graphs (default: on CUDA)."""
    import time

    from graphs.contracts import role_for
    from graphs.schedule import build_schedule
    from runtimes.execute import COLLECTABLE, RunResult, continue_input, last_positions
    bad = sorted(set(collect) - set(COLLECTABLE))
    if bad:
        raise InputError(f"cannot collect {bad}; choose from {COLLECTABLE}")
    role_for(model.cfg, schedule)  # an RMT refuses the diagonal schedule here, before anything runs
    cont = continue_input(model.cfg, input_ids, attention_mask, state)
    why = fast_executor_applies(model, cont.ids, cont.mask())
    if why is None:
        from runtimes.fast_torch import FastArmt
        dev = check_torch_device(device)
        check_precision(precision)
        log.debug("torch backend: fast executor (%s schedule)", schedule)
        work = copy.deepcopy(model).to(dev)
        work.cast(torch_dtype(compute_dtype(precision)))
        fast = FastArmt(work, cuda_graphs=cuda_graph, exact_memory=True)
        start = time.perf_counter()
        ids = to_torch(cont.ids, dev).to(torch.int64)  # (B, N'): every row the same length
        T, N = model.cfg.armt.segment_size, ids.shape[1]
        k, u = int(cont.complete[0]), int(cont.unfinished[0])
        cuts = [0, k * T, N] if k and u else [0, N]  # complete segments, then the unfinished one
        st, recorded, logits, hidden = cont.start, None, [], []
        for lo, hi in zip(cuts, cuts[1:]):
            if st is not None and lo and not _finite_state(st):  # FastArmt refuses such a state as input
                log.debug("torch backend: non-finite state between the pieces; reference cells instead")
                return _reference_run(model, input_ids, attention_mask, state, schedule, device, precision,
                                      collect, progress, "a non-finite intermediate state")
            res = fast.run(ids[:, lo:hi], schedule, state=None if st is None else _torch_state(st, dev),
                           collect="logits" in collect or "hidden" in collect, head="logits" in collect)
            st = res.state.numpy()
            if hi == k * T and u:
                recorded = st  # the state before every row's unfinished segment
            logits.append(res.logits)
            hidden.append(res.hidden)
            last_row = res.last_hidden[:, -1:]  # (B, 1, d): position N'-1, every row's last (rows are equal)
        last_logits = last_index = None
        if "last_logits" in collect:  # the lm_head graph's arithmetic: back to the compute dtype, @ head
            with torch.no_grad():
                last_logits = to_numpy(work.lm_head(last_row.to(work.dtype)).float()[:, 0])  # (B, V)
            last_index = last_positions(cont)
            last_logits[last_index < 0] = 0.0
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        cat = lambda parts: to_numpy(torch.cat(parts, 1)) if parts[0] is not None else None  # noqa: E731
        S = -(-N // T)
        return RunResult(cont.take_new(cat(logits)) if "logits" in collect else None,
                         cont.take_new(cat(hidden)) if "hidden" in collect else None, cont.resume_state(st, recorded),
                         build_schedule(schedule, model.cfg.base.n_layers, S), time.perf_counter() - start,
                         skip=cont.skip, last_logits=last_logits, last_index=last_index)
    return _reference_run(model, input_ids, attention_mask, state, schedule, device, precision, collect, progress, why)


def _reference_run(model, input_ids, attention_mask, state, schedule, device, precision, collect, progress, why):
    from graphs.contracts import role_for
    from runtimes.execute import run_schedule
    log.debug("torch backend: reference cells through the schedule loop (%s)", why)
    with TorchRunner(model, role_for(model.cfg, schedule), device=device, precision=precision) as runner:
        return run_schedule(runner, input_ids, attention_mask, state=state, collect=collect, progress=progress)


def _finite_state(state: MemoryState) -> bool:
    return bool(np.isfinite(state.A).all() and np.isfinite(state.z).all())


def _torch_state(state: MemoryState, dev: torch.device) -> MemoryState:
    from graphs.model import torch_state
    return torch_state(state, dev)

