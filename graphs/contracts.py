"""The graph contract: one object per graph role, the single source of every graph's I/O.

A contract says what a graph role takes and returns (names in call order, dtypes, shapes with named
dims), which outputs feed which inputs at the next call (`recurrent`), which entries of an output
carry meaning for a given call (`output_mask`), the bounds-table kind of each output, the schedule
that drives the role and the file name it is exported to. It is built from the model config and
the export precision, and it lives next to the cells that implement it (graphs/cells.py):

    tracing (exporter/trace.py)     example feeds, dynamic dims      <- GraphContract
    manifest, contract check        TensorSpecs, file name           <- GraphContract
    export samples, validation      initial carried inputs, masks    <- GraphContract
    runners (torch, ORT, TensorRT)  feed checks, output buffers      <- GraphContract

Adding a graph role = one contract builder here (registered in BUILDERS) + one cell in
graphs/cells.py (registered in graphs.cells.CELLS).

Named dims: "batch" (rows), "width" (token places of a slot), "slot" = width + M. Everything else
(L, K, d, V) is fixed by the model config. The compute dtype is the precision's; the memory state is
float32 in every precision; logits and the final hidden are float32 outputs.

The roles (see docs/architecture.md for the tables), by model kind:

    ARMT  segment         one slot through all L layers          (sequential schedule)
          diagonal_step   one anti-diagonal: L slots, one each    (diagonal schedule)
    RMT   rmt_segment     one [memory | tokens | memory] slot     (sequential schedule; the diagonal
                          through all L layers, memory (B, M, d)   schedule does not apply to an RMT)
                          in and out
    both  lm_head         final-norm hidden rows -> logits         (no schedule: run on the rows asked
                          (B, R, d) f32 -> (B, R, V) f32            for, logits on demand)
    fp16/bf16 at opset 23 also: segment_causal, diagonal_step_causal, rmt_segment_causal: the same
          contract as the masked role, Attention with is_causal=1 and no mask (for calls whose active
          slots are full: slots_full; the runners pick per call, runtimes/variants.py)

The step graphs (segment, diagonal_step, rmt_segment) output the final-norm hidden states, never
logits: the loop runs lm_head only on the positions a caller asks for (runtimes/execute.py).

`roles_of(cfg)` lists a model's roles (the graphs it is exported to), `step_roles_of(cfg)` the
schedule-driven ones, `role_for(cfg, schedule)` picks the one a schedule runs (and
refuses `diagonal` for an RMT with one line).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import numpy as np

from graphs.config import ModelConfig
from graphs.dtypes import compute_dtype, dtype_name, numpy_dtype
from graphs.errors import ExportError, InputError

SEGMENT = "segment"
DIAGONAL_STEP = "diagonal_step"
RMT_SEGMENT = "rmt_segment"
LM_HEAD = "lm_head"
DECODE = "decode"  # generation (docs/generation.md): new tokens against a KV cache, the memory read
MEMORY_WRITE = "memory_write"  # generation, recurrent policy: the M memory places write (A, z)
RMT_DECODE = "rmt_decode"  # generation on an RMT: [memory | tokens] against a KV cache
RMT_MEMORY_WRITE = "rmt_memory_write"  # generation on an RMT, recurrent policy: the write block -> next memory
# causal variants (fp16/bf16 at opset 23): the step graph with `is_causal=1` Attention and no mask, run
# on calls where every key of every active slot is valid (then the slot mask IS causal: slots_full)
SEGMENT_CAUSAL = "segment_causal"
DIAGONAL_STEP_CAUSAL = "diagonal_step_causal"
RMT_SEGMENT_CAUSAL = "rmt_segment_causal"
CAUSAL_OF = {SEGMENT: SEGMENT_CAUSAL, DIAGONAL_STEP: DIAGONAL_STEP_CAUSAL, RMT_SEGMENT: RMT_SEGMENT_CAUSAL}
MASKED_OF = {causal: masked for masked, causal in CAUSAL_OF.items()}
MASKED, CAUSAL = "masked", "causal"  # the attention variants of a step role (GraphContract.variant)
ROLES = (SEGMENT, DIAGONAL_STEP, RMT_SEGMENT, LM_HEAD, DECODE, MEMORY_WRITE, RMT_DECODE,
         RMT_MEMORY_WRITE, *CAUSAL_OF.values())  # every role of every kind
SCHEDULE_OF_ROLE = {SEGMENT: "sequential", DIAGONAL_STEP: "diagonal", RMT_SEGMENT: "sequential",  # lm_head: none
                    DECODE: "decode", MEMORY_WRITE: "decode", RMT_DECODE: "decode", RMT_MEMORY_WRITE: "decode",
                    **{causal: "sequential" if masked != DIAGONAL_STEP else "diagonal"
                       for masked, causal in CAUSAL_OF.items()}}
ROLE_OF_SCHEDULE = {"sequential": SEGMENT, "diagonal": DIAGONAL_STEP}  # an ARMT's (role_for: any kind)
GRAPH_FILES = {role: f"{role}.onnx" for role in ROLES}
STEP_ROLES_OF_KIND = {"armt": (SEGMENT, DIAGONAL_STEP), "rmt": (RMT_SEGMENT,)}
ROLES_OF_KIND = {kind: (*roles, LM_HEAD) for kind, roles in STEP_ROLES_OF_KIND.items()}  # every export's
DECODE_ROLES_OF_KIND = {"armt": (DECODE, MEMORY_WRITE), "rmt": (RMT_DECODE, RMT_MEMORY_WRITE)}  # with --decode
DIAGONAL_REFUSAL = ("diagonal batching does not apply to an RMT (segment s+1's first layer needs segment s's "
                    "last layer): use --schedule sequential")


def roles_of(cfg: ModelConfig) -> tuple[str, ...]:
    """The graph roles a model of this kind is exported to."""
    return ROLES_OF_KIND[cfg.kind]


def step_roles_of(cfg: ModelConfig) -> tuple[str, ...]:
    """The schedule-driven graph roles of this kind (every role but lm_head)."""
    return STEP_ROLES_OF_KIND[cfg.kind]


def decode_roles_of(cfg: ModelConfig) -> tuple[str, ...]:
    """The generation graph roles of a model of this kind (exported with --decode)."""
    return DECODE_ROLES_OF_KIND[cfg.kind]


def causal_roles_of(cfg: ModelConfig) -> tuple[str, ...]:
    """The causal variants of this kind's step roles (exported for fp16/bf16 at opset 23)."""
    return tuple(CAUSAL_OF[r] for r in step_roles_of(cfg))


def all_roles_of(cfg: ModelConfig) -> tuple[str, ...]:
    """Every graph role an export of this model may hold."""
    return roles_of(cfg) + causal_roles_of(cfg) + decode_roles_of(cfg)


def slots_full(role: str, feeds: Mapping[str, Any]) -> bool:
    """Does every key of every active slot of this call hold a valid place (host-side, from the
    `key_valid` feed the schedule builds on the host; the diagonal step's idle layers do not count:
    their outputs are discarded)? Then the slot mask causal & (key_valid | diag) is exactly causal
    and the call may run a step role's causal variant. False where `key_valid` is not a host array
    (a device buffer: the masked graph is always right)."""
    kv = feeds.get("key_valid")
    if not isinstance(kv, np.ndarray):
        return False
    if SCHEDULE_OF_ROLE.get(role) == "diagonal":  # (L, B, P), active (L,)
        active = feeds.get("active")
        if not isinstance(active, np.ndarray):
            return False
        return bool(kv[active.astype(bool)].all())
    return bool(kv.all())  # (B, P)


def schedules_of(cfg: ModelConfig) -> tuple[str, ...]:
    """The schedules a model of this kind runs: ARMT sequential and diagonal, RMT sequential."""
    return tuple(dict.fromkeys(SCHEDULE_OF_ROLE[r] for r in step_roles_of(cfg)))


def default_schedule(cfg: ModelConfig) -> str:
    """diagonal for an ARMT, sequential for an RMT."""
    return "diagonal" if "diagonal" in schedules_of(cfg) else "sequential"


def role_for(cfg: ModelConfig, schedule: str) -> str:
    """The graph role that runs `schedule` for this model; InputError (one line) where it does not apply."""
    if schedule not in ROLE_OF_SCHEDULE:
        raise InputError(f"schedule must be one of {', '.join(ROLE_OF_SCHEDULE)}, got {schedule!r}")
    for role in step_roles_of(cfg):
        if SCHEDULE_OF_ROLE[role] == schedule:
            return role
    if cfg.kind == "rmt" and schedule == "diagonal":
        raise InputError(DIAGONAL_REFUSAL)
    raise InputError(f"a {cfg.kind.upper()} has no {schedule} schedule")


# ------------------------------------------------------------------------------------------ tensors
@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. `kind` names an output's row of the bounds table."""

    name: str
    dtype: str  # one of graphs.dtypes.DTYPES
    shape: tuple[int | str, ...]  # ints are fixed sizes, strings are named dynamic dims
    kind: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.kind:
            d["kind"] = self.kind
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(name=str(d["name"]), dtype=str(d["dtype"]), shape=tuple(d["shape"]), kind=str(d.get("kind", "")))

    def concrete_shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """The shape with named dims replaced from `dims` (e.g. {"batch": 2, "width": 6, "slot": 9})."""
        try:
            return tuple(dims[s] if isinstance(s, str) else int(s) for s in self.shape)
        except KeyError as exc:
            raise ExportError(f"tensor {self.name} needs a size for dim {exc.args[0]!r}") from None


def _fmt(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


# ------------------------------------------------------------------------------------------ contract
@dataclass(frozen=True)
class GraphContract:
    role: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    recurrent: Mapping[str, str]  # output -> the input it feeds at the next call
    derived_dims: Mapping[str, tuple[str, int]]  # e.g. {"slot": ("width", M)}: slot = width + M
    cfg: ModelConfig = field(compare=False, repr=False)
    _mask: Callable[["GraphContract", str, Mapping[str, Any]], Any] = field(compare=False, repr=False, default=None)

    @property
    def schedule(self) -> str | None:
        """The schedule that drives this role (None for lm_head, which is run on the rows asked for)."""
        return SCHEDULE_OF_ROLE.get(self.role)

    @property
    def file(self) -> str:
        return GRAPH_FILES[self.role]

    @property
    def variant(self) -> str:
        """CAUSAL for a causal variant (is_causal Attention, meant for full slots), else MASKED."""
        return CAUSAL if self.role in MASKED_OF else MASKED

    @property
    def masked_role(self) -> str:
        """The role whose graph computes the same for any feed (a causal variant's masked twin; else itself)."""
        return MASKED_OF.get(self.role, self.role)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    def input(self, name: str) -> TensorSpec:
        return spec_by_name(self.inputs, name, self.role, "input")

    def output(self, name: str) -> TensorSpec:
        return spec_by_name(self.outputs, name, self.role, "output")

    def kind(self, output: str) -> str:
        return self.output(output).kind

    def check_io(self, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], where: str) -> None:
        """Refuse a graph whose I/O names differ from the contract (a swapped or foreign graph)."""
        got_in, got_out = tuple(s.name for s in inputs), tuple(s.name for s in outputs)
        if set(got_in) != set(self.input_names) or set(got_out) != set(self.output_names):
            old = " (made before logits on demand: its step graphs output logits; export it again)" if (
                "logits" in got_out and "logits" not in self.output_names) else ""
            raise ExportError(f"{where}: graph {self.role} has inputs {list(got_in)} and outputs {list(got_out)}, "
                              f"the {self.role} contract needs {list(self.input_names)} -> {list(self.output_names)}"
                              f"{old}")

    def resolve_dims(self, feeds: Mapping[str, Any], specs: tuple[TensorSpec, ...] | None = None) -> dict[str, int]:
        """Check feeds (numpy arrays, torch tensors: anything with .shape and .dtype) against the input
        specs (names, dtypes, ranks, fixed sizes, consistent named dims); return the named dims' sizes,
        e.g. {"batch": 2, "width": 6, "slot": 9}. `specs`: check only these inputs (the others are the
        runner's own buffers, fed back)."""
        names = set(self.input_names)
        missing = [n for n in self.input_names if n not in feeds]
        extra = sorted(set(feeds) - names)
        if missing or extra:
            raise InputError(f"graph {self.role}: missing inputs {missing}, unexpected inputs {extra}")
        dims: dict[str, int] = {}
        for spec in specs if specs is not None else self.inputs:
            t = feeds[spec.name]
            got = dtype_name(t.dtype)
            if got != spec.dtype:
                raise InputError(f"graph {self.role} input {spec.name} must be {spec.dtype}, got {got}")
            shape = tuple(int(s) for s in t.shape)
            if len(shape) != len(spec.shape):
                raise InputError(f"graph {self.role} input {spec.name} must have shape {_fmt(spec.shape)}, "
                                 f"got {shape}")
            for want, size in zip(spec.shape, shape):
                if isinstance(want, str):
                    if dims.setdefault(want, size) != size:
                        raise InputError(f"graph {self.role} input {spec.name} has {want}={size}, other inputs "
                                         f"have {want}={dims[want]}")
                elif int(want) != size:
                    raise InputError(f"graph {self.role} input {spec.name} must have shape {_fmt(spec.shape)}, "
                                     f"got {shape}")
        for name, (base, offset) in self.derived_dims.items():
            if base in dims and name in dims and dims[name] != dims[base] + offset:
                raise InputError(f"graph {self.role}: {name} must be {base} + {offset} = {dims[base] + offset}, "
                                 f"got {dims[name]}")
        return dims

    def dims_for(self, batch: int, width: int) -> dict[str, int]:
        dims = {"batch": batch, "width": width, "rows": width}
        for name, (base, offset) in self.derived_dims.items():
            dims[name] = dims[base] + offset
        return dims

    def initial_carry(self, batch: int, width: int) -> dict[str, np.ndarray]:
        """The recurrent inputs of a first call from an empty memory (numpy zeros)."""
        dims = self.dims_for(batch, width)
        return {inp: np.zeros(self.input(inp).concrete_shape(dims), dtype=numpy_dtype(self.input(inp).dtype))
                for inp in self.recurrent.values()}

    def output_mask(self, name: str, feeds: Mapping[str, Any]):
        """Which entries of output `name` carry meaning for the call fed `feeds` (numpy bool,
        broadcastable to the output), or None for "all of them"."""
        return self._mask(self, name, feeds) if self._mask else None


def spec_by_name(specs: tuple[TensorSpec, ...], name: str, role: str, what: str) -> TensorSpec:
    for s in specs:
        if s.name == name:
            return s
    raise ExportError(f"graph {role} has no {what} named {name!r}")


def _host(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ------------------------------------------------------------------------------------------ the roles
def _state(cfg: ModelConfig, suffix: str) -> tuple[TensorSpec, ...]:
    L, d, K = cfg.base.n_layers, cfg.base.d_model, cfg.armt.d_key
    kinds = ("A", "z", "written") if suffix == "out" else ("", "", "")
    return (TensorSpec(f"A_{suffix}", "float32", (L, "batch", K, d), kinds[0]),
            TensorSpec(f"z_{suffix}", "float32", (L, "batch", K), kinds[1]),
            TensorSpec(f"written_{suffix}", "bool", (L, "batch"), kinds[2]))


def _head(cfg: ModelConfig) -> tuple[TensorSpec, ...]:
    """The step graphs' per-token output: the final-norm hidden state (logits come from lm_head)."""
    return (TensorSpec("hidden", "float32", ("batch", "width", cfg.base.d_model), "hidden"),)


STATE_FEEDBACK = {"A_out": "A_in", "z_out": "z_in", "written_out": "written_in"}


def _segment_mask(c: GraphContract, name: str, feeds) -> Any:
    """hidden: real token places only (padding places and rows with no tokens are junk).
    A, z, written: everything (rows that do not write keep their state bit for bit)."""
    if name == "hidden":
        kv = _host(feeds["key_valid"]).astype(bool)
        W = _host(feeds["input_ids"]).shape[-1]
        return kv[:, :W, None]  # (B, W, 1)
    return None


def _diagonal_mask(c: GraphContract, name: str, feeds) -> Any:
    """hidden: the last layer's real token places (nothing when it is idle); hidden_out:
    active layers, rows that hold tokens in that layer's segment, real places and memory tokens (an
    ended row's slot is never read again); A, z, written: everything."""
    kv = _host(feeds["key_valid"]).astype(bool)
    active = _host(feeds["active"]).astype(bool)
    write = _host(feeds["write"]).astype(bool)
    W = _host(feeds["input_ids"]).shape[-1]
    if name == "hidden":
        return (kv[-1, :, :W] & write[-1][:, None] & active[-1])[:, :, None]  # (B, W, 1)
    if name == "hidden_out":
        return (kv & write[:, :, None] & active[:, None, None])[..., None]  # (L, B, P, 1)
    return None


def segment_contract(cfg: ModelConfig, precision: str) -> GraphContract:
    inputs = (TensorSpec("input_ids", "int64", ("batch", "width")),
              TensorSpec("positions", "int64", ("batch", "slot")),
              TensorSpec("key_valid", "bool", ("batch", "slot")),
              TensorSpec("write", "bool", ("batch",)), *_state(cfg, "in"))
    return GraphContract(SEGMENT, precision, inputs, (*_head(cfg), *_state(cfg, "out")), dict(STATE_FEEDBACK),
                         {"slot": ("width", cfg.armt.num_mem_tokens)}, cfg, _segment_mask)


def diagonal_contract(cfg: ModelConfig, precision: str) -> GraphContract:
    L, d = cfg.base.n_layers, cfg.base.d_model
    cd = compute_dtype(precision)
    inputs = (TensorSpec("input_ids", "int64", ("batch", "width")),
              TensorSpec("hidden_in", cd, (L, "batch", "slot", d)),
              TensorSpec("positions", "int64", (L, "batch", "slot")),
              TensorSpec("key_valid", "bool", (L, "batch", "slot")),
              TensorSpec("active", "bool", (L,)),
              TensorSpec("write", "bool", (L, "batch")), *_state(cfg, "in"))
    outputs = (TensorSpec("hidden_out", cd, (L, "batch", "slot", d), "hidden_out"), *_head(cfg), *_state(cfg, "out"))
    return GraphContract(DIAGONAL_STEP, precision, inputs, outputs, {"hidden_out": "hidden_in", **STATE_FEEDBACK},
                         {"slot": ("width", cfg.armt.num_mem_tokens)}, cfg, _diagonal_mask)


def _rmt_segment_mask(c: GraphContract, name: str, feeds) -> Any:
    """hidden: real token places only (the token places sit behind the M read places);
    memory, written: everything (rows that do not write keep their memory bit for bit)."""
    if name == "hidden":
        kv = _host(feeds["key_valid"]).astype(bool)
        W = _host(feeds["input_ids"]).shape[-1]
        M = c.cfg.armt.num_mem_tokens
        return kv[:, M:M + W, None]  # (B, W, 1)
    return None


RMT_FEEDBACK = {"memory_out": "memory_in", "written_out": "written_in"}


def rmt_segment_contract(cfg: ModelConfig, precision: str) -> GraphContract:
    """RMT segment graph: slot = [read memory | width token places | write memory] = width + 2M.
    The memory is in the compute dtype (it is a final-norm hidden state fed back as embeddings);
    `written_in` False: the row reads the learned initial memory (a zero state is a fresh one)."""
    M, d = cfg.armt.num_mem_tokens, cfg.base.d_model
    cd = compute_dtype(precision)
    inputs = (TensorSpec("input_ids", "int64", ("batch", "width")),
              TensorSpec("positions", "int64", ("batch", "slot")),
              TensorSpec("key_valid", "bool", ("batch", "slot")),
              TensorSpec("write", "bool", ("batch",)),
              TensorSpec("memory_in", cd, ("batch", M, d)),
              TensorSpec("written_in", "bool", ("batch",)))
    outputs = (*_head(cfg), TensorSpec("memory_out", cd, ("batch", M, d), "memory"),
               TensorSpec("written_out", "bool", ("batch",), "written"))
    return GraphContract(RMT_SEGMENT, precision, inputs, outputs, dict(RMT_FEEDBACK), {"slot": ("width", 2 * M)},
                         cfg, _rmt_segment_mask)


# ------------------------------------------------------------------------------------------ generation
def _cache(cfg: ModelConfig, precision: str, suffix: str) -> tuple[TensorSpec, ...]:
    """The KV cache (L, batch, H_kv, capacity, hd) in the compute dtype (graphs/kv_cache.py)."""
    b = cfg.base
    hkv = b.n_kv_heads if b.architecture == "llama" else b.n_heads
    cd = compute_dtype(precision)
    shape = (b.n_layers, "batch", hkv, "capacity", b.head_dim)
    kind = "hidden_out" if suffix == "out" else ""  # keys/values: compute-dtype activations, the carried hidden's bounds
    return TensorSpec(f"k_cache_{suffix}", cd, shape, kind), TensorSpec(f"v_cache_{suffix}", cd, shape, kind)


CACHE_FEEDBACK = {"k_cache_out": "k_cache_in", "v_cache_out": "v_cache_in"}


def _decode_mask(c: GraphContract, name: str, feeds) -> Any:
    """logits: every place (the decoder picks each row's real ones); caches: the places below each
    row's length plus the n new ones (beyond: never read before they are overwritten)."""
    if name in ("k_cache_out", "v_cache_out"):
        lengths = _host(feeds["lengths"])
        n = _host(feeds["positions"]).shape[1]  # the places stored (RMT: M + width)
        C = _host(feeds[name.replace("_out", "_in")]).shape[3]
        keep = np.arange(C)[None, :] < (lengths[:, None] + n)  # (B, C)
        return keep[None, :, None, :, None]
    return None


def decode_contract(cfg: ModelConfig, precision: str) -> GraphContract:
    """ARMT generation step: n new tokens per row (positions (B, n)) appended to each row's cache at
    places lengths[b] .. lengths[b]+n-1; every layer reads the memory (A, z) first (never writes)."""
    V = cfg.base.vocab_size
    inputs = (TensorSpec("input_ids", "int64", ("batch", "width")),
              TensorSpec("positions", "int64", ("batch", "width")),
              TensorSpec("lengths", "int64", ("batch",)),
              *_cache(cfg, precision, "in"), *_state(cfg, "in"))
    outputs = (TensorSpec("logits", "float32", ("batch", "width", V), "logits"), *_cache(cfg, precision, "out"))
    return GraphContract(DECODE, precision, inputs, outputs, dict(CACHE_FEEDBACK), {}, cfg, _decode_mask)


def memory_write_contract(cfg: ModelConfig, precision: str) -> GraphContract:
    """ARMT segment boundary while generating: the M memory places (positions (B, M)) attend to each
    row's cached segment and every layer writes its (A, z) where `write`; the cache is not kept."""
    M = cfg.armt.num_mem_tokens
    inputs = (TensorSpec("positions", "int64", ("batch", M)),
              TensorSpec("lengths", "int64", ("batch",)),
              *_cache(cfg, precision, "in"),
              TensorSpec("write", "bool", ("batch",)), *_state(cfg, "in"))
    return GraphContract(MEMORY_WRITE, precision, inputs, _state(cfg, "out"), dict(STATE_FEEDBACK), {}, cfg, None)


def rmt_decode_contract(cfg: ModelConfig, precision: str) -> GraphContract:
    """RMT generation step: rows with `read` start a segment, fed [read memory | n tokens]; the other
    rows feed their n tokens (junk places behind them). positions (B, M + n) of those places; the
    M + n places are stored at lengths[b] ..; logits (B, n, V) of the token places."""
    M, d, V = cfg.armt.num_mem_tokens, cfg.base.d_model, cfg.base.vocab_size
    cd = compute_dtype(precision)
    inputs = (TensorSpec("input_ids", "int64", ("batch", "width")),
              TensorSpec("positions", "int64", ("batch", "slot")),
              TensorSpec("lengths", "int64", ("batch",)),
              TensorSpec("read", "bool", ("batch",)),
              *_cache(cfg, precision, "in"),
              TensorSpec("memory_in", cd, ("batch", M, d)),
              TensorSpec("written_in", "bool", ("batch",)))
    outputs = (TensorSpec("logits", "float32", ("batch", "width", V), "logits"), *_cache(cfg, precision, "out"))
    return GraphContract(RMT_DECODE, precision, inputs, outputs, dict(CACHE_FEEDBACK), {"slot": ("width", M)}, cfg,
                         _decode_mask)


def rmt_memory_write_contract(cfg: ModelConfig, precision: str) -> GraphContract:
    """RMT segment boundary while generating: the write block (the memory it read + positions (B, M))
    attends to each row's cached segment; its final-norm hidden state is the next memory where `write`."""
    M, d = cfg.armt.num_mem_tokens, cfg.base.d_model
    cd = compute_dtype(precision)
    inputs = (TensorSpec("positions", "int64", ("batch", M)),
              TensorSpec("lengths", "int64", ("batch",)),
              *_cache(cfg, precision, "in"),
              TensorSpec("write", "bool", ("batch",)),
              TensorSpec("memory_in", cd, ("batch", M, d)),
              TensorSpec("written_in", "bool", ("batch",)))
    outputs = (TensorSpec("memory_out", cd, ("batch", M, d), "memory"),
               TensorSpec("written_out", "bool", ("batch",), "written"))
    return GraphContract(RMT_MEMORY_WRITE, precision, inputs, outputs, dict(RMT_FEEDBACK), {}, cfg, None)


def lm_head_contract(cfg: ModelConfig, precision: str) -> GraphContract:
    """LM head graph: final-norm hidden rows (B, R, d) float32 -> logits (B, R, V) float32. The rows
    are whatever the caller asks logits for (every token place, each row's last one); inside, the
    hidden state is cast to the compute dtype (exact: it was produced in it) and multiplied by the
    head weight, so the logits equal the step graph's former logits output."""
    d, V = cfg.base.d_model, cfg.base.vocab_size
    return GraphContract(LM_HEAD, precision, (TensorSpec("hidden", "float32", ("batch", "rows", d)),),
                         (TensorSpec("logits", "float32", ("batch", "rows", V), "logits"),), {}, {}, cfg)


BUILDERS: dict[str, Callable[[ModelConfig, str], GraphContract]] = {
    SEGMENT: segment_contract, DIAGONAL_STEP: diagonal_contract, RMT_SEGMENT: rmt_segment_contract,
    DECODE: decode_contract, MEMORY_WRITE: memory_write_contract, RMT_DECODE: rmt_decode_contract,
    RMT_MEMORY_WRITE: rmt_memory_write_contract,
    LM_HEAD: lm_head_contract}


def _causal_builder(role: str) -> Callable[[ModelConfig, str], GraphContract]:
    """A causal variant: the masked role's contract (same I/O, masks, schedule) under its own role name."""
    def build(cfg: ModelConfig, precision: str) -> GraphContract:
        return replace(BUILDERS[MASKED_OF[role]](cfg, precision), role=role)
    return build


BUILDERS.update({causal: _causal_builder(causal) for causal in MASKED_OF})


def contract(cfg: ModelConfig, role: str, precision: str = "fp32") -> GraphContract:
    """The contract of graph `role` for a model config at an export precision."""
    if role not in BUILDERS:
        raise InputError(f"graph role must be one of {', '.join(BUILDERS)}, got {role!r}")
    if role not in all_roles_of(cfg):
        if cfg.kind == "rmt" and role == DIAGONAL_STEP:
            raise InputError(DIAGONAL_REFUSAL)
        raise InputError(f"an {cfg.kind.upper()} has no {role} graph (its graphs: {', '.join(all_roles_of(cfg))})")
    return BUILDERS[role](cfg, precision)


def model_dims(cfg: ModelConfig) -> dict[str, int]:
    """The fixed sizes the runtimes need (recorded in manifest.json as `dims`)."""
    b, a = cfg.base, cfg.armt
    if cfg.kind == "rmt":
        return {"layers": b.n_layers, "d_model": b.d_model, "vocab_size": b.vocab_size,
                "mem_tokens": a.num_mem_tokens, "segment_size": a.segment_size}
    return {"layers": b.n_layers, "d_model": b.d_model, "d_key": a.d_key, "vocab_size": b.vocab_size,
            "mem_tokens": a.num_mem_tokens, "segment_size": a.segment_size, "d_mem": a.d_mem}

