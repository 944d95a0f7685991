"""Configuration: the memory wrapper's settings and the base model's shape, parsed from HF `config.json`.

Two model kinds (the wrapper around the base model, recorded as "kind" in ``armt_config.json``):
  * ``armt``: the Associative Recurrent Memory Transformer (ArmtConfig; the default: a file without
    "kind" is an ARMT, so model directories and exports written before the kind existed keep loading)
  * ``rmt``: the original Recurrent Memory Transformer (RmtConfig): M memory vectors carried from
    segment to segment, fed as [memory | tokens | memory]

Two supported base families:
  * ``llama``: HF ``LlamaForCausalLM`` (RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP)
  * ``gpt2``: HF ``GPT2LMHeadModel`` (LayerNorm, learned positions, fused c_attn, GELU-tanh MLP)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from graphs.errors import ConfigError

ARCHITECTURES = ("llama", "gpt2")
KINDS = ("armt", "rmt")


@dataclass(frozen=True)
class ArmtConfig:
    """The ARMT wrapper's own settings (``armt_config.json``)."""

    kind: ClassVar[str] = "armt"
    architecture: str
    segment_size: int
    num_mem_tokens: int
    d_mem: int
    nu: int = 3
    correction: bool = True
    wrap_pos: bool = False

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        for name in ("segment_size", "num_mem_tokens", "d_mem", "nu"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.wrap_pos and self.architecture != "gpt2":
            raise ConfigError("wrap_pos applies to GPT-2 (learned positions) only")

    @property
    def d_key(self) -> int:
        """K = 2 * nu * d_mem: the width of the DPFP feature map."""
        return 2 * self.nu * self.d_mem

    def to_dict(self) -> dict[str, Any]:
        """The fields (no "kind": the fingerprint of an ARMT, and so its model id, predates the kind)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ArmtConfig":
        if not isinstance(data, dict):
            raise ConfigError("armt_config.json must hold a JSON object")
        if data.get("kind", cls.kind) != cls.kind:
            raise ConfigError(f"armt_config.json describes kind {data['kind']!r}, not {cls.kind!r}")
        data = {k: v for k, v in data.items() if k != "kind"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"armt_config.json has unknown keys: {', '.join(unknown)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in data)
        if missing:
            raise ConfigError(f"armt_config.json lacks keys: {', '.join(missing)}")
        return cls(**data)


@dataclass(frozen=True)
class RmtConfig:
    """The RMT wrapper's settings (``armt_config.json`` with ``"kind": "rmt"``): the official
    ``RecurrentWrapper(MemoryCell(base, num_mem_tokens, wrap_pos), segment_size=...)``.

    No memory weights and no d_mem: the memory is M vectors of width d, the base model's last hidden
    state (after its final norm) at the M write positions of the previous segment; segment 0 reads
    the learned (M, d) parameter."""

    kind: ClassVar[str] = "rmt"
    architecture: str
    segment_size: int
    num_mem_tokens: int
    wrap_pos: bool = False

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        for name in ("segment_size", "num_mem_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.wrap_pos, bool):
            raise ConfigError(f"wrap_pos must be true or false, got {self.wrap_pos!r}")
        if self.wrap_pos and self.architecture != "gpt2":
            raise ConfigError("wrap_pos applies to GPT-2 (learned positions) only")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RmtConfig":
        if not isinstance(data, dict):
            raise ConfigError("armt_config.json must hold a JSON object")
        if data.get("kind") != cls.kind:
            raise ConfigError(f"armt_config.json describes kind {data.get('kind', 'armt')!r}, not {cls.kind!r}")
        fields = {k: v for k, v in data.items() if k != "kind"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"armt_config.json has keys an RMT does not have: {', '.join(unknown)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in fields)
        if missing:
            raise ConfigError(f"armt_config.json lacks keys: {', '.join(missing)}")
        return cls(**fields)


WrapperConfig = ArmtConfig | RmtConfig
WRAPPER_CONFIGS = {"armt": ArmtConfig, "rmt": RmtConfig}


def wrapper_config_from_dict(data: dict[str, Any]) -> WrapperConfig:
    """ArmtConfig or RmtConfig from an ``armt_config.json`` dict, by its "kind" (absent: armt)."""
    if not isinstance(data, dict):
        raise ConfigError("armt_config.json must hold a JSON object")
    kind = data.get("kind", "armt")
    if kind not in WRAPPER_CONFIGS:
        raise ConfigError(f"armt_config.json kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return WRAPPER_CONFIGS[kind].from_dict(data)


def wrapper_config_file(cfg: WrapperConfig) -> dict[str, Any]:
    """What ``armt_config.json`` holds: the settings with their kind."""
    return {"kind": cfg.kind, **{k: v for k, v in cfg.to_dict().items() if k != "kind"}}


@dataclass(frozen=True)
class BaseSpec:
    """Everything the layer math needs from the base model's HF config."""

    architecture: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    norm_eps: float
    tie_word_embeddings: bool
    # llama
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    attention_bias: bool = False
    mlp_bias: bool = False
    # gpt2
    n_positions: int = 0
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def qkv_width(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim


def _get(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if name in cfg and cfg[name] is not None:
            return cfg[name]
    if default is not None:
        return default
    raise ConfigError(f"config.json lacks {' / '.join(names)}")


def architecture_of(hf_config: dict[str, Any]) -> str:
    """'llama' or 'gpt2' from an HF config's model_type."""
    model_type = hf_config.get("model_type")
    if model_type == "llama":
        return "llama"
    if model_type == "gpt2":
        return "gpt2"
    raise ConfigError(f"unsupported base model_type {model_type!r} (supported: llama, gpt2)")


def parse_base_config(hf_config: dict[str, Any]) -> BaseSpec:
    """Parse an HF `config.json` dict; refuse settings the layer math does not implement."""
    if not isinstance(hf_config, dict):
        raise ConfigError("config.json must hold a JSON object")
    arch = architecture_of(hf_config)
    if arch == "llama":
        d = int(_get(hf_config, "hidden_size"))
        heads = int(_get(hf_config, "num_attention_heads"))
        kv = int(_get(hf_config, "num_key_value_heads", default=heads))
        head_dim = int(hf_config.get("head_dim") or d // heads)
        act = hf_config.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"llama hidden_act {act!r} is not supported (only silu)")
        if heads % kv:
            raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ConfigError(f"rope_type {rope_type!r} is not supported (default, llama3)")
        scaling: tuple[tuple[str, Any], ...] = ()
        if rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            scaling = tuple((k, float(rope[k])) for k in keys)
        return BaseSpec(
            architecture=arch,
            vocab_size=int(_get(hf_config, "vocab_size")),
            d_model=d,
            n_layers=int(_get(hf_config, "num_hidden_layers")),
            n_heads=heads,
            n_kv_heads=kv,
            head_dim=head_dim,
            d_ff=int(_get(hf_config, "intermediate_size")),
            norm_eps=float(_get(hf_config, "rms_norm_eps", default=1e-6)),
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            rope_theta=theta,
            rope_scaling=scaling,
            attention_bias=bool(hf_config.get("attention_bias", False)),
            mlp_bias=bool(hf_config.get("mlp_bias", False)),
            hf_config=dict(hf_config),
        )
    d = int(_get(hf_config, "n_embd", "hidden_size"))
    heads = int(_get(hf_config, "n_head", "num_attention_heads"))
    act = hf_config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"gpt2 activation_function {act!r} is not supported (gelu_new)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf_config.get(flag):
            raise ConfigError(f"gpt2 option {flag} is not supported")
    if hf_config.get("scale_attn_weights") is False:
        raise ConfigError("gpt2 option scale_attn_weights=false is not supported")
    return BaseSpec(
        architecture=arch,
        vocab_size=int(_get(hf_config, "vocab_size")),
        d_model=d,
        n_layers=int(_get(hf_config, "n_layer", "num_hidden_layers")),
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=d // heads,
        d_ff=int(hf_config.get("n_inner") or 4 * d),
        norm_eps=float(_get(hf_config, "layer_norm_epsilon", default=1e-5)),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", True)),
        n_positions=int(_get(hf_config, "n_positions", "max_position_embeddings")),
        hf_config=dict(hf_config),
    )


@dataclass(frozen=True)
class ModelConfig:
    """The pair every component passes around. `armt` holds the wrapper's settings of either kind
    (ArmtConfig or RmtConfig; `kind` says which)."""

    base: BaseSpec
    armt: WrapperConfig

    def __post_init__(self) -> None:
        if self.base.architecture != self.armt.architecture:
            raise ConfigError(f"armt_config architecture {self.armt.architecture!r} does not match "
                              f"the base model ({self.base.architecture!r})")
        if self.base.architecture == "gpt2":
            T, M, P = self.armt.segment_size, self.armt.num_mem_tokens, self.base.n_positions
            if self.kind == "armt" and T + M > P:
                raise ConfigError(f"segment_size + num_mem_tokens = {T + M} exceeds GPT-2 n_positions {P}")
            if self.kind == "rmt" and not self.armt.wrap_pos and T + 2 * M > P:
                raise ConfigError(f"segment_size + 2 * num_mem_tokens = {T + 2 * M} exceeds GPT-2 n_positions "
                                  f"{P} (an RMT segment is [memory | tokens | memory])")
            if self.kind == "rmt" and self.armt.wrap_pos and T > P:
                raise ConfigError(f"segment_size {T} exceeds GPT-2 n_positions {P}")

    @property
    def kind(self) -> str:
        """'armt' or 'rmt'."""
        return self.armt.kind

    @property
    def pos_table_rows(self) -> int:
        """Rows of GPT-2's position table: n_positions, plus M (ARMT) or 2M (RMT) with wrap_pos."""
        extra = self.armt.num_mem_tokens * (2 if self.kind == "rmt" else 1)
        return self.base.n_positions + (extra if self.armt.wrap_pos else 0)

    def fingerprint(self) -> str:
        """A short id of the architecture; state files carry it (with a weights id) to refuse foreign state."""
        blob = json.dumps({"base": self.base.hf_config, "armt": self.armt.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
