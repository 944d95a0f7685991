"""Parity bounds: ONE table keyed by (precision, tensor kind), and the comparison that applies it.

Reference: the PyTorch model cast to the same precision (ArmtModel.cast: layers/embeddings/head in
that dtype, memory weights and state fp32), run by the same cell calls. Metrics per tensor:

    max_abs  = max |got - ref|
    rel      = max |got - ref| / max |ref|                   (bounded by Bound.rel)
    q_rel    = quantile_0.999 |got - ref| / max |ref|        (bounded by Bound.q_rel)

Only entries that carry meaning are compared (GraphContract.output_mask, graphs/contracts.py: no padding places, no
ended rows, no idle layers). NaN or Inf in `got` (where `ref` is finite) never passes. Bool tensors (`written`) must be equal.
Kinds: logits, hidden (final-norm output), hidden_out (the diagonal step's carried hidden, compute
dtype), A and z (memory state, fp32 in every precision), memory (an RMT's carried memory: a final-norm
hidden state in the compute dtype, fed back as the next segment's embeddings), written.

How the numbers were set (docs/exporter.md, "Bounds"), reference = torch at the same precision:
  fp32  the project's 1e-5 promise; measured export errors are ~1e-7..1e-6.
  fp16  measured ONNX Runtime CPU vs torch CPU over whole 3-segment chains (memory fed back) on tiny
        and small (d 256, 4 layers) LLaMA and GPT-2(wrap_pos) models (tiny: 3 weight seeds, small: 1) x 3 input seeds:
        worst rel 9.8e-3 (A), 7.9e-3 (z), 6.8e-3 (logits); worst q99.9 7.1e-3. Bounds = ~3x / ~2x that.
        RMT `memory` (same row): `armt verify`'s generated cases x 3 input seeds on tiny LLaMA / GPT-2
        wrap_pos RMTs (3 weight seeds), the 3 official RMT fixtures and small (d 256) RMTs: worst rel
        5.9e-3 (memory), 6.0e-3 (logits); q99.9 < 6e-3 (docs/exporter.md, "Bounds").
  bf16  8x the fp16 bounds: bf16's unit roundoff is 8x fp16's, and torch bf16-vs-fp32 errors measured
        5-13x the fp16-vs-fp32 ones on the same models. Not measured backend-vs-torch: ONNX Runtime
        CPU has no bf16 kernels, so bf16 export validation reports "not run".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

KINDS = ("logits", "hidden", "hidden_out", "A", "z", "memory", "written")
QUANTILE = 0.999


@dataclass(frozen=True)
class Bound:
    rel: float
    q_rel: float
    atol: float = 0.0  # absolute slack: passes when err <= atol + rel * max|ref| (0 in the table)
    given: bool = False  # set on the command line (`armt verify --rtol/--atol/--bound`), never widened

    def label(self) -> str:
        text = f"{self.rel:.1e}/{self.q_rel:.1e}" + (f"+{self.atol:.1e}abs" if self.atol else "")
        return text + (" (set)" if self.given else "")

    def passes(self, rel: float, q_rel: float, scale: float) -> bool:
        """rel, q_rel: the errors relative to max|ref| = scale (see the module docstring)."""
        if not self.atol:
            return rel <= self.rel and q_rel <= self.q_rel
        return rel * scale <= self.atol + self.rel * scale and q_rel * scale <= self.atol + self.q_rel * scale


_FP32 = Bound(rel=1e-5, q_rel=1e-5)
_FP16 = {k: Bound(rel=3e-2, q_rel=1.5e-2) for k in ("logits", "hidden", "hidden_out", "A", "z", "memory")}
_BF16 = {k: Bound(b.rel * 8, b.q_rel * 8) for k, b in _FP16.items()}
_EXACT = Bound(0.0, 0.0)

BOUNDS: dict[tuple[str, str], Bound] = {
    **{("fp32", k): _FP32 for k in KINDS if k != "written"},
    **{("fp16", k): b for k, b in _FP16.items()},
    **{("bf16", k): b for k, b in _BF16.items()},
    **{(p, "written"): _EXACT for p in ("fp32", "fp16", "bf16")},
}


def bound_for(precision: str, kind: str) -> Bound:
    try:
        return BOUNDS[(precision, kind)]
    except KeyError:
        raise KeyError(f"no parity bound for precision {precision!r} and tensor kind {kind!r}") from None


@dataclass(frozen=True)
class Comparison:
    name: str
    kind: str
    max_abs: float
    rel: float
    q_rel: float
    bound: Bound
    ok: bool
    note: str = ""

    def row(self) -> list[str]:
        return [self.name, f"{self.max_abs:.3e}", f"{self.rel:.3e}", f"{self.q_rel:.3e}",
                f"{self.bound.rel:.2g}/{self.bound.q_rel:.2g}", "ok" if self.ok else "MISS"]


def given_bounds(precision: str, rtol: float | None = None, atol: float | None = None,
                 per_kind: dict[str, tuple[float, float]] | None = None) -> dict[str, Bound]:
    """The bounds of `precision` with command-line overrides applied (only the kinds they change):
    `rtol` sets rel and q99.9 rel of every float kind, `atol` adds absolute slack to every float kind,
    `per_kind` {kind: (rel, q_rel)} sets one kind (after `rtol`). Exact kinds (`written`) stay exact."""
    out: dict[str, Bound] = {}
    for kind in KINDS:
        base = BOUNDS.get((precision, kind))
        if base is None or base.rel == 0:
            continue
        b = base
        if rtol is not None:
            b = dataclasses.replace(b, rel=rtol, q_rel=rtol, given=True)
        if per_kind and kind in per_kind:
            b = dataclasses.replace(b, rel=per_kind[kind][0], q_rel=per_kind[kind][1], given=True)
        if atol is not None:
            b = dataclasses.replace(b, atol=atol, given=True)
        if b.given:
            out[kind] = b
    return out


def parse_bound(text: str) -> tuple[str, tuple[float, float]]:
    """`KIND=REL` or `KIND=REL/Q` (command line) -> (kind, (rel, q_rel)); ValueError with the reason."""
    kind, sep, value = text.partition("=")
    kind = kind.strip()
    floats = [k for k in KINDS if k != "written"]
    if not sep or kind not in floats:
        raise ValueError(f"--bound {text!r}: expected KIND=REL or KIND=REL/Q with KIND one of {', '.join(floats)}")
    try:
        parts = [float(v) for v in value.split("/")]
    except ValueError:
        raise ValueError(f"--bound {text!r}: {value!r} is not a number (or REL/Q)") from None
    if len(parts) not in (1, 2) or not all(math.isfinite(v) and v >= 0 for v in parts):
        raise ValueError(f"--bound {text!r}: expected one or two finite numbers >= 0")
    return kind, (parts[0], parts[-1])


def compare(name: str, kind: str, precision: str, got, ref, mask=None,
            bounds: dict[str, Bound] | None = None) -> Comparison:
    """Compare one output (numpy arrays or torch tensors) against its reference under the table
    (or `bounds[kind]` where given: see given_bounds).

    `mask` (bool, broadcastable to the output; see GraphContract.output_mask, graphs/contracts.py) limits the comparison
    to the entries that carry meaning; None compares everything."""
    got, ref = _np(got), _np(ref)
    bound = bounds[kind] if bounds and kind in bounds else bound_for(precision, kind)
    if got.shape != ref.shape:
        return Comparison(name, kind, math.inf, math.inf, math.inf, bound, False,
                          f"shape {got.shape} != reference {ref.shape}")
    if mask is not None:
        mask = np.broadcast_to(_np(mask).astype(bool), got.shape)
        got, ref = got[mask], ref[mask]
    if ref.dtype == np.bool_ or got.dtype == np.bool_:
        diff = int(np.count_nonzero(got.astype(bool) != ref.astype(bool)))
        return Comparison(name, kind, float(diff), float(diff), float(diff), bound, diff == 0,
                          f"{diff} mismatching flags" if diff else "")
    g, r = got.astype(np.float64), ref.astype(np.float64)
    if not np.isfinite(r).all():
        return Comparison(name, kind, math.inf, math.inf, math.inf, bound, False, "reference is not finite")
    if not np.isfinite(g).all():
        return Comparison(name, kind, math.inf, math.inf, math.inf, bound, False, "NaN/Inf in output")
    if g.size == 0:
        return Comparison(name, kind, 0.0, 0.0, 0.0, bound, True)
    err = np.abs(g - r)
    scale = max(float(np.abs(r).max()), 1e-30)
    max_abs = float(err.max())
    rel = max_abs / scale
    q_rel = float(np.quantile(err, QUANTILE)) / scale
    return Comparison(name, kind, max_abs, rel, q_rel, bound, bound.passes(rel, q_rel, scale))


# Conditioning: the memory update can amplify rounding (k.z + eps denominators, the gamma clamp), so on
# some inputs two equally valid torch implementations at one precision differ by more than the table
# allows (official LLaMA fixture, fp32: plain vs fused attention differ by A rel ~3e-5; the exported
# graph on ONNX Runtime by the same). A comparison may therefore use the table bound widened to
# NOISE_FACTOR x the reference's own spread (`noise`: the reference vs its fused-attention twin on the
# same inputs), never more than NOISE_CAP x the table bound. runtimes/verify.py applies the same rule.
NOISE_FACTOR = 4.0
NOISE_CAP = 5.0


def widen(c: Comparison, noise: Comparison | None, describe: bool = True) -> Comparison:
    """`c` judged against its bound widened by the reference's own spread (see NOISE_FACTOR). Exact
    (bool) tensors, failed shape/NaN checks and a non-finite spread are never widened. `describe`
    puts the widening into the comparison's note (tables that mark it otherwise pass False)."""
    b = c.bound
    if (noise is None or b.rel == 0 or b.given or c.note
            or not (math.isfinite(noise.rel) and math.isfinite(noise.q_rel))):
        return c
    eff = dataclasses.replace(b, rel=min(max(b.rel, NOISE_FACTOR * noise.rel), NOISE_CAP * b.rel),
                              q_rel=min(max(b.q_rel, NOISE_FACTOR * noise.q_rel), NOISE_CAP * b.q_rel))
    if eff == b:
        return c
    note = f"bound widened: reference spread rel {noise.rel:.1e}" if describe else c.note
    return dataclasses.replace(c, bound=eff, ok=c.rel <= eff.rel and c.q_rel <= eff.q_rel, note=note)


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def format_table(rows: list[Comparison], title: str = "") -> str:
    """A fixed-width table: output, max abs, rel, q99.9 rel, bound (rel/q), ok."""
    head = ["output", "max abs", "rel", "q99.9 rel", "bound", "ok"]
    body = [c.row() for c in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for c, r in zip(rows, body):
        line = "  ".join(v.ljust(w) for v, w in zip(r, widths))
        lines.append(line + (f"  ({c.note})" if c.note else ""))
    return "\n".join(lines)
