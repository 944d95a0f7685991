"""Write a directory of artifacts all at once: build it under a temporary name, then rename.

A crash or error part-way leaves the destination as it was (absent, or the previous version).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from graphs.errors import ArmtError


@contextlib.contextmanager
def atomic_directory(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory beside `dest`; on success it replaces `dest`."""
    dest = Path(dest).absolute()
    if dest.exists() and not dest.is_dir():
        raise ArmtError(f"{dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise ArmtError(f"{dest} already exists and is not empty (pass --overwrite to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        yield stage
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(stage, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace one file atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
