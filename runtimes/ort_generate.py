"""Generation on an export (ONNX Runtime / TensorRT): needs the export's decode graphs.

No exporter writes decode graphs yet (docs/generation.md, "Not done yet"), so every export is refused
here with one line (exit 2) that names what it has; nothing is run. The decoder an export with
decode graphs gets will implement runtimes/torch_generate.py's protocol.
"""

from __future__ import annotations

from pathlib import Path

from graphs.errors import InputError

DECODE_ROLES = {"armt": ("decode", "memory_write"), "rmt": ("rmt_decode",)}


def open_decoder(export_dir: str | Path, backend: str, device: str = "cpu", precision: str | None = None):
    from runtimes.loaders import open_export
    manifest = open_export(export_dir, precision)
    kind = manifest.model_config().kind
    missing = [r for r in DECODE_ROLES[kind] if r not in manifest.graphs]
    if missing:
        raise InputError(f"export {manifest.root} has no decode graphs ({', '.join(missing)}; it has: "
                         f"{', '.join(manifest.graphs)}): generate with --backend torch on the model directory")
    raise InputError(f"generation on --backend {backend} is not implemented yet; use --backend torch")
