"""The runner interface every backend implements (modelled on Polygraphy's runners).

A runner is one graph (role "segment" or "diagonal_step") of one model on one backend and device:

    runner = make_runner("ort", export_dir, "diagonal_step", device="cuda")
    with runner:                                   # activate(): load session / engine, once
        out = runner.infer(feeds)                  # one graph call: named inputs -> named outputs
        out = runner.infer({**next_feeds, "A_in": out["A_out"], ...})   # state stays on the device

Feeds and outputs are torch tensors. Outputs live in buffers the runner owns and reuses: they stay
valid until the runner's next `infer` call, and may be passed straight back as inputs (the runner
then writes that call's outputs into the other buffer of a ping-pong pair). Copy what you keep.

Every runner also carries what the schedule loop needs: the model config (`cfg`), the model id
(state files), the compute dtype and the device.
"""

from __future__ import annotations

import abc
import contextlib
import time
from typing import Iterator, Mapping

import torch

from exporter.manifest import TensorSpec
from graphs.config import ModelConfig
from graphs.errors import ArmtError, InputError
from runtimes.graphio import ROLES, resolve_dims

BACKENDS = ("torch", "ort", "trt")


class Runner(abc.ABC):
    backend: str = ""

    def __init__(self, role: str, device: str = "cpu"):
        if role not in ROLES:
            raise InputError(f"graph role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.device = torch.device(device)
        self.is_active = False
        self.inference_time = 0.0  # seconds spent in `infer`, summed (host-side; async on CUDA)
        self.calls = 0

    # ---------------------------------------------------------------- what subclasses provide
    cfg: ModelConfig
    model_id: str
    compute_dtype: torch.dtype
    precision: str

    @property
    @abc.abstractmethod
    def input_specs(self) -> tuple[TensorSpec, ...]: ...

    @property
    @abc.abstractmethod
    def output_specs(self) -> tuple[TensorSpec, ...]: ...

    @abc.abstractmethod
    def _activate(self) -> None: ...

    def _deactivate(self) -> None:
        pass

    @abc.abstractmethod
    def _infer(self, feeds: Mapping[str, torch.Tensor], dims: dict[str, int]) -> dict[str, torch.Tensor]: ...

    # ---------------------------------------------------------------- the interface
    @property
    def name(self) -> str:
        return f"{self.backend}:{self.role}@{self.device}"

    def activate(self) -> "Runner":
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def infer(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One graph call. Feeds are checked against the input specs (names, dtypes, shapes)."""
        if not self.is_active:
            raise ArmtError(f"runner {self.name} is not active: call activate() (or use `with runner:`)")
        dims = resolve_dims(self.input_specs, feeds, self.role)
        start = time.perf_counter()
        out = self._infer(feeds, dims)
        self.inference_time += time.perf_counter() - start
        self.calls += 1
        return out

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """Context for the caller's own torch work on this runner's tensors (feeds, copies of outputs):
        on CUDA it is the stream the backend runs on, so everything stays in order without host syncs."""
        yield

    def synchronize(self) -> None:
        """Wait until every call issued so far has finished."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)



class StreamRunner(Runner):
    """A runner whose backend works on its own CUDA stream (`_stream`, None on the CPU): the caller's
    torch work on the runner's tensors goes on that stream, so nothing needs a host sync."""

    _stream: "torch.cuda.Stream | None" = None

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        if self._stream is None:
            yield
        else:
            with torch.cuda.stream(self._stream):
                yield

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    def _wait_for_caller(self) -> None:
        """Feeds made on the caller's stream are complete before the backend reads them."""
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))


def make_runner(backend: str, path, role: str, device: str = "cpu", precision: str | None = None,
                **options) -> Runner:
    """A runner of `backend` for graph `role`: torch from a model directory, ort/trt from an export directory."""
    if backend == "torch":
        from runtimes.torch_runner import TorchRunner
        return TorchRunner.from_model_dir(path, role, device=device, precision=precision or "fp32", **options)
    if backend == "ort":
        from runtimes.ort_runner import OrtRunner
        return OrtRunner(path, role, device=device, precision=precision, **options)
    if backend == "trt":
        from runtimes.trt_runner import TrtRunner
        return TrtRunner(path, role, device=device, precision=precision, **options)
    raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
