"""Generation on an export with ONNX Runtime: the decoder protocol of runtimes/torch_generate.py over
the export's decode graphs (graphs/contracts.py: decode + memory_write for an ARMT, rmt_decode +
rmt_memory_write for an RMT). Needs only onnxruntime and numpy (no torch).

    prefill   the prompt's completed segments: the export's segment graphs through the one schedule
              loop (runtimes/execute.py run_schedule, the ORT runner), as `armt run --backend ort`
    step      the decode graph: new tokens against the KV cache (host numpy buffers, fed and
              returned whole each call), the memory read every layer (ARMT) / the read block of rows
              that start a segment (RMT: the graph always has M read places, junk for other rows)
    complete  the memory-write graph at a segment boundary (recurrent policy), then those rows'
              cache is reset

An export without decode graphs (exported without --decode) is refused with
one line (exit 2). Only ONNX Runtime runs the decode graphs here: `--backend trt` is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from graphs.contracts import DECODE_ROLES_OF_KIND, contract
from graphs.dtypes import compute_dtype, numpy_dtype
from graphs.errors import ExportError, InputError
from graphs.kv_cache import KvCache
from graphs.rmt_segments import write_block_positions
from graphs.state import MemoryState, RmtState, to_numpy

log = logging.getLogger("armt.generate")

DECODE_ROLES = DECODE_ROLES_OF_KIND


def open_decoder(export_dir: str | Path, backend: str, device: str = "cpu", precision: str | None = None):
    """The decoder of an export on `backend` (ort); one line (InputError) for an export without
    decode graphs or a backend that cannot run them."""
    from runtimes.loaders import open_export
    manifest = open_export(export_dir, precision)
    kind = manifest.model_config().kind
    missing = [r for r in DECODE_ROLES[kind] if r not in manifest.graphs]
    if missing:
        raise InputError(f"export {manifest.root} has no decode graphs ({', '.join(missing)}; it has: "
                         f"{', '.join(manifest.graphs)}): export it again with `armt export --decode`, or generate "
                         "with --backend torch on the model directory")
    if backend != "ort":
        raise InputError(f"generation on --backend {backend} is not implemented yet; use --backend ort or torch")
    return OrtDecoder(manifest, device=device)


class OrtDecoder:
    backend = "ort"

    def __init__(self, manifest, device: str = "cpu", threads: int | None = None):
        from runtimes.base import parse_device
        from runtimes.loaders import OrtSessionLoader
        self.manifest = manifest
        self.device = parse_device(device)
        self.device_name = str(self.device)
        self.threads = threads
        self.cfg = manifest.model_config()
        self.kind = self.cfg.kind
        self.precision = manifest.precision
        self.model_id = manifest.model_id
        self.extra = self.cfg.armt.num_mem_tokens if self.kind == "rmt" else 0  # read block in front
        self.cdtype = numpy_dtype(compute_dtype(self.precision))
        self._sessions = {}
        for role in DECODE_ROLES[self.kind]:
            graph = manifest.graph(role)
            c = contract(self.cfg, role, self.precision)
            c.check_io(graph.inputs, graph.outputs, f"export {manifest.root}")
            loader = OrtSessionLoader(manifest.graph_path(role), self.device, threads, tf32=manifest.tf32)
            self._sessions[role] = (c, loader())

    def _run(self, role: str, feeds: dict) -> dict[str, np.ndarray]:
        from runtimes.loaders import raise_if_not_runnable
        c, session = self._sessions[role]
        try:
            out = session.run(list(c.output_names), {k: np.ascontiguousarray(v) for k, v in feeds.items()})
        except Exception as exc:  # onnxruntime's own error types
            raise_if_not_runnable(exc, f"{c.file} on {self.device.type}")
            raise ExportError(f"onnxruntime failed to run {c.file}: {str(exc).splitlines()[0]}") from None
        return dict(zip(c.output_names, out))

    # ---------------------------------------------------------------- prompt's completed segments
    def prefill(self, ids: np.ndarray, lengths: np.ndarray, state, schedule: str):
        from graphs.contracts import role_for
        from runtimes.execute import run_schedule
        from runtimes.ort_runner import OrtRunner
        mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        runner = OrtRunner(self.manifest, role_for(self.cfg, schedule), device=self.device_name,
                           verify_checksums=False, threads=self.threads)
        with runner:
            res = run_schedule(runner, ids, mask, state=state, collect=())
        return res.state.without_pending()

    # ---------------------------------------------------------------- the current segment
    def start(self, state, capacity: int) -> None:
        B = state.batch
        if self.kind == "armt":
            self.memory = {"A_in": np.asarray(to_numpy(state.A), dtype=np.float32),
                           "z_in": np.asarray(to_numpy(state.z), dtype=np.float32),
                           "written_in": np.asarray(to_numpy(state.written), dtype=bool)}
        else:
            self.memory = {"memory_in": np.asarray(to_numpy(state.memory), dtype=np.float32).astype(self.cdtype),
                           "written_in": np.asarray(to_numpy(state.written), dtype=bool)}
        spec = contract(self.cfg, DECODE_ROLES[self.kind][0], self.precision).input("k_cache_in")
        # an RMT step always stores M read places (junk for rows that read nothing): M places of slack
        shape = spec.concrete_shape({"batch": B, "capacity": capacity + self.extra})
        self.cache = KvCache(np.zeros(shape, self.cdtype), np.zeros(shape, self.cdtype), np.zeros(B, dtype=np.int64))
        self.needs_read = np.full(B, self.kind == "rmt")

    def segment_tokens(self) -> np.ndarray:
        return self.cache.lengths - np.where(self.needs_read, 0, self.extra)

    def _check_positions(self, positions: np.ndarray) -> None:
        """GPT-2's learned position table bounds the positions (the graph would index past it)."""
        if self.cfg.base.architecture == "gpt2":
            rows = self.cfg.pos_table_rows
            if int(positions.max(initial=0)) >= rows:
                raise InputError(f"generation reached position {int(positions.max())}; the model's position "
                                 f"table has {rows} rows (fewer new tokens, or --memory-policy recurrent)")

    def step(self, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """ids (B, n) int64 (row b's first counts[b] real) -> logits (B, n, V) float32 of those places."""
        B, n = ids.shape
        lead = self.extra
        offset = np.where(self.needs_read, lead, 0)  # (B,) where each row's tokens start among the places
        width = lead + n
        self.cache.check_room(width)
        positions = self.cache.lengths[:, None] + np.arange(width)[None, :]  # (B, width)
        real = np.arange(width)[None, :] < (offset + counts)[:, None]
        positions = np.where(real, positions, 0).astype(np.int64)
        self._check_positions(positions)
        feeds = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64), "positions": positions,
                 "lengths": self.cache.lengths, "k_cache_in": self.cache.k, "v_cache_in": self.cache.v, **self.memory}
        if self.kind == "rmt":
            feeds["read"] = self.needs_read.copy()
        out = self._run(DECODE_ROLES[self.kind][0], feeds)
        self.cache.k, self.cache.v = out["k_cache_out"], out["v_cache_out"]
        self.cache.advance(offset + counts)
        self.needs_read = self.needs_read & ~((offset + counts) > 0)
        return out["logits"]  # (B, n, V)

    def complete(self, rows: np.ndarray) -> None:
        """Complete the full segments of `rows` (B,) bool as `armt run` does (the memory-write graph);
        those rows start an empty segment."""
        if not rows.any():
            return
        a = self.cfg.armt
        B, M, T = len(rows), a.num_mem_tokens, a.segment_size
        if self.kind == "armt":
            if a.wrap_pos:
                pos = np.broadcast_to(np.arange(self.cfg.pos_table_rows - M, self.cfg.pos_table_rows), (B, M))
            else:
                pos = np.broadcast_to(T + np.arange(M), (B, M))
        else:
            pos = write_block_positions(self.cfg, np.full(B, T))
        pos = np.ascontiguousarray(pos, dtype=np.int64)
        self.cache.check_room(M)
        feeds = {"positions": pos, "lengths": self.cache.lengths, "k_cache_in": self.cache.k,
                 "v_cache_in": self.cache.v, "write": np.asarray(rows, dtype=bool), **self.memory}
        out = self._run(DECODE_ROLES[self.kind][1], feeds)
        self.memory = {inp: out[o] for o, inp in contract(self.cfg, DECODE_ROLES[self.kind][1],
                                                          self.precision).recurrent.items()}
        if self.kind == "rmt":
            self.needs_read = self.needs_read | rows
        self.cache.reset(rows)

    def state(self):
        if self.kind == "armt":
            return MemoryState(self.memory["A_in"].copy(), self.memory["z_in"].copy(), self.memory["written_in"].copy())
        return RmtState(self.memory["memory_in"].copy(), self.memory["written_in"].copy())
