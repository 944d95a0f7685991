"""`manifest.json`: what an export directory holds, and the check that it is intact.

Layout of an export directory (file names are fixed by this module; the manifest lists them all):

    EXPORT_DIR/
      manifest.json                this file's contents (format_version, model, graphs, files, ...)
      segment.onnx                 sequential-schedule graph   (role "segment")          ARMT
      diagonal_step.onnx           diagonal-schedule graph     (role "diagonal_step")    ARMT
      rmt_segment.onnx             sequential-schedule graph   (role "rmt_segment")      RMT (instead of both)
      *_causal.onnx                fp16/bf16 at opset 23: each step graph's is_causal variant (full slots)
      weights.data                 ONNX external data (the graphs' weights, shared)
      sample_feeds.npz             realistic inputs for every graph (prefix "<role>/")
      polygraphy_data_loader.py    `polygraphy run ... --data-loader-script` helper
      segment.<tag>.engine, ...    TensorRT engines, after `armt build`
      tokenizer.json, ...          the model directory's tokenizer files, when it has them (`tokenizer`)

Every file except manifest.json has an entry in `files` (sha256 and size). `load_manifest` refuses a
directory whose manifest is missing, malformed, of another format version, or whose files are
missing, altered, or referenced without a checksum entry, and a manifest whose config, armt config,
dims, model id, precision or graph entries disagree with what its graphs record (each .onnx carries
them in its metadata: exporter/provenance.py): one line, `ExportError`, naming the field.
`check_export` lists every such problem (`armt inspect --verify`).

Tensor dtypes are ONNX/numpy names ("float32", "float16", "bfloat16", "int64", "bool"); shapes are
lists whose entries are ints (fixed) or strings (named dynamic dims "batch", "width", "slot").
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphs.atomic import atomic_write_bytes
from graphs.contracts import ROLES, TensorSpec, spec_by_name
from graphs.dtypes import DTYPES, PRECISIONS
from graphs.errors import ExportError

from exporter.checksums import POLICIES, ChecksumCache, file_digest, sha256_file
from exporter.provenance import provenance_problems

log = logging.getLogger("armt.export")

FORMAT_VERSION = 2  # 2: model ids over every weight, graphs carry provenance metadata
MANIFEST = "manifest.json"
SAMPLE_FEEDS = "sample_feeds.npz"
POLYGRAPHY_SCRIPT = "polygraphy_data_loader.py"
MEMORY_MATH = ("fp32", "tensor-core-fp16", "tensor-core-bf16")  # exporter/trace.py memory_math


# ------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class ProfileRange:
    """One optimization-profile range of an engine input: shapes for min / opt / max."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProfileRange":
        return cls(tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))


@dataclass(frozen=True)
class EngineRecord:
    """A TensorRT engine built from one graph (`armt build`)."""

    file: str
    builder: str  # "tensorrt" or "tensorrt_rtx"
    builder_version: str
    precision: str
    compute_capability: tuple[str, ...] = ()  # TensorRT-RTX targets, e.g. ("8.9", "12.0"); () = builder default
    profiles: tuple[dict[str, ProfileRange], ...] = ()  # per profile: input name -> range

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "builder": self.builder, "builder_version": self.builder_version,
                "precision": self.precision, "compute_capability": list(self.compute_capability),
                "profiles": [{k: v.to_dict() for k, v in p.items()} for p in self.profiles]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineRecord":
        return cls(file=str(d["file"]), builder=str(d["builder"]), builder_version=str(d["builder_version"]),
                   precision=str(d["precision"]), compute_capability=tuple(d.get("compute_capability", ())),
                   profiles=tuple({k: ProfileRange.from_dict(v) for k, v in p.items()}
                                  for p in d.get("profiles", ())))


@dataclass(frozen=True)
class GraphRecord:
    """One exported ONNX graph."""

    role: str  # one of ROLES
    file: str  # the .onnx file, relative to the export directory
    data_files: tuple[str, ...]  # its external-data files
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str
    opset: int
    op_counts: dict[str, int] = field(default_factory=dict)  # ONNX op type -> node count
    engines: tuple[EngineRecord, ...] = ()
    attention: str = ""  # its Attention nodes: "causal" (is_causal, no mask), "masked" (bool mask), "" none

    def input(self, name: str) -> TensorSpec:
        return spec_by_name(self.inputs, name, self.role, "input")

    def output(self, name: str) -> TensorSpec:
        return spec_by_name(self.outputs, name, self.role, "output")

    @property
    def files(self) -> tuple[str, ...]:
        """Every file this graph needs (graph, external data, engines)."""
        return (self.file, *self.data_files, *(e.file for e in self.engines))

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "file": self.file, "data_files": list(self.data_files),
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "precision": self.precision, "opset": self.opset, "op_counts": dict(self.op_counts),
                "engines": [e.to_dict() for e in self.engines], "attention": self.attention}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GraphRecord":
        return cls(role=str(d["role"]), file=str(d["file"]), data_files=tuple(d.get("data_files", ())),
                   inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
                   precision=str(d["precision"]), opset=int(d["opset"]),
                   op_counts={str(k): int(v) for k, v in d.get("op_counts", {}).items()},
                   engines=tuple(EngineRecord.from_dict(e) for e in d.get("engines", ())),
                   attention=str(d.get("attention", "")))


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "bytes": self.bytes}


@dataclass
class Manifest:
    """The parsed manifest.json. `root` is the export directory it was read from (not serialised)."""

    precision: str
    opset: int
    model: dict[str, Any]  # {"config": HF config.json dict, "armt_config": dict, "model_id": str}
    dims: dict[str, int]  # L, B-independent sizes: layers, d_model, d_key, vocab, mem_tokens, segment_size
    graphs: dict[str, GraphRecord]  # role -> record
    files: dict[str, FileRecord]  # relative path -> checksum (every file but manifest.json)
    versions: dict[str, str]  # torch, onnx, exporter (and onnxruntime when validation ran)
    validation: dict[str, Any] = field(default_factory=dict)  # {"status": "passed"|"failed"|"not run", ...}
    # model parameter name ("layers.qkv", "mem.w_q", ...) -> {"file", "offset", "length", "dtype", "shape"}
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: str | None = SAMPLE_FEEDS  # the .npz of sample feeds, or None
    polygraphy_script: str | None = POLYGRAPHY_SCRIPT
    tokenizer: tuple[str, ...] = ()  # the tokenizer files copied from the model directory (graphs/tokenizer.py)
    # the graphs' memory arithmetic (exporter/trace.py memory_math): "fp32" (the reference's; also every
    # manifest written before the field existed) or "tensor-core-fp16"/"tensor-core-bf16"
    memory_math: str = "fp32"
    format_version: int = FORMAT_VERSION
    root: Path | None = None

    # ---------------------------------------------------------------- conveniences for the runtimes
    def model_config(self):
        """The ModelConfig the graphs were exported from."""
        from graphs.config import ModelConfig, parse_base_config, wrapper_config_from_dict
        try:
            return ModelConfig(parse_base_config(self.model["config"]),
                               wrapper_config_from_dict(self.model["armt_config"]))
        except KeyError as exc:
            raise ExportError(f"manifest.json model section lacks {exc.args[0]!r}") from None

    @property
    def model_id(self) -> str:
        model_id = str(self.model.get("model_id", ""))
        if not model_id:
            raise ExportError(f"export {self.root}: manifest.json lacks model.model_id")
        return model_id

    @property
    def tf32(self) -> bool:
        """Do ONNX Runtime CUDA sessions of these graphs run fp32 products as TF32? Only tensor-core
        memory math (fp16/bf16 opset-23 exports); fp32 graphs keep full fp32 (the parity path)."""
        return self.memory_math != "fp32"

    def graph(self, role: str) -> GraphRecord:
        if role not in self.graphs:
            raise ExportError(f"export has no {role!r} graph (it has: {', '.join(self.graphs) or 'none'})")
        return self.graphs[role]

    def path(self, relative: str) -> Path:
        if self.root is None:
            raise ExportError("manifest was not loaded from a directory")
        return self.root / relative

    def graph_path(self, role: str) -> Path:
        return self.path(self.graph(role).file)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": self.format_version, "precision": self.precision, "opset": self.opset,
                "model": self.model, "dims": self.dims,
                "graphs": {r: g.to_dict() for r, g in self.graphs.items()},
                "samples": self.samples, "polygraphy_script": self.polygraphy_script,
                "tokenizer": list(self.tokenizer), "memory_math": self.memory_math,
                "versions": self.versions, "validation": self.validation, "parameters": self.parameters,
                "files": {k: v.to_dict() for k, v in sorted(self.files.items())}}

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: Path | None = None) -> "Manifest":
        return cls(format_version=int(d["format_version"]), precision=str(d["precision"]), opset=int(d["opset"]),
                   model=dict(d["model"]), dims={str(k): int(v) for k, v in d["dims"].items()},
                   graphs={str(r): GraphRecord.from_dict(g) for r, g in d["graphs"].items()},
                   files={str(k): FileRecord(str(v["sha256"]), int(v["bytes"])) for k, v in d["files"].items()},
                   versions={str(k): str(v) for k, v in d.get("versions", {}).items()},
                   validation=dict(d.get("validation", {})), parameters=dict(d.get("parameters", {})),
                   samples=d.get("samples"),
                   polygraphy_script=d.get("polygraphy_script"),
                   tokenizer=tuple(str(f) for f in d.get("tokenizer", ())),
                   memory_math=str(d.get("memory_math", "fp32")), root=root)

    def referenced_files(self) -> list[str]:
        """Every file the manifest's sections point at."""
        refs = [f for g in self.graphs.values() for f in g.files]
        refs += [p["file"] for p in self.parameters.values()]
        refs += [f for f in (self.samples, self.polygraphy_script) if f]
        refs += list(self.tokenizer)
        return list(dict.fromkeys(refs))


# ------------------------------------------------------------------------------------------ files
def file_record(path: Path) -> FileRecord:
    return FileRecord(sha256=sha256_file(path), bytes=path.stat().st_size)


def record_files(root: Path, names: list[str] | tuple[str, ...]) -> dict[str, FileRecord]:
    """Checksum the given files under `root`."""
    out = {}
    for name in names:
        p = root / name
        if not p.is_file():
            raise ExportError(f"export file {name} was not written")
        out[name] = file_record(p)
    return out


def write_manifest(export_dir: str | Path, manifest: Manifest) -> Path:
    """Write manifest.json atomically (temp file, rename). The caller fills `files` first."""
    path = Path(export_dir) / MANIFEST
    text = json.dumps(manifest.to_dict(), indent=2) + "\n"
    atomic_write_bytes(path, text.encode())
    return path


def checksum_policy(verify_checksums: bool | str) -> str:
    """True -> "cached" (a file hashed before with the same stat is not hashed again), False ->
    "sizes", or a policy name of exporter/checksums.py ("full", "cached", "sizes")."""
    if verify_checksums is True:
        return "cached"
    if verify_checksums is False:
        return "sizes"
    if verify_checksums not in POLICIES:
        raise ValueError(f"checksum policy must be one of {POLICIES}, got {verify_checksums!r}")
    return verify_checksums


def load_manifest(export_dir: str | Path, verify_checksums: bool | str = True) -> Manifest:
    """Read and check an export directory's manifest.

    Raises ExportError (one line) when the directory or manifest is missing or malformed, the format
    version is not this one, a referenced file has no checksum entry, a listed file is missing, of
    another size or of another sha256 (`verify_checksums`: the policy of exporter/checksums.py; True
    is "cached", False "sizes"), or a manifest field disagrees with what its graphs record
    (exporter/provenance.py: config, armt config, dims, model id, precision, graph entries).
    """
    manifest = _parse(export_dir)
    for _, problem in _file_problems(manifest, checksum_policy(verify_checksums)):
        raise ExportError(problem)
    for what, problem in provenance_problems(manifest):
        raise ExportError(_field_line(manifest.root, what, problem))
    return manifest


def check_export(export_dir: str | Path) -> tuple[Manifest, list[tuple[str, str]]]:
    """Every problem of an export, not just the first (`armt inspect --verify`): (what, line) for each
    altered or missing file (sha256 verified) and each manifest field its graphs contradict."""
    manifest = _parse(export_dir)
    problems = list(_file_problems(manifest, "full"))
    problems += [(field, _field_line(manifest.root, field, p)) for field, p in provenance_problems(manifest)]
    return manifest, problems


def _field_line(root: Path, field: str, problem: str) -> str:
    return f"export {root}: manifest.json field {field!r} disagrees with its graphs: {problem} (edited, or files exchanged, after export?)"


def _parse(export_dir: str | Path) -> Manifest:
    root = Path(export_dir)
    if not root.is_dir():
        raise ExportError(f"export directory {root} does not exist")
    path = root / MANIFEST
    if not path.is_file():
        raise ExportError(f"{root} is not an export directory: {MANIFEST} is missing")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or "format_version" not in raw:
        raise ExportError(f"{path} is not an ARMT export manifest (no format_version)")
    if raw["format_version"] != FORMAT_VERSION:
        raise ExportError(f"{path} has format version {raw['format_version']!r}; this armt reads version "
                          f"{FORMAT_VERSION} (re-export the model)")
    try:
        manifest = Manifest.from_dict(raw, root=root)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ExportError(f"{path} is malformed ({exc.__class__.__name__}: {exc})") from None
    _check_consistent(manifest, path)
    return manifest


def _file_problems(manifest: Manifest, policy: str):
    """(file, line) for each listed file that is missing, of another size or (under `policy`) sha256.
    Sizes first, every file, so a cut-off file is named before anything is hashed."""
    root = manifest.root
    sized = []
    for name, rec in manifest.files.items():
        f = root / name
        if not f.is_file():
            yield name, f"export {root} is incomplete: {name} is missing"
            continue
        size = f.stat().st_size
        if size != rec.bytes:
            yield name, f"export {root}: {name} was altered ({size} bytes, manifest says {rec.bytes})"
        else:
            sized.append((name, f, rec))
    if policy == "sizes":
        return
    cache = ChecksumCache.load()
    try:
        for name, f, rec in sized:
            if file_digest(f, policy, cache) != rec.sha256:
                yield name, f"export {root}: {name} was altered (sha256 does not match the manifest)"
    finally:
        cache.save()


def _check_consistent(m: Manifest, path: Path) -> None:
    if m.precision not in PRECISIONS:
        raise ExportError(f"{path}: unknown precision {m.precision!r}")
    if m.memory_math not in MEMORY_MATH or (m.memory_math != "fp32" and m.memory_math != f"tensor-core-{m.precision}"):
        raise ExportError(f"{path}: memory_math {m.memory_math!r} does not fit precision {m.precision}")
    for role, g in m.graphs.items():
        if role not in ROLES or g.role != role:
            raise ExportError(f"{path}: unknown graph role {role!r}")
        for spec in (*g.inputs, *g.outputs):
            if spec.dtype not in DTYPES:
                raise ExportError(f"{path}: graph {role} tensor {spec.name} has unknown dtype {spec.dtype!r}")
    for name in m.referenced_files():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ExportError(f"{path}: file {name!r} lies outside the export directory")
        if name not in m.files:
            raise ExportError(f"{path} references {name} but lists no checksum for it")
    for name in m.files:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ExportError(f"{path}: file {name!r} lies outside the export directory")
