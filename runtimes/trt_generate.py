"""Generation on an export with TensorRT: the decoder protocol of runtimes/torch_generate.py over the
TensorRT engines `armt build` made from the export's decode graphs (decode + memory_write for an
ARMT, rmt_decode + rmt_memory_write for an RMT), the mirror of runtimes/ort_generate.py OrtDecoder.

The feeds, the KV cache and the memory bookkeeping are ExportDecoder's (runtimes/export_decoder.py),
shared with the ONNX Runtime decoder; only the runners differ: one TrtRunner (runtimes/trt_runner.py)
per decode role, and the prompt's completed segments through the TrtRunner of the schedule's step
engine (runtimes/execute.py run_schedule, as `armt run --backend trt`). The KV cache lives in the
decode runner's ping-pong output buffers (CudaStorage: raw device memory; cache out of call t is the
cache in of call t+1, never copied), the memory in device buffers (uploaded once per `start`, then the
memory-write runner's outputs). Per token only ids, positions and lengths (RMT: read) go to the GPU,
and only the logits (B, n, V) come back. CUDA graphs: TrtRunner's (default on; each call key, i.e.
shapes and bound addresses, captured on its second call: the two cache parities are two graphs).

Errors, one line each: an export without engines (`armt build` first, exit 2), without engines for
its decode graphs (exit 2), TensorRT not installed (exit 3, names the extra), no CUDA device (exit 3),
--device cpu (exit 2).

Limits: no machine of this project can execute a TensorRT engine (TensorRT-RTX 1.7 does not run on
compute capability 9.0, the H200; CI has no GPU). The decoder is tested on the CPU with stand-in
engines (tests/test_generate_trt.py: TrtRunner's call path over host buffers, each engine replaced by
its ONNX graph on ONNX Runtime CPU); it has never run a real engine.
"""

from __future__ import annotations

import logging

from graphs.errors import InputError
from runtimes.export_decoder import DECODE_ROLES, ExportDecoder

log = logging.getLogger("armt.generate")


def check_decode_engines(manifest) -> None:
    """One line (InputError) for an export whose decode graphs have no TensorRT engine."""
    kind = manifest.model_config().kind
    roles = [r for r in DECODE_ROLES[kind] if r in manifest.graphs]
    built = [r for r, g in manifest.graphs.items() if g.engines]
    if not built:
        raise InputError(f"export {manifest.root} has no TensorRT engines: run `armt build {manifest.root}` "
                         "first (or generate with --backend ort)")
    lacking = [r for r in roles if not manifest.graphs[r].engines]
    if lacking:
        raise InputError(f"export {manifest.root} has no TensorRT engine for {', '.join(lacking)} (engines for: "
                         f"{', '.join(built)}): run `armt build {manifest.root}` without --graph, or with "
                         f"--graph {' --graph '.join(lacking)}")


class TrtDecoder(ExportDecoder):
    backend = "trt"

    def __init__(self, manifest, device: str = "cuda", cuda_graph: bool | None = None):
        """`cuda_graph`: TrtRunner's CUDA graphs for the decode and prefill calls (default on)."""
        from runtimes.base import parse_device
        if parse_device(device).type != "cuda":
            raise InputError("the trt backend runs TensorRT engines on a CUDA GPU: use --device cuda")
        check_decode_engines(manifest)
        super().__init__(manifest, device=device, cuda_graph=cuda_graph)
        log.debug("trt decoder on %s: %s", self.device_name,
                  ", ".join(f"{r.role} ({r.engine_record.file})" for r in self.runners.values()))

    def _open_runner(self, role: str, prefill: bool):
        from runtimes.trt_runner import TrtRunner
        return TrtRunner(self.manifest, role, device=self.device_name, verify_checksums=False,
                         cuda_graph=self.cuda_graph_option)
