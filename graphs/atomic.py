"""Artifacts are whole or absent: directories built under a temporary name and renamed, files
written to a temporary sibling and renamed, several output files of one call renamed as a set.

    atomic_directory(dest)        stage  .NAME.partial-<pid>-<random>/  ->  rename onto dest
    atomic_write_bytes(path, b)   stage  .NAME.tmp-<pid>-<random>       ->  rename onto path
    write_files_together({...})   every file staged first; then renamed, the previous versions kept
                                  until all are in place (put back if a rename fails)

A crash or error part-way leaves the destination as it was (absent, or the previous version). A
process killed outright (SIGKILL, power loss) leaves its staging entry behind: the next write to
the same destination removes the ones whose process is gone (`stale_entries` lists them; `armt
inspect` shows them).

File modes, one policy for every artifact: directories 0777 and files 0666, less the umask (what
`mkdir` and `open` give); staging never leaves an artifact private (mkdtemp's 0700, or the 0600
some writers use).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Iterator, Mapping

from graphs.errors import ArmtError, OutputError

STAGING_KINDS = ("partial", "old", "tmp")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def dir_mode() -> int:
    return 0o777 & ~umask()


def file_mode() -> int:
    return 0o666 & ~umask()


def apply_modes(root: Path) -> None:
    """The file-mode policy on a staged tree: directories 0777, files 0666, less the umask."""
    dmode, fmode = dir_mode(), file_mode()
    os.chmod(root, dmode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), dmode)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, fmode)


def _staging_name(dest: Path, kind: str) -> Path:
    return dest.with_name(f".{dest.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def stale_entries(dest: str | Path) -> list[Path]:
    """Staging entries of `dest` (`.NAME.partial-*`, `.NAME.old-*`, `.NAME.tmp-*` beside it) whose
    writing process is gone (an entry without a readable pid counts as stale)."""
    dest = Path(dest).absolute()
    parent = dest.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.({'|'.join(STAGING_KINDS)})-(\d+)?")
    stale = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        m = pattern.match(entry.name)
        if m and not (m.group(2) and _pid_alive(int(m.group(2)))):
            stale.append(entry)
    return sorted(stale)


def remove_stale(dest: str | Path) -> list[Path]:
    """Remove the stale staging entries of `dest`; returns what was removed."""
    removed = []
    for entry in stale_entries(dest):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        if not entry.exists():
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_directory(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory beside `dest`; on success it replaces `dest`."""
    dest = Path(dest).absolute()
    if dest.exists() and not dest.is_dir():
        raise ArmtError(f"{dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise ArmtError(f"{dest} already exists and is not empty (pass --overwrite to replace it)")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {dest.parent}: {exc.strerror}") from None
    remove_stale(dest)
    stage = _staging_name(dest, "partial")
    try:
        stage.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot write beside {dest}: {exc.strerror}") from None
    try:
        yield stage
        apply_modes(stage)
        old = None
        if dest.exists():
            old = _staging_name(dest, "old")
            os.replace(dest, old)
        os.replace(stage, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _stage_file(path: Path, data: bytes) -> Path:
    tmp = _staging_name(path, "tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    return tmp


def _keep_previous(path: Path) -> Path | None:
    """A copy of the file at `path` under a staging name (a hard link where the filesystem has them)."""
    if not path.is_file():
        return None
    old = _staging_name(path, "old")
    try:
        os.link(path, old)
    except OSError:
        shutil.copy2(path, old)
    return old


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace one file atomically."""
    write_files_together({Path(path): data})


def write_files_together(files: Mapping[str | Path, bytes]) -> None:
    """Write several files as a set: all of them, or none (previous versions stay when one fails)."""
    targets = {Path(p).absolute(): data for p, data in files.items()}
    if len(targets) != len(files):
        raise OutputError("two outputs of one call name the same file")
    staged: dict[Path, Path] = {}
    try:
        for path, data in targets.items():
            remove_stale(path)
            staged[path] = _stage_file(path, data)
        moved: list[tuple[Path, Path | None]] = []  # (target, its previous version)
        current = old = None
        try:
            for current, tmp in staged.items():
                old = _keep_previous(current) if len(staged) > 1 else None
                os.replace(tmp, current)
                moved.append((current, old))
                old = None
        except OSError as exc:
            if old is not None:  # the failed target kept its version: drop the copy
                old.unlink(missing_ok=True)
            for path, old in reversed(moved):  # put the previous versions back
                if old is not None:
                    os.replace(old, path)
                else:
                    path.unlink(missing_ok=True)
            raise OutputError(f"cannot write {current}: {exc.strerror}") from None
        for _, old in moved:
            if old is not None:
                old.unlink(missing_ok=True)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
