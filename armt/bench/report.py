"""The bench record: JSON (written atomically), a printed table, a PNG plot (matplotlib, lazily)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from graphs.atomic import atomic_write_bytes
from graphs.errors import BackendUnavailable

MiB = 2 ** 20


def json_bytes(record: dict) -> bytes:
    return (json.dumps(record, indent=1, allow_nan=True) + "\n").encode()


def write_json(path: str | Path, record: dict) -> None:
    atomic_write_bytes(Path(path), json_bytes(record))


def table(rows: list[dict]) -> str:
    head = f"{'backend':<10} {'schedule':<11} {'tokens':>9} {'batch':>5} {'median ms':>11} {'tokens/s':>12} " \
           f"{'peak MiB':>9}  notes"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['backend']:<10} {r['schedule']:<11} {r['tokens']:>9} {r['batch']:>5} "
                         f"{'-':>11} {'-':>12} {'-':>9}  {r['error']}")
            continue
        peak = f"{r['peak_bytes'] / MiB:.0f}" if r.get("peak_bytes") is not None else "-"
        note = "non-finite: " + ",".join(r["nonfinite"]) if r["nonfinite"] else ""
        if r.get("cuda_graph") is not None:
            note = (note + "; " if note else "") + ("CUDA graphs" if r["cuda_graph"] else "no CUDA graphs")
        lines.append(f"{r['backend']:<10} {r['schedule']:<11} {r['tokens']:>9} {r['batch']:>5} "
                     f"{r['median_ms']:>11.2f} {r['tokens_per_s']:>12.0f} {peak:>9}  {note}")
    return "\n".join(lines)


def step_table(rows: list[dict]) -> str:
    head = f"{'backend':<10} {'steady diagonal step ms':>24}  notes"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['backend']:<10} {'-':>24}  {r['error']}")
            continue
        note = "" if r.get("cuda_graph") is None else ("CUDA graphs" if r["cuda_graph"] else
                                                        f"no CUDA graphs: {r.get('cuda_graph_off_reason')}")
        variants = {k: v for k, v in (r.get("graph_variants") or {}).items() if v}
        if variants:  # which graph variant the steady calls ran (causal on full slots, masked otherwise)
            note = (note + "; " if note else "") + ", ".join(f"{k} {v}" for k, v in sorted(variants.items()))
        lines.append(f"{r['backend']:<10} {r['step_ms']:>24.3f}  {note}")
    return "\n".join(lines)


def parity_table(rows: list[dict]) -> str:
    head = f"{'backend':<10} {'schedule':<11} {'tensor':<11} {'max rel':>10} {'norm rel':>10}  (vs fp32 sequential reference)"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['backend']:<10} {r['schedule']:<11} {r['tensor']:<11} {'-':>10} {'-':>10}  {r['error']}")
            continue
        lines.append(f"{r['backend']:<10} {r['schedule']:<11} {r['tensor']:<11} {r['max_rel']:>10.2e} "
                     f"{r['norm_rel']:>10.2e}" + ("" if r["finite"] else "  NON-FINITE"))
    return "\n".join(lines)


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend, or BackendUnavailable (exit 3)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BackendUnavailable("--plot needs matplotlib (pip install 'armt-deploy[plot]')") from None
    return plt


def plot(path: str | Path, record: dict) -> None:
    atomic_write_bytes(Path(path), plot_bytes(record))


def plot_bytes(record: dict) -> bytes:
    """PNG: time and peak memory against length, one line per (backend, schedule, batch); log-log."""
    plt = require_matplotlib()
    rows = [r for r in record["results"] if not r.get("error")]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = sorted({(r["backend"], r["schedule"], r["batch"]) for r in rows})
    for key in keys:
        pts = sorted((r["tokens"], r["median_ms"], r.get("peak_bytes")) for r in rows
                     if (r["backend"], r["schedule"], r["batch"]) == key)
        label = f"{key[0]} {key[1]}" + (f" B={key[2]}" if key[2] != 1 else "")
        ax_t.plot([p[0] for p in pts], [p[1] / 1e3 for p in pts], marker="o", label=label)
        mem = [(p[0], p[2] / 2 ** 30) for p in pts if p[2] is not None]
        if mem:
            ax_m.plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=label)
    meta = record["meta"]
    title = f"{meta['model']} {meta['precision']} on {meta['device_name']}"
    for ax, ylabel in ((ax_t, "time (s)"), (ax_m, "peak device memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(title, fontsize=9)
    ax_t.set_yscale("log")
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
