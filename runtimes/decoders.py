"""Open the generation decoder of an export on a backend: `open_decoder(EXPORT_DIR, "ort" | "trt")`
(runtimes/ort_generate.py OrtDecoder, runtimes/trt_generate.py TrtDecoder; both runtimes/
export_decoder.py ExportDecoder). An export without decode graphs is refused with one line (exit 2).
"""

from __future__ import annotations

from pathlib import Path

from graphs.errors import InputError
from runtimes.export_decoder import DECODE_ROLES


def open_decoder(export_dir: str | Path, backend: str, device: str = "cpu", precision: str | None = None,
                 cuda_graph: bool | None = None):
    """The decoder of an export on `backend` (ort, or trt: the engines of `armt build`); one line
    (InputError) for an export without decode graphs or a backend that cannot run them."""
    from runtimes.loaders import open_export
    manifest = open_export(export_dir, precision)
    kind = manifest.model_config().kind
    missing = [r for r in DECODE_ROLES[kind] if r not in manifest.graphs]
    if DECODE_ROLES[kind][0] in missing:  # without the memory-write graph: the frozen policy only
        raise InputError(f"export {manifest.root} has no decode graphs ({', '.join(missing)}; it has: "
                         f"{', '.join(manifest.graphs)}): export it again without --no-decode, or generate "
                         "with --backend torch on the model directory")
    if backend == "trt":
        from runtimes.trt_generate import TrtDecoder
        return TrtDecoder(manifest, device=device, cuda_graph=cuda_graph)
    if backend != "ort":
        raise InputError(f"generation on an export runs on --backend ort or trt, got {backend!r}")
    from runtimes.ort_generate import OrtDecoder
    return OrtDecoder(manifest, device=device, cuda_graph=cuda_graph)
