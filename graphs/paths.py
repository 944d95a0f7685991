"""A command's inputs and outputs, checked before anything is read, computed or written.

    check_paths(inputs={"--input-ids": "ids.npy", "MODEL_DIR": "m"},
                outputs=[OutputPath("--output", "logits.npy"), OutputPath("-o", "out", directory=True)])

refuses (OutputError, exit 2, one line naming both):
  * an output equal to an input, inside an input (a directory), or containing one;
  * two outputs at one path, or one output inside another;
  * a file output that is an existing directory, or whose folder is missing or not writable;
  * a directory output that exists as a file, that is not empty without `overwrite`, or whose
    nearest existing folder is not writable.
Paths are compared after resolving symbolic links and `..`. Nothing here touches the files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from graphs.errors import OutputError


@dataclass(frozen=True)
class OutputPath:
    flag: str  # how the user named it ("--output", "-o")
    path: str | Path
    directory: bool = False  # an artifact directory (written by graphs.atomic.atomic_directory)
    overwrite: bool = False  # directories: replacing a non-empty one is allowed (--overwrite)


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve(strict=False)


def _within(inner: Path, outer: Path) -> bool:
    return inner != outer and outer in inner.parents


def check_paths(inputs: Mapping[str, str | Path | None], outputs: list[OutputPath]) -> None:
    ins = {flag: _resolved(p) for flag, p in inputs.items() if p}
    outs = [(o, _resolved(o.path)) for o in outputs if o.path]
    for o, out in outs:
        for flag, inp in ins.items():
            if out == inp or (Path(o.path).exists() and Path(inputs[flag]).exists()
                              and os.path.samefile(o.path, inputs[flag])):
                raise OutputError(f"{o.flag} {o.path} is the input {flag}: an output may not replace an input "
                                  "(choose another path)")
            if _within(out, inp):
                raise OutputError(f"{o.flag} {o.path} lies inside the input {flag} {inputs[flag]}: an output may "
                                  "not be written into an input (choose a path outside it)")
            if _within(inp, out):
                raise OutputError(f"{o.flag} {o.path} contains the input {flag} {inputs[flag]}: writing it would "
                                  "replace that input (choose a path that does not hold it)")
    for i, (a, pa) in enumerate(outs):
        for b, pb in outs[i + 1:]:
            if pa == pb:
                raise OutputError(f"{a.flag} and {b.flag} name the same path {a.path}")
            if _within(pa, pb) or _within(pb, pa):
                inner, outer = (a, b) if _within(pa, pb) else (b, a)
                raise OutputError(f"{inner.flag} {inner.path} lies inside the output {outer.flag} {outer.path}")
    for o, out in outs:
        _check_location(o, out)


def _check_location(o: OutputPath, out: Path) -> None:
    if o.directory:
        if out.exists() and not out.is_dir():
            raise OutputError(f"{o.flag} {o.path} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not o.overwrite:
            raise OutputError(f"{o.flag} {o.path} already exists and is not empty (pass --overwrite to replace it)")
        folder = out.parent
        while not folder.exists() and folder != folder.parent:  # atomic_directory creates missing parents
            folder = folder.parent
        if not folder.is_dir():
            raise OutputError(f"{o.flag} {o.path}: {folder} is not a directory")
    else:
        if out.is_dir():
            raise OutputError(f"{o.flag} {o.path} is a directory; give a file path")
        folder = out.parent
        if not folder.exists():
            raise OutputError(f"{o.flag} {o.path}: folder {Path(o.path).parent} does not exist")
        if not folder.is_dir():
            raise OutputError(f"{o.flag} {o.path}: {Path(o.path).parent} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{o.flag} {o.path}: folder {folder} is not writable")
