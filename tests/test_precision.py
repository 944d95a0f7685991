"""The derived fp32 bounds (tests/precision.py) stay meaningful: below MAX_BOUND on every tiny model the
suite uses, and far below what a real change to the computation does."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import rel_err, tiny_model, tiny_rmt
from tests.precision import FLOOR, MAX_BOUND, SPREAD_FACTOR, fp32_bounds, model_bound

MODELS = [("armt", "llama", {}), ("armt", "gpt2", {}), ("armt", "gpt2", {"wrap_pos": True}),
          ("rmt", "llama", {}), ("rmt", "gpt2", {"wrap_pos": True})]


def _make(kind, arch, kw):
    return (tiny_model if kind == "armt" else tiny_rmt)(arch, **kw)


@pytest.mark.parametrize("kind, arch, kw", MODELS)
def test_bounds_are_well_below_what_bugs_do(kind, arch, kw):
    model = _make(kind, arch, kw)
    bound = model_bound(model)
    assert SPREAD_FACTOR * FLOOR <= bound < MAX_BOUND, bound
    # a 1% change of one embedding row (smaller than the bugs the tests look for: a dropped read,
    # a wrong position, a stale state move results by far more)
    # moves the logits past the bound: the bound cannot hide a real difference
    ids = torch.randint(0, model.cfg.base.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        model.globals["embed"][ids[0, 0]] *= 1 + 1e-2
        moved = model(ids).logits
    assert rel_err(moved, ref) > 10 * fp32_bounds(_make(kind, arch, kw), ids)["logits"]
