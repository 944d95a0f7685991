"""File checksums of an export, and the cache that spares a second run the re-hashing.

Three policies (`load_manifest(..., checksums=POLICY)`):

    "full"     sha256 of every file, always      armt verify, armt inspect --verify, armt build
    "cached"   sha256 of every file whose        armt run, every runner (the default)
               stat is not in the cache
    "sizes"    sizes only                        --no-verify-checksums (hosts that verify elsewhere)

Every policy checks each file's size and the manifest's fields against what its graphs record
(exporter/provenance.py). A hash computed under "full" or "cached" is remembered in the cache file,
keyed by the file's real path and stat: (size, mtime_ns, ctime_ns, inode, device). A later
"cached" load whose stat matches all five takes the remembered sha256 instead of reading the file;
any change (rewritten, copied, touched, chmod-ed, replaced) misses and re-hashes. A file whose mtime
is within RACY_NS of the moment it was hashed is not remembered (a write in the same timestamp tick
would leave its stat unchanged: git's "racily clean" case).

What only "full" catches: content that changed while all five stat fields stayed the same (media
corruption, a raw write to the block device, an edit of the cache file itself).

The cache file: $ARMT_CACHE/checksums.json, else $XDG_CACHE_HOME/armt/checksums.json, else
~/.cache/armt/checksums.json (not the export directory: exports may be read-only). Written
atomically (graphs/atomic.py); unreadable, corrupted or unwritable, it is ignored (everything is
hashed, as without a cache). At most MAX_ENTRIES entries, the least recently used dropped first.
Concurrent writers: the last rename wins; a lost entry only costs a re-hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("armt.checksums")

POLICIES = ("full", "cached", "sizes")
CACHE_FILE = "checksums.json"
CACHE_VERSION = 1
MAX_ENTRIES = 4096
RACY_NS = 2_000_000_000  # 2 s: the coarsest common timestamp granularity (FAT); ext4/xfs are finer


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    if os.environ.get("ARMT_CACHE"):
        return Path(os.environ["ARMT_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "armt"
    return Path.home() / ".cache" / "armt"


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class ChecksumCache:
    """sha256 by (real path, stat). `load()` never fails; `save()` writes only when something changed."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / CACHE_FILE
        self.entries: dict[str, dict] = {}  # real path -> {"stat": [...], "sha256": str, "used": float}
        self.dirty = False

    @classmethod
    def load(cls, path: Path | None = None) -> "ChecksumCache":
        cache = cls(path)
        try:
            raw = json.loads(cache.path.read_text())
        except FileNotFoundError:
            return cache
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            log.debug("checksum cache %s ignored (%s)", cache.path, exc)
            return cache
        if not isinstance(raw, dict) or raw.get("version") != CACHE_VERSION or not isinstance(raw.get("files"), dict):
            log.debug("checksum cache %s ignored (not version %d)", cache.path, CACHE_VERSION)
            return cache
        for name, e in raw["files"].items():
            if (isinstance(e, dict) and isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64
                    and isinstance(e.get("stat"), list) and len(e["stat"]) == 5
                    and all(isinstance(x, int) for x in e["stat"])):
                cache.entries[name] = {"stat": e["stat"], "sha256": e["sha256"],
                                       "used": float(e.get("used", 0.0)) if isinstance(e.get("used"), (int, float)) else 0.0}
        return cache

    def lookup(self, path: Path, st: os.stat_result) -> str | None:
        e = self.entries.get(str(Path(path).resolve()))
        if e is None or e["stat"] != _stat_key(st):
            return None
        e["used"], self.dirty = time.time(), True
        return e["sha256"]

    def remember(self, path: Path, st: os.stat_result, digest: str, hashed_at_ns: int) -> None:
        if hashed_at_ns - st.st_mtime_ns < RACY_NS:
            return  # racily clean: a write in the same tick would keep this stat
        self.entries[str(Path(path).resolve())] = {"stat": _stat_key(st), "sha256": digest, "used": time.time()}
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        from graphs.atomic import atomic_write_bytes
        from graphs.errors import OutputError
        keep = sorted(self.entries.items(), key=lambda kv: kv[1]["used"], reverse=True)[:MAX_ENTRIES]
        text = json.dumps({"version": CACHE_VERSION, "files": dict(keep)}, sort_keys=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, text.encode())
            self.dirty = False
        except (OSError, OutputError) as exc:
            log.info("checksum cache %s not written (%s): the next run hashes again", self.path, exc)


def file_digest(path: Path, policy: str, cache: ChecksumCache | None) -> str | None:
    """The sha256 of `path` under `policy` (None for "sizes"); "cached" reads the cache first; a
    hash that was computed is remembered in `cache`."""
    if policy == "sizes":
        return None
    if policy not in POLICIES:
        raise ValueError(f"checksum policy must be one of {POLICIES}, got {policy!r}")
    st = os.stat(path)
    if policy == "cached" and cache is not None:
        known = cache.lookup(path, st)
        if known is not None:
            return known
    started = time.time_ns()
    digest = sha256_file(path)
    if cache is not None and _stat_key(os.stat(path)) == _stat_key(st):  # unchanged while it was read
        cache.remember(path, st, digest, started)
    return digest
