"""exporter: ARMT cells to ONNX (memory state as explicit graph I/O), manifest, validation, TensorRT engines."""

__version__ = "0.1.0"
