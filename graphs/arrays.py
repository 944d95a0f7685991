"""Reading and writing the CLI's .npy files: never pickles, always atomic, errors name the file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from graphs.atomic import atomic_write_bytes
from graphs.errors import InputError


def load_npy(path: str | Path, what: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what}: {path} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{what}: {path} is not a readable .npy array ({exc})") from None


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy bytes of an array (for writing several outputs together: graphs.atomic)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def save_npy(path: str | Path, array: np.ndarray) -> None:
    atomic_write_bytes(path, npy_bytes(array))
