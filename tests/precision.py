"""fp32 bounds for tests, derived from what the computation guarantees on each case (issue 12).

A test that compares an fp32 result X (a runner, a schedule, an export, a resumed run) with the fp32
torch reference R cannot use one fixed number: how far two correct fp32 realisations of the same
computation drift apart depends on the case's conditioning (the memory's k.z + eps denominators and
the gamma clamp amplify rounding), and on the machine's kernels (SIMD width, summation order). So
each bound is measured on the case itself:

    e_R   = rel error of the fp32 reference against a float64 computation of the same case
            (ARMT: tests/reference64.py, an independent numpy re-derivation of the equations;
             RMT: the same graphs/ math run on a float64 copy of the weights)
    bound = SPREAD_FACTOR * max(e_R, FLOOR)

Why SPREAD_FACTOR = 8: |X - R| <= |X - exact| + |R - exact|. |R - exact| = e_R is measured here;
|X - exact| is another fp32 realisation of the same computation, of the same order but with its own
summation order: an independent fp32 realisation (reference64 in numpy fp32 vs torch fp32) measured
0.3x..2x e_R on the tiny models (docs/testing.md), so allow 3x: 1 + 3 = 4; and x2 because e_R itself
is measured on this machine's kernels and another machine's realise a different rounding of the same
size. FLOOR: a case whose rounding happens to cancel (e_R near 0) still allows the rounding of a
length-16 fp32 sum (16 u); no fp32 result here is expected to be closer than that.

Bugs the tests exist for (a missing read, a wrong position, a dropped correction, a stale state)
move results by > 1e-3 relative, >= 10x every bound measured here (tests/test_precision.py checks
that the bounds stay below MAX_BOUND, so a case cannot drift into one that nothing fails).
"""

from __future__ import annotations

import copy
from unittest import mock

import numpy as np
import torch

from tests.helpers import rel_err

U32 = 2.0 ** -24  # fp32 unit roundoff
SPREAD_FACTOR = 8.0
FLOOR = 16 * U32  # 9.5e-7
MAX_BOUND = 1e-4  # a derived bound above this means an ill-conditioned test case: fix the case

_CACHE: dict[tuple, dict[str, float]] = {}


def bound_from_error(reference_error: float) -> float:
    """The fp32 bound for X vs the fp32 reference, given the reference's own error against float64."""
    return SPREAD_FACTOR * max(reference_error, FLOOR)


def _mask(ids: torch.Tensor, lengths) -> torch.Tensor | None:
    if lengths is None:
        return None
    return (torch.arange(ids.shape[1])[None, :] < torch.as_tensor(lengths)[:, None]).to(torch.int64)


def armt_reference_errors(model, ids, lengths=None, schedule: str = "sequential") -> dict[str, float]:
    """Rel error per tensor kind of the fp32 ArmtModel against tests/reference64.py in float64."""
    from tests.reference64 import reference_batch
    ids = torch.as_tensor(ids)
    with torch.no_grad():
        out = model(ids, attention_mask=_mask(ids, lengths), schedule=schedule)
    ref = reference_batch(model, ids, lengths)
    got = {"logits": out.logits, "hidden": out.hidden, "A": out.state.A, "z": out.state.z}
    return {k: rel_err(v, torch.from_numpy(ref[k])) for k, v in got.items()}


def rmt_reference_errors(model, ids, lengths=None) -> dict[str, float]:
    """Rel error per tensor kind of the fp32 RmtModel against the same model run in float64.

    The RMT state check refuses float64 memory (no product path makes one); the float64 twin skips it."""
    from graphs.state import RmtState
    ids = torch.as_tensor(ids)
    twin = copy.deepcopy(model).cast(torch.float64)
    with torch.no_grad():
        out = model(ids, attention_mask=_mask(ids, lengths))
        with mock.patch.object(RmtState, "check_fits", lambda *a, **k: None):
            ref = twin(ids, attention_mask=_mask(ids, lengths))
    return {"logits": rel_err(out.logits, ref.logits), "hidden": rel_err(out.hidden, ref.hidden),
            "memory": rel_err(out.state.memory, ref.state.memory)}


def fp32_bounds(model, ids, lengths=None) -> dict[str, float]:
    """Per tensor kind (logits, hidden, A, z or memory): the bound for an fp32 result on this model and
    these inputs against the fp32 torch reference. `hidden_out`/`last_hidden` use `hidden`."""
    ids = torch.as_tensor(ids)
    key = (model.model_id(), model.cfg, ids.numpy().tobytes(), tuple(ids.shape),
           None if lengths is None else tuple(int(n) for n in lengths))
    if key not in _CACHE:
        errors = (rmt_reference_errors(model, ids, lengths) if model.cfg.kind == "rmt"
                  else armt_reference_errors(model, ids, lengths))
        _CACHE[key] = {k: bound_from_error(e) for k, e in errors.items()}
    return dict(_CACHE[key])


def fp32_bound(model, ids, lengths=None) -> float:
    """One bound for every tensor of the case: the largest of fp32_bounds."""
    return max(fp32_bounds(model, ids, lengths).values())


def bound_from_realisations(independent_error: float) -> float:
    """The bound for the fp32 model against a float64 re-derivation, given the error of an independent
    fp32 realisation of the same equations (tests/reference64.py in numpy fp32): both are fp32
    roundings of one computation, so the same SPREAD_FACTOR applies."""
    return bound_from_error(independent_error)


def numpy_fp32_errors(model, ids, lengths=None) -> dict[str, float]:
    """Rel error per kind of reference64 run in numpy fp32 against reference64 in float64."""
    from tests.reference64 import reference_batch
    r32 = reference_batch(model, ids, lengths, dtype=np.float32)
    r64 = reference_batch(model, ids, lengths)
    return {k: rel_err(torch.from_numpy(r32[k]), torch.from_numpy(r64[k])) for k in r64}


def model_bound(model, batch: int = 2, segments: int = 5) -> float:
    """One fp32 bound for a test module's model, derived on probe inputs of that model: a full row of
    `segments` segments and a half (the last segment short), and a padded row ending one token into
    a segment; every tensor kind (the largest of fp32_bounds). For tests whose inputs are of this kind
    (random tokens, a few segments); a test with a special case derives its bound with fp32_bounds."""
    T = model.cfg.armt.segment_size  # the wrapper settings of either kind
    N = segments * T + T // 2
    ids = torch.randint(0, model.cfg.base.vocab_size, (batch, N), generator=torch.Generator().manual_seed(12))
    lengths = [N] + [N - T - 1] * (batch - 1)
    return fp32_bound(model, ids, lengths)


class LazyBound:
    """A module's fp32 bound, derived on first use (not at import: collection stays fast) from
    `derive()` (e.g. the largest model_bound over the module's models). Compares and scales like the
    float it stands for: `err < TOL`, `x > 100 * TOL`."""

    def __init__(self, derive):
        self._derive, self._value = derive, None

    def __float__(self) -> float:
        if self._value is None:
            self._value = float(self._derive())
        return self._value

    def __gt__(self, other) -> bool:
        return float(self) > other

    def __lt__(self, other) -> bool:
        return float(self) < other

    def __ge__(self, other) -> bool:
        return float(self) >= other

    def __le__(self, other) -> bool:
        return float(self) <= other

    def __mul__(self, other) -> float:
        return float(self) * other

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"LazyBound({float(self):.2e})"
