"""The ONNX Runtime runner: one exported graph on the CPU or CUDA execution provider, with IO binding.

Needs only onnxruntime (or onnxruntime-gpu) and numpy: no torch. Both devices take the same path:
every input and output is bound (IO binding) to a runner-owned buffer (runtimes/buffers.py) held in
an OrtValue on the device, so the schedule loop passes the previous call's state and hidden buffers
straight back in and nothing is copied through the host inside the loop. Host feeds are copied into
their staging OrtValue (`update_inplace`); outputs are read back only when the loop asks
(`to_numpy`: the leaving segment's logits, the final state). Each call synchronizes the provider's
stream before it returns (ONNX Runtime's default), so a staging buffer is never rewritten while a
call still reads it.

CUDA graphs (`cuda_graph`; default ON on CUDA for the fused fp16/bf16 exports, whose graphs hold
Attention nodes: on the H200 every replay of theirs equalled a plain run bit for bit and a 131,072-token
fp16 run took 999 ms instead of 1,229; default OFF for the other exports, since an fp16 LLaMA-1B run of
32 segments with the written-out graphs returned NaN with them, docs/runtimes.md): calls run on a session made for their shape (the
graph's symbolic dims pinned by free-dimension overrides, so shape arithmetic folds away and every
node can stay on the CUDA provider; at most MAX_SHAPE_SESSIONS shapes, further shapes run plainly on
one dynamic session) with the CUDA provider's `enable_cuda_graph`, and each call runs with the run
option `gpu_graph_id` of its call key
(runtimes/cuda_graphs.py: shapes and addresses of every bound buffer; ramp-up, steady and ramp-down
steps, each ping-pong parity and each segment shape get their own id). ONNX Runtime runs a new id
once plainly (allocations), captures it on the same call, and replays it from then on; since inputs
and outputs never share a buffer, running a call twice gives the same outputs. Where ONNX Runtime
refuses capture for the graph (a node not on the CUDA provider, Memcpy nodes, control flow) or a
capture fails, the runner warns once, reopens the session without CUDA graphs and runs every call
plainly (`cuda_graph_reason` says why).

Check mode (environment ARMT_CHECK_CUDA_GRAPHS=1: the first replay of each graph id; =all: every
replay): after a replay the outputs are copied to the host, the same call is run again plainly on
the same session (gpu_graph_id -1, same buffers: inputs and outputs never alias, so the plain run
recomputes what the replay should have written), and the two are compared per output (bit-exact
is not required: max |diff| and non-finite counts are logged, `graph_checks` keeps them); small
inputs are also compared before and after the replay (a graph that wrote into an input buffer
would break the staging's skip-if-equal). A mismatch logs a warning naming the graph id and output.

Graph variants (fp16/bf16 exports at opset 23): a runner of a masked step role also opens the
export's `<role>_causal` graph and runs it on calls whose active slots are full (Runner.pick_variant,
docs/runtimes.md); same I/O, same buffers; sessions, pinned-dims sessions and CUDA-graph keys are
per variant. `causal=False`: always the masked graph.

Shared weights (default on; `shared_weights=False` or ARMT_ORT_SHARED_WEIGHTS=0: off): every session
this runner opens (both variants, the pinned-dims sessions, the companions') takes the export's external
initializers from one WeightPool per export and device (runtimes/shared_weights.py), so the weights are
held once on the device however many sessions are open.

    OrtRunner(export_dir, role, device="cuda")                 from an export directory (manifest)
    OrtRunner(OrtSessionLoader(path), contract=c, model_id=i)  from a loader (export-time validation)
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from exporter.manifest import Manifest
from graphs.contracts import CAUSAL, CAUSAL_OF, MASKED, GraphContract, contract as contract_of
from graphs.dtypes import ONNX_ELEMENT_TYPES, ORT_TYPE_NAMES
from graphs.errors import ExportError
from runtimes.base import Runner, parse_device
from runtimes.buffers import Buffer, BufferSet
from runtimes.cuda_graphs import SKIP, GraphIds, call_key, resolve_cuda_graph
from runtimes.loaders import (CaptureRefused, OrtSessionLoader, import_onnxruntime, open_export,
                              raise_if_not_runnable)

log = logging.getLogger("armt.ort")

MAX_SHAPE_SESSIONS = 2  # sessions with pinned dims per runner (each holds the weights once more unless shared)
CHECK_ENV = "ARMT_CHECK_CUDA_GRAPHS"  # "1": check the first replay of each graph id; "all": every replay
PIN_ENV = "ARMT_ORT_PIN_DIMS"  # "1": plain runs on the pinned-dims sessions too (locates a NaN: pinning vs capture)
CHECK_INPUT_BYTES = 1 << 20  # inputs up to this size are compared before/after a checked replay


def check_mode() -> str | None:
    """None (no checks), "first" or "all", from the environment."""
    v = os.environ.get(CHECK_ENV, "").strip().lower()
    if v in ("", "0", "no", "off", "false"):
        return None
    return "all" if v == "all" else "first"


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


def cuda_graphs_by_default(manifest: Manifest) -> bool:
    """Whether ONNX Runtime CUDA graphs are on by default for this export: its graphs hold fused
    Attention nodes (the fp16/bf16 opset-23 exports, measured exact and faster with them)."""
    return any(g.attention for g in manifest.graphs.values())


class OrtRunner(Runner):
    backend = "ort"

    def __init__(self, source: str | Path | Manifest | OrtSessionLoader, role: str | None = None, *,
                 device: str = "cpu", precision: str | None = None, verify_checksums: bool = True,
                 threads: int | None = None, contract: GraphContract | None = None, model_id: str | None = None,
                 cuda_graph: bool | None = None, causal: bool | OrtSessionLoader = True,
                 shared_weights: bool | None = None):
        """`source`: an export directory (its manifest and checksums are checked now), a loaded
        Manifest, or an OrtSessionLoader together with `contract` and `model_id`.
        `threads`: intra-op threads of the CPU provider (default: ONNX Runtime's choice).
        `cuda_graph`: capture and replay CUDA graphs (default None: on for a CUDA device and an export
        whose graphs hold fused Attention (fp16/bf16, opset 23), off otherwise; see the module
        docstring; True on the CPU is refused). `causal`: run the step role's causal variant on calls whose
        active slots are full (True: the export's `<role>_causal` graph where it has one; an
        OrtSessionLoader: that graph, with a loader source; False: always the masked graph).
        `shared_weights`: the sessions of this runner (and its companions) take the export's one copy
        of the weights on this device (runtimes/shared_weights.py; None: ARMT_ORT_SHARED_WEIGHTS,
        default on; False: each session loads its own copy)."""
        dev = parse_device(device)
        if isinstance(source, OrtSessionLoader):
            if contract is None or model_id is None:
                raise ExportError("an OrtRunner made from a session loader needs the graph's contract and model id")
            self.manifest = None
            self.loader = source
            self.where = str(source.path)
            causal_loader = causal if isinstance(causal, OrtSessionLoader) else None
        else:
            self.manifest = open_export(source, precision, verify_checksums)
            graph = self.manifest.graph(role)
            contract = contract_of(self.manifest.model_config(), role, self.manifest.precision)
            contract.check_io(graph.inputs, graph.outputs, f"export {self.manifest.root}")
            model_id = self.manifest.model_id
            self.loader = OrtSessionLoader(self.manifest.graph_path(role), dev, threads, tf32=self.manifest.tf32)
            self.where = f"export {self.manifest.root}"
            twin = CAUSAL_OF.get(role)
            causal_loader = None
            if causal is not False and twin in self.manifest.graphs:
                g = self.manifest.graph(twin)
                contract.check_io(g.inputs, g.outputs, f"export {self.manifest.root} ({twin})")
                causal_loader = OrtSessionLoader(self.manifest.graph_path(twin), dev, threads, tf32=self.manifest.tf32)
        use_graphs = resolve_cuda_graph(cuda_graph, dev.type, default_on=self.manifest is not None
                                        and cuda_graphs_by_default(self.manifest))
        super().__init__(contract, dev, model_id)
        self._causal_loader = causal_loader  # the causal variant's graph (None: every call masked)
        self.has_causal = causal_loader is not None
        for loader in filter(None, (self.loader, causal_loader)):
            loader.device = dev
            loader.threads = threads if threads is not None else loader.threads
            loader.cuda_graph = use_graphs
            loader.shared_weights = shared_weights if shared_weights is not None else loader.shared_weights
        self.graphs = GraphIds(enabled=use_graphs)
        self._cuda_graph_option = use_graphs  # what was asked (companions get the same)
        self._captured: set[int] = set()  # graph ids whose capture run succeeded (replayed since)
        self._checked: set[int] = set()  # graph ids whose replay was checked (check mode)
        self.graph_checks: list[dict] = []  # one entry per checked replay (check mode)
        self._run_options: dict[int, Any] = {}
        self._plain: dict[str, tuple[Any, Any]] = {}  # variant -> its dynamic session and binding
        self._buffers = None
        self._threads = threads
        self._causal_option = causal is not False
        self._shared_option = shared_weights
        # diagnostic: the sessions with pinned dims (what CUDA graphs run on) without capture
        self._pin_plain = not use_graphs and dev.type == "cuda" and os.environ.get(PIN_ENV, "") == "1"

    def companion(self, role: str) -> "OrtRunner":
        """The export's `role` graph on the same device (an export-directory runner only)."""
        if self.manifest is None:
            return super().companion(role)
        return OrtRunner(self.manifest, role, device=str(self.device), threads=self._threads,
                         cuda_graph=self._cuda_graph_option, causal=self._causal_option,
                         shared_weights=self._shared_option)

    @property
    def cuda_graph(self) -> bool:
        """Are calls captured and replayed as CUDA graphs (False after a refusal or failed capture)?"""
        return self.graphs.enabled

    @property
    def cuda_graph_reason(self) -> str | None:
        """Why CUDA graphs are off (None while they are on)."""
        return None if self.graphs.enabled else self.graphs.reason

    # ---------------------------------------------------------------- session
    def _activate(self) -> None:
        self._shape_sessions: dict[tuple, tuple[Any, Any]] = {}  # (variant, pinned dims) -> (session, binding)
        self._plain = {}
        self._open_session(MASKED)  # the dynamic session: every load error surfaces here, graphs or not
        if self.has_causal:
            self._open_session(CAUSAL)
        self._buffers = BufferSet(self.contract, OrtStorage(self.device.type, self.device.id))

    def _loader_of(self, variant: str) -> OrtSessionLoader:
        return self._causal_loader if variant == CAUSAL else self.loader

    def _open_session(self, variant: str) -> None:
        """The variant's dynamic session (no pinned dims, no CUDA graphs)."""
        loader = copy.copy(self._loader_of(variant))
        loader.cuda_graph, loader.fixed_dims = False, None
        session = loader()
        self._check_session_io(session, loader)
        self._plain[variant] = (session, session.io_binding())

    def _session_for(self, dims: dict[str, int], variant: str = MASKED) -> tuple[Any, Any, bool]:
        """(session, binding, captures) for a call of these dims on graph `variant`."""
        if self.graphs.enabled or self._pin_plain:
            key = (variant, tuple(sorted(dims.items())))
            got = self._shape_sessions.get(key)
            if got is not None:
                return (*got, self.graphs.enabled)
            if sum(k[0] == variant for k in self._shape_sessions) < MAX_SHAPE_SESSIONS:
                loader = copy.copy(self._loader_of(variant))
                loader.cuda_graph, loader.fixed_dims = self.graphs.enabled, dict(dims)
                try:
                    session = loader()
                except CaptureRefused as exc:
                    self._graphs_off(f"ONNX Runtime refused CUDA-graph capture: {exc}")
                else:
                    self._check_session_io(session, loader)
                    got = self._shape_sessions[key] = (session, session.io_binding())
                    self._plain.pop(variant, None)  # its weights freed; reopened if a call needs it
                    return (*got, self.graphs.enabled)
            elif variant not in self._plain:
                log.info("%s: more than %d call shapes; further shapes run without CUDA graphs",
                         self._loader_of(variant).path.name, MAX_SHAPE_SESSIONS)
        if variant not in self._plain:
            self._open_session(variant)
        return (*self._plain[variant], False)

    def _graphs_off(self, reason: str) -> None:
        """Plain runs on the dynamic session from now on (one warning)."""
        if self.graphs.disable(reason):
            log.warning("%s: CUDA graphs off, every call runs plainly (%s)", self.loader.path.name, reason)
        self.graphs.clear()
        self._captured.clear()
        self._checked.clear()
        self._run_options.clear()
        self._shape_sessions.clear()

    def _check_session_io(self, session, loader: OrtSessionLoader) -> None:
        """The graph file must carry the contract's I/O with its dtypes (a swapped graph does not)."""
        got = {v.name: ORT_TYPE_NAMES.get(v.type, v.type) for v in (*session.get_inputs(),
                                                                     *session.get_outputs())}
        want = {s.name: s.dtype for s in (*self.contract.inputs, *self.contract.outputs)}
        if got != want:
            raise ExportError(f"{loader.path.name} does not have the inputs/outputs its manifest entry lists "
                              f"(graph: {sorted(got)}; contract: {sorted(want)})")

    def _deactivate(self) -> None:
        self._buffers = None
        self._plain = {}
        self._shape_sessions = {}
        self.graphs.clear()  # the session's graphs go with it
        self._captured.clear()
        self._checked.clear()
        self._run_options.clear()

    def owns(self, value: Any) -> bool:
        return self._buffers is not None and self._buffers.owns(value)

    def upload(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Buffer]:
        """Copy host arrays into this runner's staging buffers of those inputs (checked against the
        contract) and return the device handles: fed back to `infer` later (of this runner or another
        on the same device), they are bound as they are, without a copy (a decoder's memory and KV cache)."""
        if self._buffers is None:
            raise ExportError(f"runner {self.name} is not active: call activate() first")
        return self._buffers.upload(feeds, self.loader.path.name)

    # ---------------------------------------------------------------- one call
    def _infer(self, feeds: Mapping[str, Any], dims: dict[str, int]) -> dict[str, Buffer]:
        variant = self.pick_variant(feeds)  # host feeds: before they are staged
        inputs = self._buffers.bind_inputs(feeds)
        outputs = self._buffers.bind_outputs(dims, inputs)
        session, binding, captures = self._session_for(dims, variant)
        gid = self.graphs.id_for(call_key(inputs, outputs, variant)) if captures else SKIP
        mode = check_mode() if captures and gid in self._captured else None
        if mode == "all" or (mode == "first" and gid not in self._checked):
            self._run_checked(session, binding, inputs, outputs, gid)
            return outputs
        try:
            self._run(session, binding, inputs, outputs, gid, captures)
        except Exception as exc:
            if not captures or gid in self._captured:
                raise
            # the first call of this graph id (ONNX Runtime's plain run + capture) failed: no graphs
            self._graphs_off(f"capture failed: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}")
            session, binding, _ = self._session_for(dims, variant)
            self._run(session, binding, inputs, outputs, SKIP, False)
            return outputs
        if gid != SKIP:
            self._captured.add(gid)
        return outputs

    def _run_checked(self, session, binding, inputs: dict[str, Buffer], outputs: dict[str, Buffer],
                     gid: int) -> None:
        """A replay of graph `gid`, then the same call plainly on the same session: compare (check mode)."""
        read = self._buffers.read
        before = {n: read(b).copy() for n, b in inputs.items() if b.nbytes <= CHECK_INPUT_BYTES}
        self._run(session, binding, inputs, outputs, gid, True)
        replayed = {n: read(b).copy() for n, b in outputs.items()}
        changed = sorted(n for n, v in before.items() if not np.array_equal(v, read(inputs[n]), equal_nan=True))
        self._run(session, binding, inputs, outputs, SKIP, True)
        entry = {"graph_id": gid, "inputs_written": changed, "outputs": {}}
        bad = list(changed)
        for name, buf in outputs.items():
            g, p = replayed[name], read(buf)
            gf, pf = g.astype(np.float64), p.astype(np.float64)
            fin = np.isfinite(gf) & np.isfinite(pf)
            diff = float(np.max(np.abs(gf[fin] - pf[fin]), initial=0.0))
            scale = float(np.max(np.abs(pf[fin]), initial=0.0))
            row = {"max_abs_diff": diff, "max_abs": scale, "nonfinite_replay": int((~np.isfinite(gf)).sum()),
                   "nonfinite_plain": int((~np.isfinite(pf)).sum())}
            entry["outputs"][name] = row
            if row["nonfinite_replay"] != row["nonfinite_plain"] or diff > 1e-3 * max(scale, 1e-30):
                bad.append(name)
        entry["ok"] = not bad
        self.graph_checks.append(entry)
        self._checked.add(gid)
        if bad:
            log.warning("%s: CUDA graph %d replay differs from a plain run of the same call in %s: %s",
                        self.loader.path.name, gid, ", ".join(bad),
                        {n: entry["outputs"].get(n, "input written by the replay") for n in bad})
        else:
            log.info("%s: CUDA graph %d replay equals a plain run (max |diff| %s)", self.loader.path.name, gid,
                     {n: f"{r['max_abs_diff']:.2e}" for n, r in entry["outputs"].items()})

    def _run(self, session, b, inputs: dict[str, Buffer], outputs: dict[str, Buffer], gid: int,
             captures: bool) -> None:
        dev_type, dev_id = self.device.type, self.device.id
        for name, buf in inputs.items():
            b.bind_input(name, dev_type, dev_id, ONNX_ELEMENT_TYPES[buf.dtype], list(buf.shape), buf.ptr)
        for name, buf in outputs.items():
            b.bind_output(name, dev_type, dev_id, ONNX_ELEMENT_TYPES[buf.dtype], list(buf.shape), buf.ptr)
        try:
            if not captures:
                session.run_with_iobinding(b)
            else:
                session.run_with_iobinding(b, self._options(gid))
        except Exception as exc:
            if captures and gid not in self._captured:
                raise  # a capture run: the caller falls back
            raise_if_not_runnable(exc, f"{self.loader.path.name} on {dev_type}")
            raise ExportError(f"onnxruntime failed to run {self.loader.path.name}: {str(exc).splitlines()[0]}") from None

    def _options(self, gid: int):
        """RunOptions selecting CUDA graph `gid` (SKIP: a plain run in a capturing session)."""
        opts = self._run_options.get(gid)
        if opts is None:
            opts = self._run_options[gid] = import_onnxruntime().RunOptions()
            opts.add_run_config_entry("gpu_graph_id", str(gid))
        return opts

    def to_numpy(self, value: Buffer) -> np.ndarray:
        return self._buffers.read(value)
