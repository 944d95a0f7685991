"""The ONNX Runtime runner: one exported graph on the CPU or CUDA execution provider, with IO binding.

Both devices take the same path: every input and output is bound (IO binding) to a runner-owned
torch tensor (runtimes/buffers.py), so the schedule loop passes the previous call's state and hidden
buffers straight back in and nothing is copied through the host inside the loop. On CUDA:

  * the session runs on a torch CUDA stream the runner creates (provider option
    `user_compute_stream`), and the loop does its own torch work (feed staging, copying logits into
    the result) inside `runner.stream()`, so every operation is ordered on that one stream;
  * by default ONNX Runtime synchronizes its stream at the end of each run, so a call's outputs are
    complete when `infer` returns. `sync_each_call=False` sets the run option
    `disable_synchronize_execution_providers`: calls are then only queued on the stream (ordered
    with the loop's own copies, which run on the same stream), the host runs ahead, and
    `synchronize()` (called by the loop at its end) waits for them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch

from exporter.manifest import Manifest, TensorSpec, load_manifest
from graphs.errors import BackendUnavailable, ExportError, InputError
from runtimes.buffers import BufferSet
from runtimes.graphio import ONNX_ELEMENT_TYPES, PRECISION_DTYPES, check_contract
from runtimes.runner import StreamRunner
from runtimes.torch_runner import check_device

log = logging.getLogger("armt.ort")


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable(f"onnxruntime is not installed ({exc}); pip install onnxruntime "
                                 "(or onnxruntime-gpu for the CUDA execution provider)") from None
    return onnxruntime


def open_export(export: str | Path | Manifest, precision: str | None, verify_checksums: bool = True) -> Manifest:
    """The export's manifest (checksums verified unless told otherwise); refuse a precision mismatch."""
    manifest = export if isinstance(export, Manifest) else load_manifest(export, verify_checksums=verify_checksums)
    if precision is not None and precision != manifest.precision:
        raise InputError(f"export {manifest.root} holds {manifest.precision} graphs, not {precision} "
                         f"(export again with --precision {precision})")
    return manifest


class ExportRunner(StreamRunner):
    """A runner of one graph of an export directory: manifest, graph contract, model id and precision."""

    def __init__(self, export: str | Path | Manifest, role: str, device: str, precision: str | None,
                 verify_checksums: bool):
        super().__init__(role, device)
        self.manifest = open_export(export, precision, verify_checksums)
        self.graph = self.manifest.graph(role)
        check_contract(role, self.graph.inputs, self.graph.outputs, f"export {self.manifest.root}")
        self.cfg = self.manifest.model_config()
        self.model_id = str(self.manifest.model.get("model_id", ""))
        if not self.model_id:
            raise ExportError(f"export {self.manifest.root}: manifest.json lacks model.model_id")
        self.precision = self.manifest.precision
        self.compute_dtype = PRECISION_DTYPES[self.precision]


class OrtRunner(ExportRunner):
    backend = "ort"

    def __init__(self, export: str | Path | Manifest, role: str, device: str = "cpu",
                 precision: str | None = None, verify_checksums: bool = True, threads: int | None = None,
                 sync_each_call: bool = True):
        """`export`: an export directory (its manifest and checksums are checked now) or a loaded Manifest.
        `threads`: intra-op threads of the CPU provider (default: ONNX Runtime's choice).
        `sync_each_call=False` (CUDA): do not wait for each call to finish (see the module docstring)."""
        super().__init__(export, role, device, precision, verify_checksums)
        self.threads = threads
        self.sync_each_call = sync_each_call
        self._run_options = None
        self._session = None
        self._binding = None
        self._stream = None
        self._buffers: BufferSet | None = None

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        return self.graph.inputs

    @property
    def output_specs(self) -> tuple[TensorSpec, ...]:
        return self.graph.outputs

    # ---------------------------------------------------------------- session
    def _activate(self) -> None:
        ort = import_onnxruntime()
        self.device = check_device(str(self.device))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu "
                                         f"matching the CUDA version; available: {ort.get_available_providers()})")
            self._stream = torch.cuda.Stream(device=self.device)
            # use_tf32 = 0: fp32 products at full precision (the fp32 parity promise, and the memory
            # state's fp32 arithmetic in fp16/bf16 graphs)
            providers = [("CUDAExecutionProvider", {"device_id": str(self.device.index),
                                                    "user_compute_stream": str(self._stream.cuda_stream),
                                                    "use_tf32": "0"}),
                         "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        path = self.manifest.graph_path(self.role)
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            if "NOT_IMPLEMENTED" in first or "Could not find an implementation" in first:
                # e.g. bf16 graphs on the CPU provider: a limit of this provider, not a broken export
                raise BackendUnavailable(f"onnxruntime on {self.device.type} cannot run {path.name} "
                                         f"({self.manifest.precision}): {first[:300]}") from None
            raise ExportError(f"onnxruntime cannot load {path}: {first}") from None
        if self.device.type == "cuda" and self._session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendUnavailable(f"onnxruntime did not enable CUDA for {path.name} "
                                     f"(providers: {self._session.get_providers()})")
        self._check_session_io(path)
        self._binding = self._session.io_binding()
        self._buffers = BufferSet(self.graph.inputs, self.graph.outputs, self.device)
        self._run_options = ort.RunOptions()
        if self.device.type == "cuda" and not self.sync_each_call:
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def _check_session_io(self, path: Path) -> None:
        """The graph file must carry the I/O the manifest lists (a swapped graph does not)."""
        names = lambda xs: sorted(x.name for x in xs)  # noqa: E731
        got_in, got_out = names(self._session.get_inputs()), names(self._session.get_outputs())
        if got_in != names(self.graph.inputs) or got_out != names(self.graph.outputs):
            raise ExportError(f"{path.name} does not have the inputs/outputs its manifest entry lists "
                              f"(graph: {got_in} -> {got_out})")

    def _deactivate(self) -> None:
        self.synchronize()
        self._binding = self._session = self._buffers = self._stream = self._run_options = None

    # ---------------------------------------------------------------- one call
    def _infer(self, feeds: Mapping[str, torch.Tensor], dims: dict[str, int]) -> dict[str, torch.Tensor]:
        self._wait_for_caller()
        with self.stream():
            inputs = self._buffers.bind_inputs(feeds)
            outputs = self._buffers.bind_outputs(dims, inputs)
        dev_type = "cuda" if self.device.type == "cuda" else "cpu"
        dev_id = self.device.index or 0
        b = self._binding
        for spec in self.graph.inputs:
            t = inputs[spec.name]
            b.bind_input(spec.name, dev_type, dev_id, ONNX_ELEMENT_TYPES[spec.dtype], list(t.shape), t.data_ptr())
        for spec in self.graph.outputs:
            t = outputs[spec.name]
            b.bind_output(spec.name, dev_type, dev_id, ONNX_ELEMENT_TYPES[spec.dtype], list(t.shape), t.data_ptr())
        try:
            self._session.run_with_iobinding(b, self._run_options)
        except Exception as exc:
            raise ExportError(f"onnxruntime failed to run {self.graph.file}: {str(exc).splitlines()[0]}") from None
        return outputs
