"""The ONNX Runtime runner: one exported graph on the CPU or CUDA execution provider, with IO binding.

Needs only onnxruntime (or onnxruntime-gpu) and numpy: no torch. Both devices take the same path:
every input and output is bound (IO binding) to a runner-owned buffer (runtimes/buffers.py) held in
an OrtValue on the device, so the schedule loop passes the previous call's state and hidden buffers
straight back in and nothing is copied through the host inside the loop. Host feeds are copied into
their staging OrtValue (`update_inplace`); outputs are read back only when the loop asks
(`to_numpy`: the leaving segment's logits, the final state). Each call synchronizes the provider's
stream before it returns (ONNX Runtime's default), so a staging buffer is never rewritten while a
call still reads it.

    OrtRunner(export_dir, role, device="cuda")                 from an export directory (manifest)
    OrtRunner(OrtSessionLoader(path), contract=c, model_id=i)  from a loader (export-time validation)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from exporter.manifest import Manifest
from graphs.contracts import GraphContract, contract as contract_of
from graphs.dtypes import ONNX_ELEMENT_TYPES, ORT_TYPE_NAMES
from graphs.errors import ExportError
from runtimes.base import Runner, parse_device
from runtimes.buffers import Buffer, BufferSet
from runtimes.loaders import OrtSessionLoader, import_onnxruntime, open_export, raise_if_not_runnable

log = logging.getLogger("armt.ort")


class OrtStorage:
    """Raw byte blocks in OrtValues on one device (the Storage of runtimes/buffers.py)."""

    def __init__(self, device_type: str, device_id: int):
        self.ort = import_onnxruntime()
        self.device_type, self.device_id = device_type, device_id

    def alloc(self, nbytes: int):
        return self.ort.OrtValue.ortvalue_from_shape_and_type([max(nbytes, 1)], np.uint8, self.device_type,
                                                               self.device_id)

    def ptr(self, block) -> int:
        return block.data_ptr()

    def write(self, block, data: np.ndarray) -> None:
        if data.size == block.shape()[0]:
            block.update_inplace(data)
        else:  # a zero-byte tensor was given a 1-byte block
            block.update_inplace(np.concatenate([data, np.zeros(block.shape()[0] - data.size, np.uint8)]))

    def read(self, block) -> np.ndarray:
        return block.numpy()


class OrtRunner(Runner):
    backend = "ort"

    def __init__(self, source: str | Path | Manifest | OrtSessionLoader, role: str | None = None, *,
                 device: str = "cpu", precision: str | None = None, verify_checksums: bool = True,
                 threads: int | None = None, contract: GraphContract | None = None, model_id: str | None = None):
        """`source`: an export directory (its manifest and checksums are checked now), a loaded
        Manifest, or an OrtSessionLoader together with `contract` and `model_id`.
        `threads`: intra-op threads of the CPU provider (default: ONNX Runtime's choice)."""
        dev = parse_device(device)
        if isinstance(source, OrtSessionLoader):
            if contract is None or model_id is None:
                raise ExportError("an OrtRunner made from a session loader needs the graph's contract and model id")
            self.manifest = None
            self.loader = source
            self.where = str(source.path)
        else:
            self.manifest = open_export(source, precision, verify_checksums)
            graph = self.manifest.graph(role)
            contract = contract_of(self.manifest.model_config(), role, self.manifest.precision)
            contract.check_io(graph.inputs, graph.outputs, f"export {self.manifest.root}")
            model_id = self.manifest.model_id
            self.loader = OrtSessionLoader(self.manifest.graph_path(role), dev, threads)
            self.where = f"export {self.manifest.root}"
        super().__init__(contract, dev, model_id)
        self.loader.device = dev
        self.loader.threads = threads if threads is not None else self.loader.threads
        self._session = self._binding = self._buffers = None
        self._threads = threads

    def companion(self, role: str) -> "OrtRunner":
        """The export's `role` graph on the same device (an export-directory runner only)."""
        if self.manifest is None:
            return super().companion(role)
        return OrtRunner(self.manifest, role, device=str(self.device), threads=self._threads)

    # ---------------------------------------------------------------- session
    def _activate(self) -> None:
        self._session = self.loader()
        self._check_session_io()
        self._binding = self._session.io_binding()
        self._buffers = BufferSet(self.contract, OrtStorage(self.device.type, self.device.id))

    def _check_session_io(self) -> None:
        """The graph file must carry the contract's I/O with its dtypes (a swapped graph does not)."""
        got = {v.name: ORT_TYPE_NAMES.get(v.type, v.type) for v in (*self._session.get_inputs(),
                                                                     *self._session.get_outputs())}
        want = {s.name: s.dtype for s in (*self.contract.inputs, *self.contract.outputs)}
        if got != want:
            raise ExportError(f"{self.loader.path.name} does not have the inputs/outputs its manifest entry lists "
                              f"(graph: {sorted(got)}; contract: {sorted(want)})")

    def _deactivate(self) -> None:
        self._binding = self._session = self._buffers = None

    def owns(self, value: Any) -> bool:
        return self._buffers is not None and self._buffers.owns(value)

    # ---------------------------------------------------------------- one call
    def _infer(self, feeds: Mapping[str, Any], dims: dict[str, int]) -> dict[str, Buffer]:
        inputs = self._buffers.bind_inputs(feeds)
        outputs = self._buffers.bind_outputs(dims, inputs)
        dev_type, dev_id = self.device.type, self.device.id
        b = self._binding
        for name, buf in inputs.items():
            b.bind_input(name, dev_type, dev_id, ONNX_ELEMENT_TYPES[buf.dtype], list(buf.shape), buf.ptr)
        for name, buf in outputs.items():
            b.bind_output(name, dev_type, dev_id, ONNX_ELEMENT_TYPES[buf.dtype], list(buf.shape), buf.ptr)
        try:
            self._session.run_with_iobinding(b)
        except Exception as exc:
            raise_if_not_runnable(exc, f"{self.loader.path.name} on {dev_type}")
            raise ExportError(f"onnxruntime failed to run {self.loader.path.name}: {str(exc).splitlines()[0]}") from None
        return outputs

    def to_numpy(self, value: Buffer) -> np.ndarray:
        return self._buffers.read(value)
