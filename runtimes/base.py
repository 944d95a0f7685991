"""The runner interface every backend implements (modelled on Polygraphy's runners), and the backend registry.

A runner is one graph (a role of graphs/contracts.py) of one model on one backend and device:

    runner = make_runner("ort", export_dir, "diagonal_step", device="cuda")
    with runner:                                   # activate(): load session / engine, once
        out = runner.infer(feeds)                  # one graph call: named inputs -> named outputs
        out = runner.infer({**next_feeds, "A_in": out["A_out"], ...})   # state stays on the device
        hidden = runner.to_numpy(out["hidden"])    # a host copy

Feeds are host arrays (numpy; the torch runner also takes torch tensors) or outputs of this runner's
previous call. Outputs are handles in buffers the runner owns and reuses: they stay valid until the
runner's next `infer` call and may be passed straight back as inputs (the runner then writes that
call's outputs into the other buffer of a ping-pong pair). `to_numpy` copies one to the host.

This module imports no backend and no torch: a host with only onnxruntime runs the ORT runner.

    runtimes/base.py        Runner, Device, the registry (make_runner)
      torch_runner.py       TorchRunner      graphs/cells.py on torch (the reference backend)
      ort_runner.py         OrtRunner        ONNX Runtime session (loaders.OrtSessionLoader), IO binding
      trt_runner.py         TrtRunner        TensorRT engine (loaders.EngineBytesLoader), polygraphy.cuda
    runtimes/execute.py     the one schedule loop over any runner
"""

from __future__ import annotations

import abc
import importlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from graphs.contracts import CAUSAL, MASKED, GraphContract, TensorSpec, slots_full
from graphs.errors import ArmtError, InputError

log = logging.getLogger("armt.run")

# backend -> "module:callable" building a runner from (path, role, device=..., precision=..., **options)
BACKENDS = {"torch": "runtimes.torch_runner:TorchRunner.from_path",
            "ort": "runtimes.ort_runner:OrtRunner",
            "trt": "runtimes.trt_runner:TrtRunner"}


@dataclass(frozen=True)
class Device:
    """A device by name: "cpu" or "cuda[:N]" (no backend is asked whether it exists)."""

    type: str
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    @property
    def id(self) -> int:
        return self.index or 0


def parse_device(device: str | Device) -> Device:
    if isinstance(device, Device):
        return device
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", str(device))
    if not m or (m.group(1) == "cpu" and m.group(2)):
        raise InputError(f"device must be cpu or cuda[:N], got {device!r}")
    return Device(m.group(1), int(m.group(2)) if m.group(2) else None)


class Runner(abc.ABC):
    backend: str = ""

    def __init__(self, contract: GraphContract, device: str | Device, model_id: str | Callable[[], str]):
        """`model_id`: the id of the model (graphs/identity.py), or a function computing it on first use."""
        self.contract = contract
        self.role = contract.role
        self.cfg = contract.cfg
        self.precision = contract.precision
        self._model_id = model_id
        self.device = parse_device(device)
        self.is_active = False
        self.inference_time = 0.0  # seconds spent in `infer`, summed (host-side; async on CUDA)
        self.calls = 0
        self.has_causal = False  # a backend runner of a masked step role sets it when the export has its
        self.variant_calls = {MASKED: 0, CAUSAL: 0}  # causal twin; calls per variant (pick_variant)

    @property
    def model_id(self) -> str:
        """The model's id: state files written by this runner carry it, state files of another are refused."""
        if callable(self._model_id):
            self._model_id = self._model_id()
        return self._model_id

    # ---------------------------------------------------------------- what subclasses provide
    @abc.abstractmethod
    def _activate(self) -> None: ...

    def _deactivate(self) -> None:
        pass

    @abc.abstractmethod
    def _infer(self, feeds: Mapping[str, Any], dims: dict[str, int]) -> dict[str, Any]: ...

    def owns(self, value: Any) -> bool:
        """Is `value` one of this runner's output buffers (a carried input needing no check or copy)?"""
        return False

    @abc.abstractmethod
    def to_numpy(self, value: Any) -> np.ndarray:
        """A host copy of an output handle (bfloat16 as ml_dtypes' bfloat16)."""

    # ---------------------------------------------------------------- the interface
    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self.contract.inputs

    @property
    def output_specs(self) -> tuple[TensorSpec, ...]:
        return self.contract.outputs

    @property
    def compute_dtype(self) -> str:
        """The dtype name of the layers' activations (the diagonal step's hidden buffer)."""
        from graphs.dtypes import compute_dtype
        return compute_dtype(self.precision)

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

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """One graph call. Host feeds are checked against the contract (names, dtypes, shapes)."""
        if not self.is_active:
            raise ArmtError(f"runner {self.name} is not active: call activate() (or use `with runner:`)")
        checked = tuple(s for s in self.contract.inputs if s.name not in feeds or not self.owns(feeds[s.name]))
        dims = self.contract.resolve_dims(feeds, checked)
        if len(checked) < len(self.contract.inputs):  # own buffers fed back name dims too (a KV cache: capacity)
            for spec in self.contract.inputs:
                if spec not in checked:
                    for want, size in zip(spec.shape, feeds[spec.name].shape):
                        if isinstance(want, str):
                            dims.setdefault(want, int(size))
        start = time.perf_counter()
        out = self._infer(feeds, dims)
        self.inference_time += time.perf_counter() - start
        self.calls += 1
        return out

    def pick_variant(self, feeds: Mapping[str, Any]) -> str:
        """The graph variant this call runs: CAUSAL where the runner holds the causal twin and every key
        of every active slot is valid (graphs.contracts.slots_full, on the host feeds), else MASKED.
        Counted in `variant_calls`, logged at debug."""
        variant = CAUSAL if self.has_causal and slots_full(self.role, feeds) else MASKED
        self.variant_calls[variant] += 1
        log.debug("%s call %d: %s graph", self.name, self.calls, variant)
        return variant

    def synchronize(self) -> None:
        """Wait until every call issued so far has finished."""

    def companion(self, role: str) -> "Runner":
        """A runner (not active) of another graph role of the same model, backend, device and
        precision: the loop opens the `lm_head` runner this way when logits are asked for."""
        raise InputError(f"runner {self.name} cannot open the {role} graph of its model; pass a {role} runner")


def make_runner(backend: str, path, role: str, device: str = "cpu", precision: str | None = None,
                **options) -> Runner:
    """A runner of `backend` for graph `role`: torch from a model directory, ort/trt from an export directory."""
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    module, _, attr = BACKENDS[backend].partition(":")
    factory: Any = importlib.import_module(module)
    for part in attr.split("."):
        factory = getattr(factory, part)
    return factory(path, role, device=device, precision=precision, **options)
