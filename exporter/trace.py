"""Trace a graph-shaped cell (graphs/cells.py) into an ONNX file.

Exporter choice (torch 2.13): `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript) at
opset 18 with the onnxscript optimizer on. It keeps dynamic dims symbolic (no batch-1 constants
baked in; checked by running batch 1..3 and several widths on ONNX Runtime in the tests) and gives
a compact graph of plain ONNX ops. Opset 18 predates the fused RotaryEmbedding/Attention ops, so
the optimizer cannot fuse rotary tables with a batch-1 cos cache (the opset-23 trap) and attention
stays written out (blocks.attend(fused=False)), which TensorRT builds in fp32 too. The legacy
TorchScript exporter (dynamo=False) also produced a correct graph here but is deprecated and
emits a noisier graph (OneHot/Tile for torch.roll, ~700 Constant nodes); it is not used.

Example inputs: batch 2, width chosen to collide with no fixed dim (torch.export "duck-sizes"
equal sample sizes), zero state. Dims are declared with torch.export.Dim: "batch", "width", and
slot = width + M (a derived dim, renamed "slot" in the written graph).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import torch

from graphs.cells import DiagonalStep, SegmentCell
from graphs.errors import ExportError
from graphs.model import ArmtModel

from exporter.specs import graph_io

log = logging.getLogger("armt.export")

DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 17, 22  # opset 23+ lets the optimizer fuse RotaryEmbedding/Attention (not portable)
TRACE_BATCH = 2
QUIET_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export", "torch.fx",
                 "torch._dynamo", "torch.utils._sympy")
MAX_BATCH, MAX_WIDTH = 1 << 16, 1 << 20


def trace_width(model: ArmtModel) -> int:
    """A sample width that equals no fixed size of the graph (and whose slot length equals none)."""
    b, a = model.cfg.base, model.cfg.armt
    fixed = {b.n_layers, b.d_model, a.d_key, b.vocab_size, a.num_mem_tokens, b.n_heads, b.n_kv_heads,
             b.head_dim, TRACE_BATCH, 1}
    for w in range(5, 1000):
        if w not in fixed and w + a.num_mem_tokens not in fixed and w != TRACE_BATCH + a.num_mem_tokens:
            return w
    raise ExportError("could not pick a trace width")  # unreachable for any real config


def example_args(model: ArmtModel, role: str) -> tuple[torch.Tensor, ...]:
    """Valid example inputs for tracing: batch 2, width trace_width(), zero memory state."""
    cfg = model.cfg
    L, M, B = cfg.base.n_layers, cfg.armt.num_mem_tokens, TRACE_BATCH
    W = trace_width(model)
    P = W + M
    ids = torch.zeros(B, W, dtype=torch.int64)
    pos = torch.arange(P, dtype=torch.int64)[None].expand(B, P).contiguous()
    if cfg.armt.wrap_pos:
        pos = torch.cat([pos[:, :W], torch.arange(cfg.pos_table_rows - M, cfg.pos_table_rows)[None].expand(B, M)], 1)
    kv = torch.ones(B, P, dtype=torch.bool)
    st = model.zero_state(B)
    if role == "segment":
        return ids, pos, kv, torch.ones(B, dtype=torch.bool), st.A, st.z, st.written
    hidden = torch.zeros(L, B, P, cfg.base.d_model, dtype=model.dtype)
    return (ids, hidden, pos[None].expand(L, B, P).contiguous(), kv[None].expand(L, B, P).contiguous(),
            torch.ones(L, dtype=torch.bool), torch.ones(L, B, dtype=torch.bool), st.A, st.z, st.written)


def dynamic_shapes(model: ArmtModel, role: str) -> dict[str, dict[int, object]]:
    from torch.export import Dim
    M = model.cfg.armt.num_mem_tokens
    batch = Dim("batch", min=1, max=MAX_BATCH)
    width = Dim("width", min=1, max=MAX_WIDTH)
    slot = width + M
    state = {"A_in": {1: batch}, "z_in": {1: batch}, "written_in": {1: batch}}
    if role == "segment":
        return {"input_ids": {0: batch, 1: width}, "positions": {0: batch, 1: slot},
                "key_valid": {0: batch, 1: slot}, "write": {0: batch}, **state}
    return {"input_ids": {0: batch, 1: width}, "hidden_in": {1: batch, 2: slot}, "positions": {1: batch, 2: slot},
            "key_valid": {1: batch, 2: slot}, "active": {}, "write": {1: batch}, **state}


def cell_module(model: ArmtModel, role: str) -> torch.nn.Module:
    return SegmentCell(model).eval() if role == "segment" else DiagonalStep(model).eval()


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset} is not supported (choose {MIN_OPSET}..{MAX_OPSET}; opset 23+ lets "
                          "the optimizer fuse RotaryEmbedding/Attention ops that TensorRT and batch > 1 break on)")


def trace_graph(model: ArmtModel, role: str, precision: str, opset: int = DEFAULT_OPSET):
    """Trace the `role` cell of `model` (already cast to the export precision): an onnx_ir Model whose
    initializers still share memory with the torch parameters."""
    check_opset(opset)
    inputs, outputs = graph_io(model.cfg, role, precision)
    args = example_args(model, role)
    for name in QUIET_LOGGERS:  # their INFO lines (one per folded initializer) drown ours
        logging.getLogger(name).setLevel(logging.ERROR)
    t0 = time.perf_counter()
    log.info("tracing %s graph (torch.onnx dynamo exporter, opset %d, %s) ...", role, opset, precision)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation/user warnings are not ours to show
        try:
            program = torch.onnx.export(
                cell_module(model, role), args, dynamic_shapes=dynamic_shapes(model, role),
                input_names=[t.name for t in inputs], output_names=[t.name for t in outputs],
                opset_version=opset, dynamo=True, optimize=True, external_data=True, verbose=False)
        except Exception as exc:  # torch.export raises many types; the message is what the user needs
            raise ExportError(f"torch.onnx.export of the {role} graph failed: {exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    log.info("traced %s graph in %.1f s", role, time.perf_counter() - t0)
    return program.model


def export_graph(model: ArmtModel, role: str, precision: str, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Trace into `path` with torch's own external-data file `path`.data (exporter.weights.SharedWeights
    .adopt re-homes it). `armt export` itself uses trace_graph + SharedWeights.adopt_ir (no extra copy)."""
    import onnx_ir as ir
    ir.save(trace_graph(model, role, precision, opset), str(path), external_data=path.name + ".data")
