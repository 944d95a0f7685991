"""The one place onnxruntime is imported (lazily: an install without it still runs the other backends)."""

from __future__ import annotations

from graphs.errors import BackendUnavailable


def import_onnxruntime():
    """The onnxruntime module, or BackendUnavailable naming the extra to install (exit 3 in the CLI)."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable(f"onnxruntime is not installed ({exc}); pip install 'armt-deploy[ort]' "
                                 "(or 'armt-deploy[ort-gpu]' for the CUDA execution provider)") from None
    return onnxruntime
