"""Issue 10's targets, evaluated on one bench record (ort next to torch on the same job, one run):

    time     ONNX Runtime diagonal median / torch fast diagonal median, same tokens, batch, precision,
             logits mode: <= 1.25 (at every length benched on both; the issue names 32,768 and 131,072)
    step     one steady ORT diagonal step / the torch fast executor's: <= 1.3
    parity   per tensor, ORT's max relative error against the fp32 reference <= the plain torch
             reference's own error in that precision (the larger of its two schedules) on the same input

A target that the record holds no numbers for is listed as "not measured" (never as met).
"""

from __future__ import annotations

TIME_RATIO = 1.25
STEP_RATIO = 1.3


def _ok(row: dict) -> bool:
    return not row.get("error") and "median_ms" in row


def evaluate(record: dict) -> list[dict]:
    out: list[dict] = []
    rows = [r for r in record.get("results", []) if r.get("schedule") == "diagonal"]
    keys = sorted({(r["tokens"], r["batch"]) for r in rows})
    for tokens, batch in keys:
        def pick(backend):
            return next((r for r in rows if r["backend"] == backend and r["tokens"] == tokens
                         and r["batch"] == batch), None)
        ort, torch_ = pick("ort"), pick("torch")
        if ort is None or torch_ is None:
            continue
        t = {"target": f"ort / torch time, diagonal, {tokens} tokens, batch {batch}", "limit": TIME_RATIO}
        if _ok(ort) and _ok(torch_):
            ratio = ort["median_ms"] / torch_["median_ms"]
            t.update(value=ratio, ort_ms=ort["median_ms"], torch_ms=torch_["median_ms"], met=ratio <= TIME_RATIO)
        else:
            t.update(value=None, met=None, note=ort.get("error") or torch_.get("error"))
        out.append(t)
    steps = {s["backend"]: s for s in record.get("steady_step", []) if "step_ms" in s}
    if "ort" in steps and "torch" in steps:
        ratio = steps["ort"]["step_ms"] / steps["torch"]["step_ms"]
        out.append({"target": "ort / torch steady diagonal step", "limit": STEP_RATIO, "value": ratio,
                    "ort_ms": steps["ort"]["step_ms"], "torch_ms": steps["torch"]["step_ms"],
                    "met": ratio <= STEP_RATIO})
    parity = record.get("parity", [])
    for p in (p for p in parity if p.get("error")):
        out.append({"target": f"parity, ort {p['schedule']} vs fp32", "value": None, "limit": None, "met": None,
                    "note": p["error"]})
    parity = [p for p in parity if not p.get("error")]
    for tensor in sorted({p["tensor"] for p in parity}):
        own = [p for p in parity if p["tensor"] == tensor and p["backend"] == "torch-ref"]
        for p in (p for p in parity if p["tensor"] == tensor and p["backend"] == "ort"):
            t = {"target": f"parity {tensor}, ort {p['schedule']} vs fp32 within torch's own "
                           f"{p['precision']} error", "value": p["max_rel"]}
            if p["precision"] == "fp32":
                t.update(limit=None, met=None, note="fp32: the target is for fp16/bf16 (fp32 parity: armt verify)")
            elif not own:
                t.update(limit=None, met=None, note="no torch-ref row to compare with")
            else:
                limit = max(o["max_rel"] for o in own)
                t.update(limit=limit, met=bool(p["finite"]) and p["max_rel"] <= limit)
            out.append(t)
    return out


def table(targets: list[dict]) -> str:
    head = f"{'target':<72} {'value':>9} {'limit':>9}  result"
    lines = [head, "-" * len(head)]
    for t in targets:
        v = "-" if t.get("value") is None else (f"{t['value']:.3g}" if t["value"] < 0.1 else f"{t['value']:.3f}")
        lim = "-" if t.get("limit") is None else (f"{t['limit']:.3g}" if t["limit"] < 0.1 else f"{t['limit']:.3f}")
        res = {True: "met", False: "MISSED", None: "not measured"}[t.get("met")]
        lines.append(f"{t['target']:<72} {v:>9} {lim:>9}  {res}" + (f" ({t['note']})" if t.get("note") else ""))
    return "\n".join(lines)
