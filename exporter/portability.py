"""Portable graphs: only standard ONNX ops that ONNX Runtime and TensorRT both parse.

The allow-list holds the default-domain ops the ARMT graphs need (plus a few harmless neighbours).
Refused on purpose: any non-default domain (com.microsoft fusions), data-dependent shapes (NonZero,
Unique, NonMaxSuppression, control flow), Attention, RMSNormalization and RotaryEmbedding in fp32
graphs (TensorRT does not build fp32 Attention; fp16/bf16 graphs at opset 23 hold them on purpose),
a RotaryEmbedding with a position_ids input (a cos cache indexed by position: the batch-1 cos cache
trap of the dynamo optimizer's own fusion; ours take each row's cos/sin), and local functions.
"""

from __future__ import annotations

from collections import Counter

import onnx

from graphs.errors import ExportError

ALLOWED_OPS = frozenset({
    # arithmetic and activations
    "Add", "Sub", "Mul", "Div", "Neg", "Pow", "Sqrt", "Reciprocal", "Abs", "Exp", "Log", "Tanh", "Erf",
    "Relu", "Sigmoid", "Softmax", "Cos", "Sin", "Clip", "Min", "Max",
    # linear algebra and reductions
    "MatMul", "Gemm", "ReduceMean", "ReduceSum", "ReduceMax", "LayerNormalization",
    # logic and selection
    "Where", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Not",
    # data movement and shapes (static rank, shape-dependent only)
    "Cast", "Reshape", "Transpose", "Slice", "Concat", "Split", "Gather", "GatherND", "GatherElements",
    "Unsqueeze", "Squeeze", "Expand", "Tile", "Shape", "Range", "Constant", "ConstantOfShape", "Identity",
    # the decode graphs' KV-cache write (new keys/values into the fixed-capacity cache, static shapes;
    # TensorRT parses it as an element-mode IScatterLayer)
    "ScatterElements",
})

# named in error messages: why these would be refused even if someone widened the list
KNOWN_TRAPS = {
    "NonZero": "data-dependent output shape",
    "Unique": "data-dependent output shape",
    "Loop": "control flow", "If": "control flow", "Scan": "control flow",
    "RotaryEmbedding": "fused rotary is for fp16/bf16 graphs at opset 23, with each row's cos/sin (no position_ids)",
    "Attention": "the ONNX Attention op does not build in fp32 on TensorRT",
}


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """op type -> node count (domain-qualified when not the default domain)."""
    c = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph.node)
    return dict(sorted(c.items()))


def attention_variant(model: onnx.ModelProto) -> str:
    """How the graph's Attention nodes mask: "causal" (every one is_causal=1 with no mask input),
    "masked" (every one takes a mask, is_causal 0), "mixed", or "" (no Attention node)."""
    kinds = set()
    for n in model.graph.node:
        if n.op_type == "Attention" and n.domain in ("", "ai.onnx"):
            causal = any(a.name == "is_causal" and a.i == 1 for a in n.attribute)
            has_mask = len(n.input) > 3 and n.input[3] != ""
            kinds.add("causal" if causal and not has_mask else "masked" if has_mask and not causal else "mixed")
    return kinds.pop() if len(kinds) == 1 else "mixed" if kinds else ""


FUSED_ALLOWED_OPS = frozenset({"Attention", "RMSNormalization", "RotaryEmbedding"})  # fp16/bf16, opset 23 (exporter/trace.py)


def check_portable(model: onnx.ModelProto, role: str, fused: bool = False) -> None:
    """Raise ExportError naming the first node that is not portable. `fused`: an fp16/bf16 opset-23
    graph, which may also hold FUSED_ALLOWED_OPS (never in fp32: TensorRT does not build them)."""
    allowed = ALLOWED_OPS | FUSED_ALLOWED_OPS if fused else ALLOWED_OPS
    if len(model.functions):
        raise ExportError(f"{role} graph holds local functions ({model.functions[0].name}); inline them first")
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise ExportError(f"{role} graph node {node.name} uses op {node.domain}::{node.op_type}: only standard "
                              "ONNX ops are portable to both ONNX Runtime and TensorRT")
        if node.op_type not in allowed:
            why = KNOWN_TRAPS.get(node.op_type, "not on the exporter's allow-list of portable ops")
            raise ExportError(f"{role} graph node {node.name} uses op {node.op_type}: {why}")
        if node.op_type == "RotaryEmbedding" and len(node.input) > 3 and node.input[3]:
            raise ExportError(f"{role} graph node {node.name} uses RotaryEmbedding with position_ids: a cos/sin "
                              "cache indexed by position breaks at batch > 1 (the batch-1 cache trap)")
    for imp in model.opset_import:
        if imp.domain not in ("", "ai.onnx"):
            raise ExportError(f"{role} graph imports opset domain {imp.domain!r}; only the default domain is portable")
