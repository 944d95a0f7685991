"""Safetensors files and sharded tensor directories, read lazily and written streaming.

    one file     model.safetensors
    sharded      model-00001-of-00003.safetensors, ...  +  model.safetensors.index.json
                 {"metadata": {"total_size": bytes, ...}, "weight_map": {tensor name: shard file}}

(the layout transformers reads and writes). Reading maps each file (mmap, copy-on-write: the file
is never written) and returns tensors that are views of the mapping: no bytes are read until a
tensor is used, so a checkpoint of any size opens in constant memory and is paged in tensor by
tensor. Writing streams: the header, then each tensor's bytes, one tensor at a time (a transposed
or sliced view is made contiguous only while it is written), so the peak is one tensor, not a copy
of the whole model. The metadata (`__metadata__`, string to string) is written into every shard and
into the index.

A file is checked before any tensor is made: header length and JSON, known dtypes, shapes that
match their byte ranges, ranges inside the file. Every problem is a CheckpointError (one line).
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path
from typing import Iterable, Mapping

import torch

from graphs.errors import CheckpointError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_HEADER = 100_000_000
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3  # transformers' default max_shard_size ("5GB")

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


# ------------------------------------------------------------------------------------------ reading
def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, offset of the data) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path} is not a safetensors file (shorter than its header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER:
                raise CheckpointError(f"{path} is not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file (header: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (header is not an object)")
    return header, 8 + n


def file_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of one safetensors file ({} when it has none or is unreadable)."""
    try:
        header, _ = read_header(path)
    except CheckpointError:
        return {}
    meta = header.get("__metadata__")
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def read_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, as lazy views of a copy-on-write mapping of it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    header, start = read_header(path)
    size = path.stat().st_size
    specs = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[spec["dtype"]]
            shape = tuple(int(s) for s in spec["shape"])
            lo, hi = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has an unreadable or unsupported entry "
                                  f"({str(spec)[:80]})") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if lo < 0 or hi - lo != nbytes or start + hi > size or any(s < 0 for s in shape):
            raise CheckpointError(f"{path}: tensor {name!r} {spec['dtype']}{list(shape)} does not fit its byte "
                                  f"range {lo}..{hi} (file data is {size - start} bytes): truncated or damaged")
        specs[name] = (dtype, shape, start + lo, nbytes)
    if not specs:
        return {}
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writes never reach the file
    out = {}
    for name, (dtype, shape, offset, nbytes) in specs.items():
        itemsize = torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        elif offset % itemsize:  # misaligned (another writer): copy this one tensor
            out[name] = torch.frombuffer(bytearray(mapping[offset:offset + nbytes]), dtype=dtype).reshape(shape)
        else:
            t = torch.frombuffer(mapping, dtype=dtype, count=nbytes // itemsize, offset=offset).reshape(shape)
            t._armt_mapped = (mapping, offset, nbytes)  # for release(): the range it maps
            out[name] = t
    return out


def release(tensor: torch.Tensor) -> None:
    """Drop the pages a mapped tensor (read_file) has paged in from this process's memory, once its
    values were copied elsewhere (the file is untouched; reading the tensor again pages them back).
    A tensor that is not such a view is left alone."""
    mapped = getattr(tensor, "_armt_mapped", None)
    if mapped is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    mapping, offset, nbytes = mapped
    page = mmap.PAGESIZE
    lo, hi = -(-offset // page) * page, (offset + nbytes) // page * page  # whole pages inside the range only
    if hi > lo:
        try:
            mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):
            pass  # closed or unsupported: the pages stay until the mapping goes


def read_index(index_path: Path) -> dict:
    try:
        index = json.loads(index_path.read_text())
    except OSError as exc:
        raise CheckpointError(f"cannot read {index_path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index_path} is not valid JSON ({exc})") from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"{index_path} has no weight_map of tensor name -> shard file")
    for shard in set(wm.values()):
        if Path(shard).is_absolute() or len(Path(shard).parts) != 1:
            raise CheckpointError(f"{index_path}: shard {shard!r} is not a file beside the index")
    return index


def read_dir(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a directory: its sharded set (index) if it has one, else model.safetensors."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX
    if not index_path.is_file():
        return read_file(model_dir / SINGLE)
    wm = read_index(index_path)["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(wm.values())):
        tensors = read_file(model_dir / shard)
        listed = {k for k, v in wm.items() if v == shard}
        if set(tensors) != listed:
            extra, missing = sorted(set(tensors) - listed), sorted(listed - set(tensors))
            raise CheckpointError(f"{model_dir / shard} does not hold what {INDEX} lists"
                                  + (f"; missing {', '.join(missing[:3])}" if missing else "")
                                  + (f"; not listed {', '.join(extra[:3])}" if extra else ""))
        out.update(tensors)
    return out


def dir_metadata(model_dir: str | Path) -> dict[str, str]:
    """The metadata of a tensor directory: the index's "metadata" strings, else the single file's."""
    model_dir = Path(model_dir)
    if (model_dir / INDEX).is_file():
        try:
            meta = read_index(model_dir / INDEX).get("metadata") or {}
        except CheckpointError:
            return {}
        return {str(k): str(v) for k, v in meta.items() if isinstance(v, str)} if isinstance(meta, dict) else {}
    return file_metadata(model_dir / SINGLE)


def weight_files(model_dir: str | Path) -> list[str]:
    """The weight files of a directory (for listing; the index first when sharded)."""
    model_dir = Path(model_dir)
    if (model_dir / INDEX).is_file():
        return [INDEX, *sorted(set(read_index(model_dir / INDEX)["weight_map"].values()))]
    return [SINGLE]


# ------------------------------------------------------------------------------------------ writing
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_file(path: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], metadata: Mapping[str, str]) -> int:
    """Write one safetensors file, tensor by tensor (names sorted). Returns the bytes of tensor data."""
    items = sorted(tensors, key=lambda kv: kv[0])
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in items:
        if t.dtype not in NAMES:
            raise CheckpointError(f"tensor {name} has dtype {t.dtype}, which safetensors files here do not hold")
        n = _nbytes(t)
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data 8-byte aligned, as the safetensors writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in items:
            if t.numel() == 0:
                continue
            c = t.detach().cpu().contiguous()
            if c.dtype == torch.bfloat16:
                c = c.view(torch.int16)
            f.write(memoryview(c.numpy().reshape(-1)).cast("B"))
    return offset


def plan_shards(sizes: Mapping[str, int], shard_bytes: int | None) -> list[list[str]]:
    """Tensor names grouped into shards of at most `shard_bytes` (a larger tensor alone), in name
    order; one group when `shard_bytes` is None or everything fits."""
    names = sorted(sizes)
    if shard_bytes is None or sum(sizes.values()) <= shard_bytes:
        return [names]
    if shard_bytes <= 0:
        raise CheckpointError(f"shard size must be positive, got {shard_bytes}")
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        if groups[-1] and used + sizes[name] > shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += sizes[name]
    return groups


def write_dir(stage: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
              shard_bytes: int | None = None) -> list[str]:
    """Write `tensors` into directory `stage` as model.safetensors, or, when they exceed
    `shard_bytes`, as shards with an index. Returns the files written."""
    stage = Path(stage)
    sizes = {k: _nbytes(v) for k, v in tensors.items()}
    groups = plan_shards(sizes, shard_bytes)
    if len(groups) == 1:
        write_file(stage / SINGLE, tensors.items(), metadata)
        return [SINGLE]
    n = len(groups)
    weight_map = {}
    files = []
    for i, group in enumerate(groups, 1):
        shard = f"model-{i:05d}-of-{n:05d}.safetensors"
        write_file(stage / shard, ((k, tensors[k]) for k in group), metadata)
        weight_map.update({k: shard for k in group})
        files.append(shard)
    index = {"metadata": {"total_size": sum(sizes.values()), **dict(metadata)}, "weight_map": weight_map}
    (stage / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [INDEX, *files]


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (the --shard-size option)."""
    t = text.strip().upper()
    units = {"KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3, "B": 1}
    for unit, factor in units.items():
        if t.endswith(unit):
            number = t[: -len(unit)].strip()
            break
    else:
        number, factor = t, 1
    try:
        value = float(number)
    except ValueError:
        raise CheckpointError(f"shard size {text!r} is not a size (e.g. 5GB, 500MB, 2GiB)") from None
    if not value > 0 or not math.isfinite(value):
        raise CheckpointError(f"shard size {text!r} must be positive")
    return int(value * factor)
