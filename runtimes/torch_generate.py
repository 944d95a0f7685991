"""The torch decoder of generation (runtimes/generate.py drives it): an ArmtModel or RmtModel with a
KV cache of the current segment (graphs/decode.py). The prompt's completed segments run on the
decoder's own fast executor (runtimes/fast_torch.py `FastArmt`, kept with its CUDA graphs across
calls) where it applies (a LLaMA ARMT without biases, every row the same number of completed
segments, a finite state), else through `run_torch` (the diagonal schedule for an ARMT by default).

Decoder protocol (what the generation loop calls; an ONNX Runtime decoder implements the same):

    empty_state(batch) -> state                       optional: the fresh state (torch: on the device)
    prefill(ids, lengths, state, schedule) -> state   completed prompt segments, written as `armt run`
    start(state, capacity)                            the state the current segment reads; empty cache
    step(ids (B, n), counts (B,)) -> logits (B, n, V) new tokens appended to each row's segment
    step_last(ids, counts) -> logits (B, V)           optional: as step, only each row's last real place
    segment_tokens() -> (B,)                          tokens in each row's current segment
    complete(rows (B,) bool)                          memory write of those rows' full segments, new segment
    state() -> MemoryState | RmtState (numpy)         the state the current segment reads
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch

from graphs.decode import ArmtMemoryWrites, cached_layers, empty_cache
from graphs.dtypes import check_precision, compute_dtype, torch_dtype
from graphs.errors import InputError
from graphs.rmt_segments import write_block_positions
from graphs.state import MemoryState, RmtState, empty_state, to_numpy
from runtimes.torch_runner import check_torch_device

log = logging.getLogger("armt.generate")


class TorchDecoder:
    backend = "torch"

    def __init__(self, model, device: str = "cpu", precision: str = "fp32", exact_memory: bool = True):
        """`exact_memory`: the prefill's fast executor keeps the memory math in fp32 (as `armt run`);
        False: its half-precision read and TF32 products on CUDA (as `armt bench`; no effect in fp32)."""
        dev = check_torch_device(device)
        check_precision(precision)
        self.precision = precision
        self.device_name = str(dev)
        self._source = model
        dtype = torch_dtype(compute_dtype(precision))
        if dtype != model.dtype or model.device != dev:
            model = copy.deepcopy(model).to(dev)  # never cast or move the caller's model
            model.cast(dtype)
        self.model = model
        self.cfg = model.cfg
        self.kind = model.cfg.kind
        self.extra = model.cfg.armt.num_mem_tokens if self.kind == "rmt" else 0  # read block in front
        self.exact_memory = exact_memory
        self._fast = None  # the prefill's FastArmt (its CUDA graphs kept across calls), built on first use
        self.prefill_path: str | None = None  # what the last prefill ran: "fast" or "run_torch"

    def empty_state(self, batch: int):
        """The fresh state of `batch` rows; an ARMT's as torch zeros on the device (no host arrays to
        fill, check and copy: (L, B, K, d) fp32 is 50 MB a row at the LLaMA-1B shape)."""
        if self.kind != "armt":
            return empty_state(self.cfg, batch)
        L, K, d, dev = self.cfg.base.n_layers, self.cfg.armt.d_key, self.cfg.base.d_model, self.model.device
        return MemoryState(torch.zeros(L, batch, K, d, device=dev), torch.zeros(L, batch, K, device=dev),
                           torch.zeros(L, batch, dtype=torch.bool, device=dev))

    # ---------------------------------------------------------------- prompt's completed segments
    def prefill(self, ids: np.ndarray, lengths: np.ndarray, state, schedule: str):
        """ids (B, W) int64, row b's first lengths[b] (a multiple of T) real -> the state after them."""
        why = self._fast_prefill_refused(ids, lengths, state)
        if why is None:
            return self._fast_prefill(ids, state, schedule)
        log.debug("prefill through run_torch (%s)", why)
        from runtimes.torch_runner import run_torch
        self.prefill_path = "run_torch"
        if isinstance(getattr(state, "A", None), torch.Tensor):
            state = state.numpy()  # run_torch's state: host arrays
        mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        res = run_torch(self._source, ids, mask, state=state, schedule=schedule, device=self.device_name,
                        precision=self.precision, collect=())
        return res.state.without_pending()

    def _fast_prefill_refused(self, ids: np.ndarray, lengths: np.ndarray, state) -> str | None:
        """None when the decoder's FastArmt runs this prefill, else why not."""
        from runtimes.torch_runner import fast_executor_applies
        if self.kind != "armt":
            return "an RMT"
        if not bool(np.all(lengths == ids.shape[1])):
            return "rows with different numbers of completed segments"
        why = fast_executor_applies(self.model, ids, None)
        if why is not None:
            return why
        if getattr(state, "pending", None) is not None:
            return "a state with pending tokens"
        if isinstance(state.A, torch.Tensor):  # checked where it lies (one sync)
            finite = bool(torch.isfinite(state.A).all() and torch.isfinite(state.z).all())
        else:
            finite = bool(np.isfinite(state.A).all() and np.isfinite(state.z).all())
        if not finite:
            return "a non-finite state"
        return None

    def _fast_prefill(self, ids: np.ndarray, state, schedule: str) -> MemoryState:
        """Every row's completed segments (B, k T) through the decoder's FastArmt -> the state as
        torch tensors on the device (start() takes them as they are: no host round trip)."""
        from graphs.model import torch_state
        from runtimes.fast_torch import FastArmt
        if self._fast is None:
            self._fast = FastArmt(self.model, exact_memory=self.exact_memory)  # the decoder's copy: on device, cast
        self.prefill_path = "fast"
        dev = self.model.device
        res = self._fast.run(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(dev), schedule,
                             state=torch_state(state, dev))
        return res.state  # MemoryState (L, B, K, d), (L, B, K), (L, B) fp32/bool torch clones

    # ---------------------------------------------------------------- the current segment
    def start(self, state, capacity: int) -> None:
        m, dev = self.model, self.model.device
        B = state.batch
        if self.kind == "armt":
            # a fast prefill's state is already torch on the device: no host round trip
            as_dev = lambda t: torch.as_tensor(np.asarray(to_numpy(t))).to(dev)  # noqa: E731
            self.memory = [t.to(dev) if isinstance(t, torch.Tensor) else as_dev(t)
                           for t in (state.A, state.z, state.written)]
        else:
            mem = torch.as_tensor(np.asarray(to_numpy(state.memory), dtype=np.float32)).to(dev, m.dtype)
            self.memory = [mem, torch.as_tensor(np.asarray(to_numpy(state.written))).to(dev)]
        self.cache = empty_cache(m, B, capacity)
        self.needs_read = np.full(B, self.kind == "rmt")

    def segment_tokens(self) -> np.ndarray:
        return self.cache.lengths - np.where(self.needs_read, 0, self.extra)

    def _embed(self, vectors: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        g = self.model.globals
        if self.cfg.base.architecture == "gpt2":
            pos = torch.from_numpy(np.array(positions, dtype=np.int64)).to(vectors.device)  # a writable copy
            if int(positions.max(initial=0)) >= g["pos_embed"].shape[0]:
                raise InputError(f"generation reached position {int(positions.max())}; the model's position "
                                 f"table has {g['pos_embed'].shape[0]} rows "
                                 "(fewer new tokens, or --memory-policy recurrent)")
            vectors = vectors + g["pos_embed"][pos]
        return vectors

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmt":
            return self.model.head(self.model.final_norm(h))
        return self.model.head(h)[0]

    @torch.no_grad()
    def step(self, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """ids (B, n) int64 (row b's first counts[b] real) -> logits (B, n, V) float32 of those places."""
        h, offset = self._advance(ids, counts)  # (B, width, d)
        n = ids.shape[1]
        logits = self._head(h).float()  # (B, width, V)
        out = torch.stack([logits[b, int(offset[b]):int(offset[b]) + n] for b in range(ids.shape[0])])
        return to_numpy(out)

    @torch.no_grad()
    def step_last(self, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """As step, but only each row's last real place (its first place for a row with count 0)
        goes through the head -> logits (B, V) float32 (the last prompt segment: one row of logits
        per row instead of (B, n, V))."""
        h, offset = self._advance(ids, counts)  # (B, width, d)
        at = torch.from_numpy((offset + np.maximum(counts, 1) - 1).astype(np.int64)).to(h.device)  # (B,)
        last = h[torch.arange(h.shape[0], device=h.device), at][:, None]  # (B, 1, d)
        return to_numpy(self._head(last).float()[:, 0])

    def _advance(self, ids: np.ndarray, counts: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """The new places through every layer, the cache advanced -> last hidden (B, width, d) before
        the final norm and where each row's tokens start among the places (B,)."""
        m, dev = self.model, self.model.device
        B, n = ids.shape
        tok = m.globals["embed"][torch.from_numpy(ids).to(dev)]  # (B, n, d)
        lead = self.extra if bool(self.needs_read.any()) else 0
        offset = np.where(self.needs_read, lead, 0)  # (B,) where each row's tokens start among the new places
        width = lead + n
        x = torch.zeros(B, width, tok.shape[-1], dtype=m.dtype, device=dev)
        src = np.zeros((B, width), dtype=np.int64)  # token index of each place (-1: read block)
        if lead:
            rows = torch.from_numpy(self.needs_read).to(dev)
            read = m.read_memory(*self.memory)  # (B, M, d)
            x[:, :lead] = torch.where(rows[:, None, None], read, x[:, :lead])
        for b in range(B):
            o = int(offset[b])
            x[b, o:o + n] = tok[b]
        positions = self.cache.lengths[:, None] + np.arange(width)[None, :]  # (B, width)
        real = np.arange(width)[None, :] < (offset + counts)[:, None]
        positions = np.where(real, positions, 0).astype(np.int64)
        x = self._embed(x, positions)
        memory = self.memory if self.kind == "armt" else None
        h = cached_layers(m, x, positions, self.cache, memory=memory, advance=offset + counts)
        self.needs_read = self.needs_read & ~((offset + counts) > 0)
        return h, offset

    @torch.no_grad()
    def complete(self, rows: np.ndarray) -> None:
        """Complete the full segments of `rows` (B,) bool as `armt run` does: the memory places attend
        to the cached segment, the memory is written; those rows start an empty segment."""
        if not rows.any():
            return
        m, dev, a = self.model, self.model.device, self.cfg.armt
        B, M, T = len(rows), a.num_mem_tokens, a.segment_size
        write = torch.from_numpy(rows).to(dev)
        if self.kind == "armt":
            if a.wrap_pos:
                pos = np.broadcast_to(np.arange(self.cfg.pos_table_rows - M, self.cfg.pos_table_rows), (B, M))
            else:
                pos = np.broadcast_to(T + np.arange(M), (B, M))
            pos = np.ascontiguousarray(pos, dtype=np.int64)
            x = self._embed(m.globals["memory"][None].expand(B, -1, -1).to(m.dtype), pos)
            writes = ArmtMemoryWrites(m, self.memory, write)
            cached_layers(m, x, pos, self.cache, memory=self.memory, advance=None, hook=writes)
            self.memory = list(writes.stacked())
        else:
            pos = np.ascontiguousarray(write_block_positions(self.cfg, np.full(B, T)), dtype=np.int64)
            x = self._embed(m.read_memory(*self.memory), pos)
            h = cached_layers(m, x, pos, self.cache, memory=None, advance=None)
            new = m.final_norm(h)  # (B, M, d)
            mem, written = self.memory
            self.memory = [torch.where(write[:, None, None], new, mem), written | write]
            self.needs_read = self.needs_read | rows
        self.cache.reset(rows)

    def state(self):
        if self.kind == "armt":
            return MemoryState(*(to_numpy(t).copy() for t in self.memory))
        return RmtState(to_numpy(self.memory[0]).copy(), to_numpy(self.memory[1]).copy())
