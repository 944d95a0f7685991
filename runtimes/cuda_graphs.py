"""CUDA-graph bookkeeping shared by the ONNX Runtime and TensorRT runners (no backend imported here).

A CUDA graph replays the kernels of one captured call with the addresses and shapes it was captured
with. The runners bind every input and output to runner-owned buffers (runtimes/buffers.py: one
staging buffer per input shape, a ping-pong pair per fed-back output), so a call is fully described
by its **call key**: the (name, shape, address) of every bound input and output. Equal keys replay
the same graph; a new key (the first call with host state, each ping-pong parity, each step or
segment shape: ramp-up, steady and ramp-down of the diagonal schedule are distinct keys wherever
their shapes or buffers differ, the sequential schedule's short last segment too) gets the next id.

    ids = GraphIds(enabled=True)
    gid = ids.id_for(call_key(inputs, outputs))   # 0, 1, ... ; SKIP (-1): run without a graph
    ids.disable("reason")                         # capture refused or failed: every later call SKIP;
                                                  # True the first time (the runner warns once)

Ids follow ONNX Runtime's `gpu_graph_id` run option (0 is its default graph, -1 runs without
capture or replay); the TensorRT runner uses the same ids as the keys of its own captured graphs.
Past `limit` distinct keys (a run whose shapes keep changing) further keys run without a graph:
capture costs a run and memory, and such shapes would not repeat.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from graphs.errors import InputError

log = logging.getLogger("armt.run")

SKIP = -1  # ONNX Runtime's kCudaGraphAnnotationSkip: run the call without capturing or replaying
DEFAULT_LIMIT = 64  # distinct call keys per runner that get a graph


def call_key(inputs: Mapping[str, Any], outputs: Mapping[str, Any], *extra) -> tuple:
    """(name, shape, address) of every bound buffer (runtimes.buffers.Buffer: .shape, .ptr), plus
    whatever else the backend's call depends on (`extra`: TensorRT's optimization profile)."""
    return (tuple(extra),
            tuple(sorted((n, tuple(b.shape), int(b.ptr)) for n, b in inputs.items())),
            tuple(sorted((n, tuple(b.shape), int(b.ptr)) for n, b in outputs.items())))


def resolve_cuda_graph(requested: bool | None, device_type: str, default_on: bool = True) -> bool:
    """The runners' option: None = `default_on` for CUDA devices, off elsewhere; True on a CPU device is
    refused. The ONNX Runtime runner passes default_on only for exports with fused Attention
    (runtimes/ort_runner.py cuda_graphs_by_default: NaN was measured on the H200 with the others' graphs)."""
    if requested is None:
        return default_on and device_type == "cuda"
    if requested and device_type != "cuda":
        raise InputError("CUDA graphs need a CUDA device (--device cuda), or leave --cuda-graph out")
    return bool(requested)


class GraphIds:
    """Call key -> graph id, assigned in order of first appearance; how often each key ran."""

    def __init__(self, enabled: bool = True, limit: int = DEFAULT_LIMIT):
        self.enabled = enabled
        self.limit = limit
        self.reason: str | None = None if enabled else "not requested"
        self._ids: dict[tuple, int] = {}
        self._runs: dict[tuple, int] = {}
        self._over_limit = False

    def __len__(self) -> int:
        return len(self._ids)

    def id_for(self, key: tuple) -> int:
        """The graph id of this call (a new key gets the next id), or SKIP."""
        self._runs[key] = self._runs.get(key, 0) + 1
        if not self.enabled:
            return SKIP
        gid = self._ids.get(key)
        if gid is not None:
            return gid
        if len(self._ids) >= self.limit:
            if not self._over_limit:
                log.info("more than %d distinct call shapes/addresses: further ones run without a CUDA graph",
                         self.limit)
                self._over_limit = True
            return SKIP
        gid = self._ids[key] = len(self._ids)
        return gid

    def runs(self, key: tuple) -> int:
        """How many calls with this key `id_for` has seen (the current one included)."""
        return self._runs.get(key, 0)

    def disable(self, reason: str) -> bool:
        """No graphs from now on (capture refused or failed). True the first time: warn then."""
        first = self.enabled
        self.enabled = False
        if first:
            self.reason = reason
        return first

    def clear(self) -> None:
        """Forget every id (a new session/engine: its graphs are gone)."""
        self._ids.clear()
        self._runs.clear()
        self._over_limit = False

    @property
    def captured_keys(self) -> int:
        return len(self._ids)
