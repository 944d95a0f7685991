"""Which ONNX layout of one LLaMA layer runs fastest on ONNX Runtime: a diagnostic microbench.

    python -m armt.bench.layer_variants [--device cuda] [--precision fp16|bf16] [--small] [--out F.json]

One diagonal step's LLaMA layer with the layer axis folded into the batch (L layers x R rows, the
LLaMA-1B shape by default: L 16, R 1152, d 2048, 32/8 heads of 64, FFN 8192), built directly with
onnx.helper (no tracing), weights as bound inputs (one device copy shared by every variant), causal
attention, and the memory read's fp32 product. Variants:

    split4d   one qkv / gate_up MatMul + Split, heads transposed to 4-D, rotary written out
              (Slice, Neg, Concat, Mul, Add): the layout the exporter writes today
    sep4d     q, k, v, gate, up as separate MatMuls (no Split), 4-D heads, RotaryEmbedding op
    sep3d     separate MatMuls, RotaryEmbedding and Attention on 3-D (L, R, heads*hd) tensors with
              num_heads attributes: no head transposes in the graph at all
    split3d   one qkv / gate_up MatMul + Split, then the 3-D ops of sep3d
    mem_*     the memory read's (L, 1, R, K) x (L, 1, K, d) product: fp32 (TF32 option on / off),
              3-D (L, R, K) x (L, K, d), and in the compute dtype

Every variant's output is compared with a torch fp32 computation of the same layer (max relative
error printed). `--small` shrinks every size so the script runs on ONNX Runtime CPU (a check of the
graphs, not a timing). A diagnostic for docs/performance.md, not part of `armt`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

OPSET = 23
ELEM = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16, "fp32": TensorProto.FLOAT}
TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Shape:
    def __init__(self, small: bool):
        if small:
            self.L, self.R, self.d, self.Hq, self.Hkv, self.hd, self.F, self.K = 2, 48, 64, 4, 2, 16, 128, 24
        else:
            self.L, self.R, self.d, self.Hq, self.Hkv, self.hd, self.F, self.K = 16, 1152, 2048, 32, 8, 64, 8192, 384


class Builder:
    """A tiny onnx.helper wrapper: nodes with fresh output names."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        names = [f"t{self.n}_{i}" for i in range(outputs)]
        self.n += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, values, dtype=np.int64) -> str:
        name = f"c{len(self.inits)}"
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name


def rms(b: Builder, x: str, w: str) -> str:
    return b.op("RMSNormalization", x, w, axis=-1, epsilon=1e-5)


def rotate_written(b: Builder, x: str, cos: str, sin: str, hd: int) -> str:
    """x (L, H, R, hd) -> x cos + rotate_half(x) sin, as primitive ops (cos/sin (L, 1, R, hd))."""
    half = hd // 2
    lo = b.op("Slice", x, b.const([0]), b.const([half]), b.const([-1]))
    hi = b.op("Slice", x, b.const([half]), b.const([hd]), b.const([-1]))
    rot = b.op("Concat", b.op("Neg", hi), lo, axis=-1)
    return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rot, sin))


def heads4d(b: Builder, x: str, s: Shape, heads: int) -> str:
    """(L, R, heads*hd) -> (L, heads, R, hd)."""
    return b.op("Transpose", b.op("Reshape", x, b.const([s.L, s.R, heads, s.hd])), perm=[0, 2, 1, 3])


def build_layer(variant: str, s: Shape, elem: int) -> onnx.ModelProto:
    b = Builder()
    split_qkv = variant.startswith("split")
    three_d = variant.endswith("3d")
    x = "x"
    h = rms(b, x, "attn_norm")
    if split_qkv:
        q, k, v = b.op("Split", b.op("MatMul", h, "w_qkv"), b.const([s.Hq * s.hd, s.Hkv * s.hd, s.Hkv * s.hd]),
                       outputs=3, axis=-1)
    else:
        q, k, v = (b.op("MatMul", h, w) for w in ("w_q", "w_k", "w_v"))
    if three_d:
        q = b.op("RotaryEmbedding", q, "cos_half", "sin_half", num_heads=s.Hq)
        k = b.op("RotaryEmbedding", k, "cos_half", "sin_half", num_heads=s.Hkv)
        a = b.op("Attention", q, k, v, is_causal=1, q_num_heads=s.Hq, kv_num_heads=s.Hkv,
                 scale=1.0 / math.sqrt(s.hd))  # (L, R, Hq hd)
    else:
        q4, k4, v4 = heads4d(b, q, s, s.Hq), heads4d(b, k, s, s.Hkv), heads4d(b, v, s, s.Hkv)
        if variant == "split4d":
            q4 = rotate_written(b, q4, "cos_full", "sin_full", s.hd)
            k4 = rotate_written(b, k4, "cos_full", "sin_full", s.hd)
        else:
            q4 = b.op("RotaryEmbedding", q4, "cos_half", "sin_half")
            k4 = b.op("RotaryEmbedding", k4, "cos_half", "sin_half")
        a4 = b.op("Attention", q4, k4, v4, is_causal=1, scale=1.0 / math.sqrt(s.hd))  # (L, Hq, R, hd)
        a = b.op("Reshape", b.op("Transpose", a4, perm=[0, 2, 1, 3]), b.const([s.L, s.R, s.Hq * s.hd]))
    x = b.op("Add", x, b.op("MatMul", a, "w_o"))
    h = rms(b, x, "mlp_norm")
    if split_qkv:
        gate, up = b.op("Split", b.op("MatMul", h, "w_gate_up"), b.const([s.F, s.F]), outputs=2, axis=-1)
    else:
        gate, up = b.op("MatMul", h, "w_gate"), b.op("MatMul", h, "w_up")
    act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)
    b.nodes.append(helper.make_node("Add", [x, b.op("MatMul", act, "w_down")], ["y"]))

    def t(name, shape, e=elem):
        return helper.make_tensor_value_info(name, e, shape)

    L, R, d = s.L, s.R, s.d
    inputs = [t("x", [L, R, d]), t("attn_norm", [d]), t("mlp_norm", [d]), t("w_o", [L, s.Hq * s.hd, d]),
              t("w_down", [L, s.F, d])]
    inputs += ([t("w_qkv", [L, d, (s.Hq + 2 * s.Hkv) * s.hd]), t("w_gate_up", [L, d, 2 * s.F])] if split_qkv else
               [t("w_q", [L, d, s.Hq * s.hd]), t("w_k", [L, d, s.Hkv * s.hd]), t("w_v", [L, d, s.Hkv * s.hd]),
                t("w_gate", [L, d, s.F]), t("w_up", [L, d, s.F])])
    inputs += [t("cos_full", [L, 1, R, s.hd]), t("sin_full", [L, 1, R, s.hd])] if variant == "split4d" else \
              [t("cos_half", [L, R, s.hd // 2]), t("sin_half", [L, R, s.hd // 2])]
    graph = helper.make_graph(b.nodes, variant, inputs, [t("y", [L, R, d])], initializer=b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=11)


def build_mem(variant: str, s: Shape, elem: int) -> onnx.ModelProto:
    """The memory read's product num = qs A: fp32 4-D / 3-D, or in the compute dtype."""
    b = Builder()
    L, R, K, d = s.L, s.R, s.K, s.d
    f32 = TensorProto.FLOAT
    if variant == "mem_f32_3d":
        ins = [helper.make_tensor_value_info("qs", f32, [L, R, K]), helper.make_tensor_value_info("A", f32, [L, K, d])]
        y = b.op("MatMul", "qs", "A")
    elif variant == "mem_lowp":
        ins = [helper.make_tensor_value_info("qs", f32, [L, 1, R, K]), helper.make_tensor_value_info("A", f32, [L, 1, K, d])]
        y = b.op("MatMul", b.op("Cast", "qs", to=elem), b.op("Cast", "A", to=elem))
    else:  # mem_f32 (today's shape)
        ins = [helper.make_tensor_value_info("qs", f32, [L, 1, R, K]), helper.make_tensor_value_info("A", f32, [L, 1, K, d])]
        y = b.op("MatMul", "qs", "A")
    out_elem = elem if variant == "mem_lowp" else f32
    out_shape = [L, R, d] if variant == "mem_f32_3d" else [L, 1, R, d]
    b.nodes.append(helper.make_node("Identity", [y], ["y"]))
    graph = helper.make_graph(b.nodes, variant, ins, [helper.make_tensor_value_info("y", out_elem, out_shape)],
                              initializer=b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=11)


def layer_tensors(s: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L, R, d = s.L, s.R, s.d

    def w(*shape):
        return (torch.randn(*shape, generator=g) / math.sqrt(shape[-2])).to(dtype)

    t = {"x": torch.randn(L, R, d, generator=g).to(dtype), "attn_norm": (1 + 0.1 * torch.randn(d, generator=g)).to(dtype),
         "mlp_norm": (1 + 0.1 * torch.randn(d, generator=g)).to(dtype),
         "w_q": w(L, d, s.Hq * s.hd), "w_k": w(L, d, s.Hkv * s.hd), "w_v": w(L, d, s.Hkv * s.hd),
         "w_o": w(L, s.Hq * s.hd, d), "w_gate": w(L, d, s.F), "w_up": w(L, d, s.F), "w_down": w(L, s.F, d)}
    t["w_qkv"] = torch.cat([t["w_q"], t["w_k"], t["w_v"]], -1)
    t["w_gate_up"] = torch.cat([t["w_gate"], t["w_up"]], -1)
    inv = 1.0 / (500000.0 ** (torch.arange(0, s.hd, 2).float() / s.hd))
    pos = torch.arange(s.R).float()
    freqs = pos[:, None] * inv  # (R, hd/2)
    t["cos_half"] = freqs.cos().expand(L, R, s.hd // 2).contiguous().to(dtype)
    t["sin_half"] = freqs.sin().expand(L, R, s.hd // 2).contiguous().to(dtype)
    full = torch.cat([freqs, freqs], -1)
    t["cos_full"] = full.cos().expand(L, 1, R, s.hd).contiguous().to(dtype)
    t["sin_full"] = full.sin().expand(L, 1, R, s.hd).contiguous().to(dtype)
    t["qs"] = (torch.rand(L, 1, R, s.K, generator=g) * 1e-2)
    t["A"] = torch.randn(L, 1, s.K, d, generator=g)
    return {k: v.to(device) for k, v in t.items()}


def torch_layer(t: dict[str, torch.Tensor], s: Shape) -> torch.Tensor:
    """The same layer in fp32 torch: the reference every variant is compared with."""
    f = {k: v.float() for k, v in t.items()}

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def rope(x):  # (L, H, R, hd)
        half = s.hd // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * f["cos_full"] + rot * f["sin_full"]

    x = f["x"]
    h = norm(x, f["attn_norm"])
    q = (h @ f["w_q"]).view(s.L, s.R, s.Hq, s.hd).transpose(1, 2)
    k = (h @ f["w_k"]).view(s.L, s.R, s.Hkv, s.hd).transpose(1, 2)
    v = (h @ f["w_v"]).view(s.L, s.R, s.Hkv, s.hd).transpose(1, 2)
    q, k = rope(q), rope(k)
    rep = s.Hq // s.Hkv
    a = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                         is_causal=True)
    x = x + a.transpose(1, 2).reshape(s.L, s.R, -1) @ f["w_o"]
    h = norm(x, f["mlp_norm"])
    g = h @ f["w_gate"]
    return x + (torch.nn.functional.silu(g) * (h @ f["w_up"])) @ f["w_down"]


def run_variant(ort, model: onnx.ModelProto, tensors: dict[str, torch.Tensor], out: torch.Tensor, device: str,
                tf32: bool, iters: int) -> float:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    providers = ([("CUDAExecutionProvider", {"use_tf32": "1" if tf32 else "0"})] if device == "cuda"
                 else ["CPUExecutionProvider"])
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=providers)
    io = sess.io_binding()
    elem_of = {torch.float16: 10, torch.bfloat16: 16, torch.float32: 1}
    kind, dev_id = ("cuda", 0) if device == "cuda" else ("cpu", 0)
    for i in sess.get_inputs():
        x = tensors[i.name]
        io.bind_input(i.name, kind, dev_id, elem_of[x.dtype], list(x.shape), x.data_ptr())
    io.bind_output("y", kind, dev_id, elem_of[out.dtype], list(out.shape), out.data_ptr())
    for _ in range(3):
        sess.run_with_iobinding(io)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        sess.run_with_iobinding(io)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def torch_time(fn, device: str, iters: int) -> float:
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def torch_fast_layer(t: dict[str, torch.Tensor], s: Shape):
    """The same layer the way the torch fast executor runs it (bmm, SDPA, compute dtype): the target."""
    def fn():
        x = t["x"]
        h = torch.nn.functional.rms_norm(x, (s.d,), t["attn_norm"], 1e-5)
        qkv = torch.bmm(h, t["w_qkv"])
        q, k, v = qkv.split([s.Hq * s.hd, s.Hkv * s.hd, s.Hkv * s.hd], -1)
        q = q.view(s.L, s.R, s.Hq, s.hd).transpose(1, 2)
        k = k.view(s.L, s.R, s.Hkv, s.hd).transpose(1, 2)
        v = v.view(s.L, s.R, s.Hkv, s.hd).transpose(1, 2)
        half = s.hd // 2
        q = q * t["cos_full"] + torch.cat([-q[..., half:], q[..., :half]], -1) * t["sin_full"]
        k = k * t["cos_full"] + torch.cat([-k[..., half:], k[..., :half]], -1) * t["sin_full"]
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + torch.bmm(a.transpose(1, 2).reshape(s.L, s.R, -1), t["w_o"])
        h = torch.nn.functional.rms_norm(x, (s.d,), t["mlp_norm"], 1e-5)
        g, u = torch.bmm(h, t["w_gate_up"]).chunk(2, -1)
        return x + torch.bmm(torch.nn.functional.silu(g) * u, t["w_down"])
    return fn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import onnxruntime as ort

    s = Shape(args.small)
    dev = args.device
    dtype = TORCH[args.precision]
    t = layer_tensors(s, dtype, dev)
    ref = torch_layer(t, s)
    result = {"device": dev, "precision": args.precision, "small": args.small, "onnxruntime": ort.__version__,
              "shape": vars(s), "layer_ms": {}, "layer_rel": {}, "mem_ms": {}, "mem_rel": {}}
    for variant in ("split4d", "sep4d", "sep3d", "split3d"):
        out = torch.empty(s.L, s.R, s.d, dtype=dtype, device=dev)
        try:
            ms = run_variant(ort, build_layer(variant, s, ELEM[args.precision]), t, out, dev, True, args.iters)
        except Exception as exc:  # a variant the provider cannot run: recorded, the others go on
            result["layer_ms"][variant] = f"failed: {str(exc).splitlines()[0][:200]}"
            print(f"{variant:10s} failed: {str(exc).splitlines()[0][:200]}")
            continue
        rel = float(((out.float() - ref).abs().max() / ref.abs().max()).item())
        result["layer_ms"][variant], result["layer_rel"][variant] = ms, rel
        print(f"{variant:10s} {ms:8.3f} ms/layer-step   rel err vs fp32 torch {rel:.2e}")
    fast = torch_fast_layer(t, s)
    rel = float(((fast().float() - ref).abs().max() / ref.abs().max()).item())
    result["layer_ms"]["torch_bmm_sdpa"] = torch_time(fast, dev, args.iters)
    result["layer_rel"]["torch_bmm_sdpa"] = rel
    print(f"{'torch':10s} {result['layer_ms']['torch_bmm_sdpa']:8.3f} ms/layer-step   rel err vs fp32 torch {rel:.2e}")
    qs, A = t["qs"], t["A"]
    mem_ref = (qs.double() @ A.double()).float()
    for variant, tf32 in (("mem_f32", True), ("mem_f32", False), ("mem_f32_3d", True), ("mem_lowp", True)):
        name = f"{variant}{'_tf32' if tf32 else '_notf32'}"
        feeds = {"qs": qs.reshape(s.L, s.R, s.K) if variant == "mem_f32_3d" else qs,
                 "A": A.reshape(s.L, s.K, s.d) if variant == "mem_f32_3d" else A}
        out_shape = (s.L, s.R, s.d) if variant == "mem_f32_3d" else (s.L, 1, s.R, s.d)
        out = torch.empty(out_shape, dtype=dtype if variant == "mem_lowp" else torch.float32, device=dev)
        try:
            ms = run_variant(ort, build_mem(variant, s, ELEM[args.precision]), feeds, out, dev, tf32, args.iters)
        except Exception as exc:
            result["mem_ms"][name] = f"failed: {str(exc).splitlines()[0][:200]}"
            print(f"{name:18s} failed: {str(exc).splitlines()[0][:200]}")
            continue
        rel = float(((out.float().reshape(mem_ref.shape) - mem_ref).abs().max() / mem_ref.abs().max()).item())
        result["mem_ms"][name], result["mem_rel"][name] = ms, rel
        print(f"{name:18s} {ms:8.3f} ms   rel err vs float64 {rel:.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
