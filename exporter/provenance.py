"""What each exported graph records about the export it belongs to, and the check of a manifest
against it: manifest.json cannot be edited unseen.

Every .onnx file of an export carries, in its ONNX `metadata_props` (written by exporter/export.py):

    armt.model_id        the model id (graphs/identity.py: config and every weight)
    armt.config_sha256   sha256 of the canonical JSON of the manifest's model.config (the HF config)
    armt.armt_config_sha256                     ... of its model.armt_config
    armt.dims            the manifest's `dims` (canonical JSON)
    armt.precision       the export precision
    armt.role            this graph's role (ARMT: segment, diagonal_step; RMT: rmt_segment)
    armt.roles           every graph role of the export, comma-separated (graphs.contracts.roles_of)

The graph files are covered by the manifest's checksums, so a manifest whose config, dims, model id,
precision or graph entries were edited (or a graph entry deleted) disagrees with its graphs;
`provenance_problems` names each field that does. The manifest's graph entries (inputs, outputs)
and dims must also be what the config's graph contracts give.

Reading needs neither onnx nor torch: `read_metadata_props` walks the top level of the ModelProto
protobuf (skipping the graph by its length) on a memory map.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from pathlib import Path
from typing import Any

PREFIX = "armt."
METADATA_PROPS_FIELD = 14  # ModelProto.metadata_props (repeated StringStringEntryProto)


def graph_metadata(model_id: str, hf_config: dict[str, Any], armt_config: dict[str, Any], dims: dict[str, int],
                   precision: str, role: str, roles: tuple[str, ...]) -> dict[str, str]:
    """The metadata_props entries of one exported graph."""
    return {f"{PREFIX}model_id": model_id, f"{PREFIX}config_sha256": json_sha256(hf_config),
            f"{PREFIX}armt_config_sha256": json_sha256(armt_config),
            f"{PREFIX}dims": json.dumps(dims, sort_keys=True), f"{PREFIX}precision": precision,
            f"{PREFIX}role": role, f"{PREFIX}roles": ",".join(roles)}


def json_sha256(value: Any) -> str:
    """sha256 of a JSON value's canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ reading
def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or (offset, length)) of a protobuf message's top level."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise ValueError("truncated field")
            yield field, wire, (pos, n)
            pos += n
        else:
            raise ValueError(f"unsupported wire type {wire}")


def read_metadata_props(path: str | Path) -> dict[str, str]:
    """ModelProto.metadata_props of an .onnx file as a dict; ValueError when it is not an ONNX model."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise ValueError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            props = {}
            for field, wire, value in _fields(buf, 0, len(buf)):
                if field != METADATA_PROPS_FIELD or wire != 2:
                    continue
                off, n = value
                entry = {}
                for sub, sub_wire, sub_value in _fields(buf, off, off + n):
                    if sub in (1, 2) and sub_wire == 2:
                        s_off, s_n = sub_value
                        entry[sub] = bytes(buf[s_off:s_off + s_n]).decode("utf-8")
                props[entry.get(1, "")] = entry.get(2, "")
            return props


# ------------------------------------------------------------------------------------------ checking
def provenance_problems(manifest) -> list[tuple[str, str]]:
    """(manifest field, what disagrees) for every field of `manifest` that its graphs (or its own
    config's contracts) contradict; [] for an intact export."""
    from graphs.contracts import ROLES, all_roles_of, contract, model_dims
    from graphs.errors import ArmtError
    problems: list[tuple[str, str]] = []
    model = manifest.model
    if not manifest.graphs:
        return [("graphs", "the manifest lists no graphs")]
    listed = set(manifest.graphs)
    for role, g in manifest.graphs.items():
        path = manifest.path(g.file)
        try:
            meta = read_metadata_props(path)
        except (OSError, ValueError) as exc:
            problems.append((f"graphs.{role}", f"{g.file} is not a readable ONNX model ({exc})"))
            continue
        if not any(k.startswith(PREFIX) for k in meta):
            problems.append((f"graphs.{role}", f"{g.file} records no export provenance (armt.* metadata)"))
            continue
        checks = (("model.model_id", "model_id", str(model.get("model_id", ""))),
                  ("model.config", "config_sha256", json_sha256(model.get("config"))),
                  ("model.armt_config", "armt_config_sha256", json_sha256(model.get("armt_config"))),
                  ("dims", "dims", json.dumps(manifest.dims, sort_keys=True)),
                  ("precision", "precision", manifest.precision),
                  (f"graphs.{role}.role", "role", role))
        for field, key, have in checks:
            recorded = meta.get(PREFIX + key)
            if recorded == have:
                continue
            if key == "dims":
                problems.append((field, _dims_text(g.file, recorded, manifest.dims)))
            else:
                problems.append((field, f"{g.file} was exported with {key} {_short(recorded)}, "
                                        f"the manifest says {_short(have)}"))
        roles = set(filter(None, meta.get(PREFIX + "roles", "").split(",")))
        if roles != listed:
            missing, extra = sorted(roles - listed), sorted(listed - roles)
            problems.append(("graphs", f"{g.file} was exported with graphs {', '.join(sorted(roles))}; the "
                                       f"manifest " + (f"lacks {', '.join(missing)}" if missing else "")
                                       + ("; " if missing and extra else "")
                                       + (f"adds {', '.join(extra)}" if extra else "")))
    try:
        cfg = manifest.model_config()
    except ArmtError as exc:
        return _one_per_field(problems + [("model.config", f"the manifest's model config does not parse ({exc})")])
    want_dims = model_dims(cfg)
    if manifest.dims != want_dims:
        bad = sorted(k for k in set(want_dims) | set(manifest.dims) if manifest.dims.get(k) != want_dims.get(k))
        problems.append(("dims", f"dims {', '.join(bad)} differ from the model config's "
                                 f"({', '.join(f'{k}={want_dims.get(k)}' for k in bad)})"))
    for role, g in manifest.graphs.items():
        if role not in ROLES:
            continue  # refused by the manifest's own consistency check
        if role not in all_roles_of(cfg):
            problems.append((f"graphs.{role}", f"the manifest lists a {role} graph; an {cfg.kind.upper()} has "
                                               f"{', '.join(all_roles_of(cfg))}"))
            continue
        c = contract(cfg, role, manifest.precision)
        if (tuple(g.inputs), tuple(g.outputs)) != (c.inputs, c.outputs):
            problems.append((f"graphs.{role}", f"the {role} entry's inputs/outputs are not what the model "
                                               "config's contract gives"))
    return _one_per_field(problems)


def _one_per_field(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The first problem of each field (several graphs usually agree)."""
    unique: list[tuple[str, str]] = []
    for field, text in problems:
        if field not in {f for f, _ in unique}:
            unique.append((field, text))
    return unique


def _dims_text(file: str, recorded: str | None, dims: dict[str, int]) -> str:
    try:
        was = json.loads(recorded) if recorded else {}
    except ValueError:
        was = {}
    if not isinstance(was, dict):
        was = {}
    keys = sorted(k for k in set(was) | set(dims) if was.get(k) != dims.get(k))
    return (f"{file} was exported with {', '.join(f'{k}={was.get(k)}' for k in keys)}, "
            f"the manifest says {', '.join(f'{k}={dims.get(k)}' for k in keys)}")


def _short(value: str | None) -> str:
    if value is None:
        return "(none)"
    return value if len(value) <= 40 else value[:16] + "..."
