"""exporter: ARMT cells to ONNX (memory state as explicit graph I/O), manifest, TensorRT engines."""

from graphs import __version__  # noqa: F401 (recorded in every manifest)
