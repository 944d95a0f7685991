"""`armt inspect`: what an export directory holds, as plain-text tables."""

from __future__ import annotations

from pathlib import Path

from exporter.manifest import Manifest, check_export, load_manifest
from graphs.errors import ArmtError


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e4 else f"{n} B"


def _shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return out


FUSED_OPS = ("Attention", "RMSNormalization", "RotaryEmbedding")  # the opset-23 fused standard ops (issue 10)


def fused_ops(op_counts: dict[str, int], attention: str = "") -> str:
    """The fused standard ops a graph holds, with counts ("-": none, attention written out of primitives);
    Attention with its masking: "(causal)" is_causal without a mask, "(masked)" the explicit slot mask."""
    held = [f"{op} {op_counts[op]}" + (f" ({attention})" if op == "Attention" and attention else "")
            for op in FUSED_OPS if op_counts.get(op)]
    return ", ".join(held) or "-"


def describe(manifest: Manifest, top_ops: int = 8) -> str:
    m = manifest
    cfg = m.model_config()
    a = cfg.armt
    wrapper = (f"RMT segment {a.segment_size}, {a.num_mem_tokens} memory tokens (memory ({a.num_mem_tokens}, "
               f"{cfg.base.d_model}) per row; sequential schedule only)" if cfg.kind == "rmt" else
               f"ARMT segment {a.segment_size}, {a.num_mem_tokens} memory tokens, d_mem {a.d_mem} (K = {a.d_key})")
    lines = [f"export {m.root}  (format {m.format_version}, {m.precision}, opset {m.opset})",
             f"model: {cfg.base.architecture}, {cfg.base.n_layers} layers, d_model {cfg.base.d_model}, vocab "
             f"{cfg.base.vocab_size}; {wrapper}{', wrap_pos' if a.wrap_pos else ''}",
             f"memory math: {m.memory_math}" + (" (ONNX Runtime CUDA: TF32 on)" if m.tf32 else ""),
             "versions: " + ", ".join(f"{k} {v}" for k, v in m.versions.items()),
             f"validation: {m.validation.get('status', 'unknown')}"
             + (f" ({m.validation['reason']})" if m.validation.get("reason") else ""), ""]
    rows = []
    for role, g in m.graphs.items():
        nodes = sum(g.op_counts.values())
        ops = ", ".join(f"{k} {v}" for k, v in sorted(g.op_counts.items(), key=lambda kv: -kv[1])[:top_ops])
        data = ", ".join(f"{f} {_mb(m.files[f].bytes)}" for f in g.data_files if f in m.files)
        rows.append([role, g.file, _mb(m.files[g.file].bytes), data, str(nodes), fused_ops(g.op_counts, g.attention), ops])
    lines += _table(["graph", "file", "size", "external data", "nodes", "fused ops", "top ops"], rows)
    for role, g in m.graphs.items():
        lines += ["", f"{role} inputs / outputs:"]
        lines += _table(["", "name", "dtype", "shape"],
                        [["in", t.name, t.dtype, _shape(t.shape)] for t in g.inputs]
                        + [["out", t.name, t.dtype, _shape(t.shape)] for t in g.outputs])
    engines = [[role, e.file, _mb(m.files[e.file].bytes) if e.file in m.files else "?",
                f"{e.builder} {e.builder_version}", ",".join(e.compute_capability) or "default",
                "; ".join(f"batch {p['input_ids'].min[0]}..{p['input_ids'].max[0]}, width "
                          f"{p['input_ids'].min[1]}..{p['input_ids'].max[1]}" for p in e.profiles if "input_ids" in p)]
               for role, g in m.graphs.items() for e in g.engines]
    lines.append("")
    if engines:
        lines += _table(["engine of", "file", "size", "builder", "compute cap.", "profile"], engines)
    else:
        lines.append("engines: none (run `armt build`)")
    other = [f for f in m.files if f not in {x for g in m.graphs.values() for x in g.files}]
    if other:
        lines += ["", "other files: " + ", ".join(f"{f} {_mb(m.files[f].bytes)}" for f in other)]
    lines.append(f"total: {_mb(sum(r.bytes for r in m.files.values()))}")
    return "\n".join(lines)


def stale_lines(export_dir: str | Path) -> list[str]:
    """Staging entries an interrupted write left beside the export (graphs.atomic.stale_entries)."""
    from graphs.atomic import stale_entries
    return [f"stale: {p} (left by an interrupted write; the next export to {Path(export_dir).name} removes it)"
            for p in stale_entries(export_dir)]


def inspect_export(export_dir: str | Path, verify_checksums: bool = False) -> tuple[str, list[str]]:
    """(the description, problems). Without `verify_checksums` a problem raises (one line, as every
    loader does); with it every file's sha256 and every manifest field against its graphs is checked
    and each problem is listed (exporter.manifest.check_export)."""
    if not verify_checksums:
        text = describe(load_manifest(export_dir, verify_checksums=False))
        return "\n".join([text, *stale_lines(export_dir)]), []
    manifest, problems = check_export(export_dir)
    try:
        head = describe(manifest)
    except ArmtError as exc:  # an edited config that no longer parses: still list what disagrees
        head = f"export {manifest.root}  (format {manifest.format_version}, {manifest.precision}): not described ({exc})"
    lines = [head, *stale_lines(export_dir), ""]
    if problems:
        lines += [f"check: {len(problems)} problem(s):"] + [f"  {what}: {line}" for what, line in problems]
    else:
        lines.append(f"check: every file's sha256 and every manifest field (config, armt config, dims, model id, "
                     f"precision, graphs) agree with what the {len(manifest.graphs)} graphs record")
    return "\n".join(lines), [line for _, line in problems]


def inspect_data(export_dir: str | Path, verify_checksums: bool = False) -> dict:
    """What `describe` shows, as plain data (`armt inspect --json`), plus the stale leftovers and, with
    `verify_checksums`, the problems check_export lists (an empty list: every check agreed)."""
    if verify_checksums:
        manifest, found = check_export(export_dir)
        problems = [{"what": what, "problem": line} for what, line in found]
    else:
        manifest, problems = load_manifest(export_dir, verify_checksums=False), None
    m = manifest
    try:
        cfg = m.model_config()
        a = cfg.armt
        model = {"kind": cfg.kind, "architecture": cfg.base.architecture, "layers": cfg.base.n_layers,
                 "d_model": cfg.base.d_model, "vocab_size": cfg.base.vocab_size, "segment_size": a.segment_size,
                 "memory_tokens": a.num_mem_tokens, "d_mem": getattr(a, "d_mem", None), "wrap_pos": a.wrap_pos,
                 "model_id": m.model_id}
    except ArmtError as exc:  # an edited config that no longer parses (the problems say why)
        model = {"error": str(exc)}
    graphs = {}
    for role, g in m.graphs.items():
        graphs[role] = {
            "file": g.file, "bytes": m.files[g.file].bytes if g.file in m.files else None,
            "data_files": {f: m.files[f].bytes for f in g.data_files if f in m.files},
            "nodes": sum(g.op_counts.values()), "op_counts": dict(g.op_counts), "attention": g.attention,
            "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in g.inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in g.outputs],
            "engines": [{"file": e.file, "bytes": m.files[e.file].bytes if e.file in m.files else None,
                         "builder": e.builder, "builder_version": e.builder_version,
                         "compute_capability": list(e.compute_capability)} for e in g.engines]}
    from graphs.atomic import stale_entries
    return {"export_dir": str(m.root), "format_version": m.format_version, "precision": m.precision,
            "opset": m.opset, "versions": dict(m.versions), "validation": m.validation.get("status", "unknown"),
            "model": model, "graphs": graphs, "files": {f: r.bytes for f, r in m.files.items()},
            "total_bytes": sum(r.bytes for r in m.files.values()),
            "stale": [str(x) for x in stale_entries(export_dir)], "problems": problems}
