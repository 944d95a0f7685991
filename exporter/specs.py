"""The graph contract of docs/architecture.md as data: input/output names, dtypes, shapes per role.

Named dims: "batch" (rows), "width" (token places of a slot), "slot" (= width + M). Everything else
(L, K, d, V) is fixed by the model config. The compute dtype is the export precision's; the memory
state is float32 in every precision; logits and the final hidden are float32 outputs.
"""

from __future__ import annotations

from graphs.config import ModelConfig

from exporter.manifest import ROLES, TensorSpec

COMPUTE_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
TORCH_DTYPE_NAME = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def model_dims(cfg: ModelConfig) -> dict[str, int]:
    """The fixed sizes the runtimes need (recorded in manifest.json as `dims`)."""
    b, a = cfg.base, cfg.armt
    return {"layers": b.n_layers, "d_model": b.d_model, "d_key": a.d_key, "vocab_size": b.vocab_size,
            "mem_tokens": a.num_mem_tokens, "segment_size": a.segment_size, "d_mem": a.d_mem}


def graph_io(cfg: ModelConfig, role: str, precision: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of a graph, in call order."""
    if role not in ROLES:
        raise ValueError(f"unknown graph role {role!r}")
    L, d, K, V = cfg.base.n_layers, cfg.base.d_model, cfg.armt.d_key, cfg.base.vocab_size
    cd = COMPUTE_DTYPE[precision]
    state_in = (TensorSpec("A_in", "float32", (L, "batch", K, d)), TensorSpec("z_in", "float32", (L, "batch", K)),
                TensorSpec("written_in", "bool", (L, "batch")))
    state_out = (TensorSpec("A_out", "float32", (L, "batch", K, d)), TensorSpec("z_out", "float32", (L, "batch", K)),
                 TensorSpec("written_out", "bool", (L, "batch")))
    head = (TensorSpec("logits", "float32", ("batch", "width", V)), TensorSpec("hidden", "float32", ("batch", "width", d)))
    if role == "segment":
        inputs = (TensorSpec("input_ids", "int64", ("batch", "width")),
                  TensorSpec("positions", "int64", ("batch", "slot")),
                  TensorSpec("key_valid", "bool", ("batch", "slot")),
                  TensorSpec("write", "bool", ("batch",)), *state_in)
        return inputs, (*head, *state_out)
    inputs = (TensorSpec("input_ids", "int64", ("batch", "width")),
              TensorSpec("hidden_in", cd, (L, "batch", "slot", d)),
              TensorSpec("positions", "int64", (L, "batch", "slot")),
              TensorSpec("key_valid", "bool", (L, "batch", "slot")),
              TensorSpec("active", "bool", (L,)),
              TensorSpec("write", "bool", (L, "batch")), *state_in)
    return inputs, (TensorSpec("hidden_out", cd, (L, "batch", "slot", d)), *head, *state_out)


def tensor_kind(name: str) -> str:
    """The bounds-table kind of a graph output: logits, hidden, hidden_out, A, z, written."""
    return {"A_out": "A", "z_out": "z", "written_out": "written"}.get(name, name)


def output_mask(role: str, name: str, feeds: dict, width: int | None = None):
    """Which entries of output `name` carry meaning for the call fed `feeds` (numpy bool, broadcastable
    to the output), or None for "all of them". Everything else is computed but unused by any schedule:

      logits, hidden   real token places only (padding places and rows with no tokens are junk;
                       for the diagonal step also nothing when the last layer is idle)
      hidden_out       active layers, rows that hold tokens in that layer's segment, real places
                       and memory tokens (an ended row's slot is never read again)
      A, z, written    everything (rows that do not write must keep their state bit for bit)
    """
    import numpy as np

    def arr(x):
        return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)

    kv = arr(feeds["key_valid"]).astype(bool)
    W = width if width is not None else arr(feeds["input_ids"]).shape[-1]
    if name in ("logits", "hidden"):
        if role == "segment":
            return kv[:, :W, None]  # (B, W, 1)
        active = arr(feeds["active"]).astype(bool)
        write = arr(feeds["write"]).astype(bool)
        return (kv[-1, :, :W] & write[-1][:, None] & active[-1])[:, :, None]  # (B, W, 1)
    if name == "hidden_out":
        active = arr(feeds["active"]).astype(bool)
        write = arr(feeds["write"]).astype(bool)
        return (kv & write[:, :, None] & active[:, None, None])[..., None]  # (L, B, P, 1)
    return None
