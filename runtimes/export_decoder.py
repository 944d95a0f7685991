"""The generation decoder over an export's decode graphs, for any buffer-owning runner: the decoder
protocol of runtimes/torch_generate.py on the decode roles (graphs/contracts.py: decode + memory_write
for an ARMT, rmt_decode + rmt_memory_write for an RMT). runtimes/ort_generate.py `OrtDecoder` runs it
on ONNX Runtime, runtimes/trt_generate.py `TrtDecoder` on TensorRT engines; runtimes/decoders.py
`open_decoder` picks one for an export.

    prefill   the prompt's completed segments: the export's segment graphs through the one schedule
              loop (runtimes/execute.py run_schedule, a runner kept open across calls), as `armt run`
    step      the decode graph: new tokens against the KV cache, the memory read every layer (ARMT) /
              the read block of rows that start a segment (RMT: the graph always has M read places,
              junk for other rows)
    complete  the memory-write graph at a segment boundary (recurrent policy), then those rows'
              cache is reset

Device-resident: the KV cache lives in the decode runner's ping-pong output buffers (k/v_cache_out of
call t is bound as k/v_cache_in of call t+1, never copied; the graph's cache output is a new tensor,
so in-place is not possible), the memory state in device buffers (uploaded once per `start`, then the
memory-write runner's ping-pong outputs). Per token only ids, positions and lengths (RMT: read) go
host -> device, and only the logits (B, n, V) device -> host.
"""

from __future__ import annotations

import numpy as np

from graphs.contracts import DECODE_ROLES_OF_KIND
from graphs.dtypes import numpy_dtype
from graphs.errors import InputError
from graphs.kv_cache import KvCache
from graphs.rmt_segments import write_block_positions
from graphs.state import MemoryState, RmtState, to_numpy

DECODE_ROLES = DECODE_ROLES_OF_KIND


class ExportDecoder:
    """The decoder protocol over an export's decode graphs on any runner of runtimes/base.py that
    owns its buffers (runtimes/buffers.py) and has `upload`: the feeds, the cache and memory
    bookkeeping. Subclasses open the runners (`_open_runner`): runtimes/ort_generate.py OrtDecoder, TrtDecoder in
    runtimes/trt_generate.py."""

    backend = ""

    def _open_runner(self, role: str, prefill: bool):
        """A runner (not active) of `role`: a decode role, or (`prefill`) the schedule's step graph."""
        raise NotImplementedError

    def __init__(self, manifest, device: str = "cpu", threads: int | None = None, cuda_graph: bool | None = None):
        from runtimes.base import parse_device
        self.manifest = manifest
        self.device = parse_device(device)
        self.device_name = str(self.device)
        self.threads = threads
        self.cuda_graph_option = cuda_graph
        self.cfg = manifest.model_config()
        self.kind = self.cfg.kind
        self.precision = manifest.precision
        self.model_id = manifest.model_id
        self.extra = self.cfg.armt.num_mem_tokens if self.kind == "rmt" else 0  # read block in front
        self.decode_role, self.write_role = DECODE_ROLES[self.kind]
        # one runner per decode role the export has, active for the decoder's life (sessions load here:
        # errors surface now); an export of some roles (`armt bench --generate`) may lack the memory write
        self.runners: dict = {}
        self._prefill_runners: dict = {}  # schedule role -> active runner (opened at the first prefill)
        try:
            for role in (self.decode_role, self.write_role):
                if role in manifest.graphs:
                    self.runners[role] = self._open_runner(role, prefill=False).activate()
        except BaseException:
            self.close()  # the runners opened so far (their device memory)
            raise
        self.memory: dict = {}  # recurrent input name -> device Buffer
        self.cache: KvCache | None = None  # k/v (L, B, H_kv, C, hd): device Buffers; lengths (B,) int64 on the host

    @property
    def cuda_graph(self) -> bool:
        """Do the decode steps replay CUDA graphs (False when not asked, or refused: the runner logs why)?"""
        return self.runners[self.decode_role].cuda_graph

    def close(self) -> None:
        """Release every session (the decoder is unusable afterwards)."""
        for r in (*self.runners.values(), *self._prefill_runners.values()):
            r.deactivate()
        self._prefill_runners.clear()
        self.memory, self.cache = {}, None

    # ---------------------------------------------------------------- prompt's completed segments
    def prefill(self, ids: np.ndarray, lengths: np.ndarray, state, schedule: str):
        from graphs.contracts import role_for
        from runtimes.execute import run_schedule
        role = role_for(self.cfg, schedule)
        runner = self._prefill_runners.get(role)
        if runner is None:
            runner = self._prefill_runners[role] = self._open_runner(role, prefill=True).activate()
        mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)  # (B, N)
        res = run_schedule(runner, ids, mask, state=state, collect=())
        return res.state.without_pending()

    # ---------------------------------------------------------------- the current segment
    def start(self, state, capacity: int) -> None:
        """An empty KV cache of `capacity` places per row (RMT: + M of slack) and the memory `state`,
        both copied to the device once (the decode runner's staging buffers; later calls feed these)."""
        B = state.batch
        dec = self.runners[self.decode_role]
        if self.kind == "armt":
            host = {"A_in": to_numpy(state.A), "z_in": to_numpy(state.z), "written_in": to_numpy(state.written)}
        else:
            host = {"memory_in": to_numpy(state.memory), "written_in": to_numpy(state.written)}
        spec = dec.contract.input("k_cache_in")
        # an RMT step always stores M read places (junk for rows that read nothing): M places of slack
        shape = spec.concrete_shape({"batch": B, "capacity": capacity + self.extra})  # (L, B, H_kv, C, hd)
        zeros = np.zeros(shape, dtype=numpy_dtype(spec.dtype))  # never-written places must be finite (masked: 0 x junk)
        up = dec.upload({**host, "k_cache_in": zeros, "v_cache_in": zeros})
        self.memory = {name: up[name] for name in host}
        self.cache = KvCache(up["k_cache_in"], up["v_cache_in"], np.zeros(B, dtype=np.int64))
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
        runner = self.runners[self.decode_role]
        out = runner.infer(feeds)  # the cache stays on the device: the outputs are the next inputs
        self.cache.k, self.cache.v = out["k_cache_out"], out["v_cache_out"]
        self.cache.advance(offset + counts)
        self.needs_read = self.needs_read & ~((offset + counts) > 0)
        return runner.to_numpy(out["logits"])  # (B, n, V) float32, a host copy

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
        pos = np.ascontiguousarray(pos, dtype=np.int64)  # (B, M)
        self.cache.check_room(M)
        runner = self.runners.get(self.write_role)
        if runner is None:
            raise InputError(f"export {self.manifest.root} has no {self.write_role} graph (exported with only "
                             f"{', '.join(self.manifest.graphs)}): --memory-policy recurrent needs it; export "
                             "again without --no-decode")
        feeds = {"positions": pos, "lengths": self.cache.lengths, "k_cache_in": self.cache.k,
                 "v_cache_in": self.cache.v, "write": np.asarray(rows, dtype=bool), **self.memory}
        out = runner.infer(feeds)  # the decode runner's cache and the memory buffers, bound as they are
        self.memory = {inp: out[o] for o, inp in runner.contract.recurrent.items()}  # its ping-pong outputs
        if self.kind == "rmt":
            self.needs_read = self.needs_read | rows
        self.cache.reset(rows)

    def state(self):
        """The memory the current segment reads, as host numpy arrays."""
        host = {name: self.runners[self.decode_role].to_numpy(buf).copy() for name, buf in self.memory.items()}
        if self.kind == "armt":
            return MemoryState(host["A_in"], host["z_in"], host["written_in"])
        return RmtState(host["memory_in"], host["written_in"])
