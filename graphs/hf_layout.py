"""Tensor names on disk <-> the model's stacked parameters.

On disk (``model.safetensors`` of a model directory) the base model keeps its HF names
(``model.layers.3.self_attn.q_proj.weight``, ``transformer.h.0.attn.c_attn.weight``, ...), so the
base weights stay loadable by transformers; the ARMT's own tensors live under ``armt.``:

    armt.memory                      (M, d)       memory token embeddings
    armt.layers.{i}.W_mq.weight      (d_mem, d)   torch Linear layout (y = x W^T + b)
    armt.layers.{i}.W_mk.weight      (d_mem, d)
    armt.layers.{i}.W_mv.weight      (d, d)
    armt.layers.{i}.W_mb.weight      (1, d)
    armt.layers.{i}.W_mb.bias        (1,)

An RMT (graphs/rmt.py) has no memory weights: its one own tensor is

    rmt.memory                       (M, d)       the learned initial memory (read by segment 0)
"""

from __future__ import annotations

import torch

from graphs.config import ModelConfig
from graphs.errors import CheckpointError

MEMORY_KEYS = {"W_mq.weight": "w_q", "W_mk.weight": "w_k", "W_mv.weight": "w_v", "W_mb.weight": "w_b",
               "W_mb.bias": "b_b"}
# buffers some HF versions put into GPT-2 state dicts; they carry no weights
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def layers_path(arch: str) -> str:
    return "model.layers" if arch == "llama" else "transformer.h"


def _llama_layer_keys(i: int, cfg: ModelConfig) -> dict[str, str]:
    b, p = cfg.base, f"model.layers.{i}."
    keys = {"attn_norm": p + "input_layernorm.weight", "mlp_norm": p + "post_attention_layernorm.weight",
            "q": p + "self_attn.q_proj.weight", "k": p + "self_attn.k_proj.weight",
            "v": p + "self_attn.v_proj.weight", "o": p + "self_attn.o_proj.weight",
            "gate": p + "mlp.gate_proj.weight", "up": p + "mlp.up_proj.weight", "down": p + "mlp.down_proj.weight"}
    if b.attention_bias:
        keys.update(q_b=p + "self_attn.q_proj.bias", k_b=p + "self_attn.k_proj.bias",
                    v_b=p + "self_attn.v_proj.bias", o_b=p + "self_attn.o_proj.bias")
    if b.mlp_bias:
        keys.update(gate_b=p + "mlp.gate_proj.bias", up_b=p + "mlp.up_proj.bias", down_b=p + "mlp.down_proj.bias")
    return keys


def _gpt2_layer_keys(i: int) -> dict[str, str]:
    p = f"transformer.h.{i}."
    names = {"ln1_w": "ln_1.weight", "ln1_b": "ln_1.bias", "qkv": "attn.c_attn.weight",
             "qkv_bias": "attn.c_attn.bias", "o": "attn.c_proj.weight", "o_bias": "attn.c_proj.bias",
             "ln2_w": "ln_2.weight", "ln2_b": "ln_2.bias", "fc": "mlp.c_fc.weight", "fc_bias": "mlp.c_fc.bias",
             "proj": "mlp.c_proj.weight", "proj_bias": "mlp.c_proj.bias"}
    return {k: p + v for k, v in names.items()}


def _global_keys(cfg: ModelConfig) -> dict[str, str]:
    b = cfg.base
    if b.architecture == "llama":
        keys = {"embed": "model.embed_tokens.weight", "final_norm_w": "model.norm.weight"}
    else:
        keys = {"embed": "transformer.wte.weight", "pos_embed": "transformer.wpe.weight",
                "final_norm_w": "transformer.ln_f.weight", "final_norm_b": "transformer.ln_f.bias"}
    if not b.tie_word_embeddings:
        keys["lm_head"] = "lm_head.weight"
    keys["memory"] = "rmt.memory" if cfg.kind == "rmt" else "armt.memory"
    return keys


def _memory_keys(i: int) -> dict[str, str]:
    return {ours: f"armt.layers.{i}.{theirs}" for theirs, ours in MEMORY_KEYS.items()}


def is_memory_weight(name: str) -> bool:
    """An ARMT memory weight (armt.layers.{i}.W_m*): kept fp32 whatever the base weights' dtype."""
    return name.startswith("armt.layers.")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def stored_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype a model keeps from its tensors: that of the base weights (and memory tokens) when they
    share one of fp32 / fp16 / bf16, else fp32. The ARMT memory weights do not count (always fp32)."""
    kinds = {t.dtype for k, t in tensors.items()
             if t.is_floating_point() and not is_memory_weight(k) and not k.endswith(IGNORED_SUFFIXES)}
    return kinds.pop() if len(kinds) == 1 and next(iter(kinds)) in FLOAT_DTYPES else torch.float32


class _Reader:
    """Takes tensors out of a state dict by name, checking shapes; reports leftovers. Tensors it
    handed out are released (graphs/tensorfile.release) once their values were copied."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.misshaped: list[str] = []
        self.taken: list[torch.Tensor] = []

    def take(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        if key not in self.tensors:
            self.missing.append(key)
            return None
        self.used.add(key)
        t = self.tensors[key]
        if tuple(t.shape) != tuple(shape):
            self.misshaped.append(f"{key} {tuple(t.shape)} (expected {tuple(shape)})")
            return None
        self.taken.append(t)
        return t.to(dtype)

    def release_taken(self) -> None:
        from graphs.tensorfile import release
        for t in self.taken:
            release(t)
        self.taken.clear()

    def finish(self, source: str) -> None:
        unexpected = sorted(k for k in self.tensors if k not in self.used and not k.endswith(IGNORED_SUFFIXES))
        problems = []
        if self.missing:
            problems.append("missing " + ", ".join(self.missing[:5]) + (" ..." if len(self.missing) > 5 else ""))
        if self.misshaped:
            problems.append("mis-shaped " + ", ".join(self.misshaped[:5]))
        if unexpected:
            problems.append("unexpected " + ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else ""))
        if problems:
            raise CheckpointError(f"{source}: " + "; ".join(problems))


class _Stacks:
    """Stacked (L, ...) parameters, allocated once and filled layer by layer (no list of copies to
    stack at the end, so loading needs one copy of the weights, not two)."""

    def __init__(self, L: int, dtype: torch.dtype):
        self.L, self.dtype, self.out = L, dtype, {}

    def put(self, name: str, i: int, parts: list[torch.Tensor], dim: int = 0, transpose: bool = False) -> None:
        """Layer i of `name`: `parts` concatenated along `dim` (then transposed when asked), copied in place."""
        rows = sum(p.shape[dim] for p in parts)
        shape = list(parts[0].shape)
        shape[dim] = rows
        if transpose:
            shape = shape[::-1]
        if name not in self.out:
            self.out[name] = torch.empty((self.L, *shape), dtype=self.dtype)
        target = self.out[name][i]
        at = 0
        for p in parts:
            n = p.shape[dim]
            if transpose:  # rows of the part become columns of the target
                target[:, at:at + n].copy_(p.t())
            else:
                target.narrow(dim, at, n).copy_(p)
            at += n


def params_from_hf(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: str = "checkpoint",
                   dtype: torch.dtype | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """HF-named tensors (+ armt.*) -> {'globals': ..., 'layers': ..., 'mem': ...} stacked; base weights
    and memory tokens in `dtype` (default: `stored_dtype(tensors)`), the memory weights in fp32.
    Every returned tensor is a fresh allocation (none is a view of `tensors`)."""
    b, a = cfg.base, cfg.armt
    d, L = b.d_model, b.n_layers
    dtype = dtype or stored_dtype(tensors)
    r = _Reader(tensors)
    if b.tie_word_embeddings and "lm_head.weight" in tensors:
        r.used.add("lm_head.weight")  # a tied copy; the embedding is used
    shapes = {"embed": (b.vocab_size, d), "pos_embed": (cfg.pos_table_rows, d), "final_norm_w": (d,),
              "final_norm_b": (d,), "lm_head": (b.vocab_size, d), "memory": (a.num_mem_tokens, d)}
    glob = {}
    for ours, key in _global_keys(cfg).items():
        t = r.take(key, shapes[ours], dtype)
        if t is not None:
            glob[ours] = t.t().contiguous() if ours == "lm_head" else t.clone(memory_format=torch.contiguous_format)
        r.release_taken()
    layers = _Stacks(L, dtype)
    mem = _Stacks(L, torch.float32)
    hq, hkv = b.n_heads * b.head_dim, b.n_kv_heads * b.head_dim
    for i in range(L):
        if b.architecture == "llama":
            k = _llama_layer_keys(i, cfg)
            F_ = b.d_ff
            w = {n: r.take(k[n], s, dtype) for n, s in (("q", (hq, d)), ("k", (hkv, d)), ("v", (hkv, d)),
                                                         ("o", (d, hq)), ("gate", (F_, d)), ("up", (F_, d)),
                                                         ("down", (d, F_)), ("attn_norm", (d,)), ("mlp_norm", (d,)))}
            if b.attention_bias:
                w.update({n: r.take(k[n], s, dtype) for n, s in (("q_b", (hq,)), ("k_b", (hkv,)), ("v_b", (hkv,)),
                                                                 ("o_b", (d,)))})
            if b.mlp_bias:
                w.update({n: r.take(k[n], s, dtype) for n, s in (("gate_b", (F_,)), ("up_b", (F_,)),
                                                                 ("down_b", (d,)))})
            if all(v is not None for v in w.values()):
                layers.put("attn_norm", i, [w["attn_norm"]])
                layers.put("mlp_norm", i, [w["mlp_norm"]])
                layers.put("qkv", i, [w["q"], w["k"], w["v"]], transpose=True)
                layers.put("o", i, [w["o"]], transpose=True)
                layers.put("gate_up", i, [w["gate"], w["up"]], transpose=True)
                layers.put("down", i, [w["down"]], transpose=True)
                if b.attention_bias:
                    layers.put("qkv_bias", i, [w["q_b"], w["k_b"], w["v_b"]])
                    layers.put("o_bias", i, [w["o_b"]])
                if b.mlp_bias:
                    layers.put("gate_up_bias", i, [w["gate_b"], w["up_b"]])
                    layers.put("down_bias", i, [w["down_b"]])
        else:
            k = _gpt2_layer_keys(i)
            F_ = b.d_ff
            shapes_l = {"ln1_w": (d,), "ln1_b": (d,), "qkv": (d, 3 * d), "qkv_bias": (3 * d,), "o": (d, d),
                        "o_bias": (d,), "ln2_w": (d,), "ln2_b": (d,), "fc": (d, F_), "fc_bias": (F_,),
                        "proj": (F_, d), "proj_bias": (d,)}
            layer = {n: r.take(k[n], s, dtype) for n, s in shapes_l.items()}  # Conv1D weights are already (in, out)
            if all(v is not None for v in layer.values()):
                for n, t in layer.items():
                    layers.put(n, i, [t])
        # an incomplete layer is reported by the reader; its memory tensors are still taken (so they
        # are not also reported as unexpected)
        if cfg.kind != "rmt":  # an RMT has no memory weights per layer
            mshapes = {"w_q": (a.d_mem, d), "w_k": (a.d_mem, d), "w_v": (d, d), "w_b": (1, d), "b_b": (1,)}
            for ours, key in _memory_keys(i).items():
                t = r.take(key, mshapes[ours], torch.float32)
                if t is not None:
                    mem.put(ours, i, [t], transpose=ours != "b_b")
        r.release_taken()
    r.finish(source)
    return {"globals": glob, "layers": layers.out, "mem": mem.out}


def base_dtype(model) -> torch.dtype:
    """The dtype a model's base weights and memory tokens are stored in: theirs when they share one of
    fp32 / fp16 / bf16, else fp32 (what `stored_dtype` loads such a file as)."""
    base = [*model.globals.values(), *model.layers.values()]
    kinds = {p.dtype for p in base}
    return base[0].dtype if len(kinds) == 1 and base[0].dtype in FLOAT_DTYPES else torch.float32


def hf_tensors(model) -> dict[str, torch.Tensor]:
    """The reverse of params_from_hf, as views: HF-named tensors of the model's parameters in their own
    dtype (the base weights and memory tokens in the model's, the memory weights fp32), transposed
    or sliced views where the layout differs (graphs/tensorfile.write_dir makes each contiguous only
    while writing it). A model whose globals and layers differ in dtype is written fp32 (what
    `stored_dtype` would load it as)."""
    cfg: ModelConfig = model.cfg
    b = cfg.base
    out: dict[str, torch.Tensor] = {}
    dtype = base_dtype(model)
    g = {k: v.detach().to(dtype) for k, v in model.globals.items()}
    for ours, key in _global_keys(cfg).items():
        out[key] = g[ours].t() if ours == "lm_head" else g[ours]
    lay = {k: v.detach().to(dtype) for k, v in model.layers.items()}
    mem = {k: v.detach().float() for k, v in model.mem.items()} if cfg.kind == "armt" else {}
    hq, hkv, F_ = b.n_heads * b.head_dim, b.n_kv_heads * b.head_dim, b.d_ff
    for i in range(b.n_layers):
        if b.architecture == "llama":
            k = _llama_layer_keys(i, cfg)
            qkv = lay["qkv"][i].t()
            out[k["q"]], out[k["k"]], out[k["v"]] = qkv[:hq], qkv[hq:hq + hkv], qkv[hq + hkv:]
            out[k["o"]] = lay["o"][i].t()
            gu = lay["gate_up"][i].t()
            out[k["gate"]], out[k["up"]] = gu[:F_], gu[F_:]
            out[k["down"]] = lay["down"][i].t()
            out[k["attn_norm"]], out[k["mlp_norm"]] = lay["attn_norm"][i], lay["mlp_norm"][i]
            if b.attention_bias:
                qb = lay["qkv_bias"][i]
                out[k["q_b"]], out[k["k_b"]], out[k["v_b"]] = qb[:hq], qb[hq:hq + hkv], qb[hq + hkv:]
                out[k["o_b"]] = lay["o_bias"][i]
            if b.mlp_bias:
                gb = lay["gate_up_bias"][i]
                out[k["gate_b"]], out[k["up_b"]] = gb[:F_], gb[F_:]
                out[k["down_b"]] = lay["down_bias"][i]
        else:
            for ours, key in _gpt2_layer_keys(i).items():
                out[key] = lay[ours][i]
        for ours, key in (_memory_keys(i) if mem else {}).items():
            out[key] = mem[ours][i] if ours == "b_b" else mem[ours][i].t()
    return out


def hf_from_params(model) -> dict[str, torch.Tensor]:
    """hf_tensors as contiguous copies (for safetensors.torch.save_file and transformers)."""
    return {k: v.contiguous().clone() for k, v in hf_tensors(model).items()}
