"""The tensor-core memory read of fp16/bf16 opset-23 graphs (issue 10): graphs.memory.memory_read_fast.

What must hold:
  * it is used only where the exporter fuses attention (fp16/bf16, opset 23); the torch reference,
    the torch runner and fp32 exports keep graphs.memory.memory_read bit for bit;
  * rows whose memory was never written pass through bit for bit (even with non-finite A there);
  * its parity cost: over whole chains (memory fed back, 6 segments, a padded row), the fast chain's
    error against the fp32 reference stays within FAST_FACTOR x the plain half-precision chain's own
    error (per tensor kind), with the fp32 products as computed on the CPU and with them truncated
    to TF32 (what ONNX Runtime CUDA runs them as in those graphs: runtimes/loaders.py).

Why FAST_FACTOR = 4 (derived, not tuned): e_X = |X - R32| / |R32| with R32 the fp32 reference (its
own error, ~1e-6 (docs/testing.md), is far below the half-precision unit roundoff u). The fast chain
is another half-precision realisation of the same computation; it differs from the plain one only
in the read, which rounds at most 4 more times at unit u per element (h Wq, qs and A in bf16, the
product, then the sum; fp16: h Wq and the product) in a layer that already rounds >= 4 times on
the residual path (the read's sum, attention and MLP outputs, their residual adds): at most 2x the
rounding per layer. x2 more because one realisation's error measured 0.3x..2x another's of the same
size (docs/testing.md's SPREAD_FACTOR argument). Floor: u itself (a result is not expected closer
to R32 than one rounding). Measured here (3 weight seeds x 2 inputs, LLaMA and GPT-2): worst
fast/plain 2.0 (fp16), 1.9 (bf16); with TF32 truncation 2.8 (fp16), 1.5 (bf16).
"""

import contextlib
import copy
from unittest import mock

import numpy as np
import pytest
import torch

from exporter.trace import cell_module, fast_memory, memory_math
from graphs.cells import cell_for
from graphs.memory import memory_read, memory_read_fast
from tests.helpers import rel_err, same, tiny_model

WIDE = dict(num_attention_heads=2, num_key_value_heads=1)  # as tests/test_fused_export.py
FAST_FACTOR = 4.0
UNIT = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}  # unit roundoff of the compute dtype
KINDS = ("logits", "A", "z")
_matmul = torch.matmul


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 by truncation (10 explicit mantissa bits; the worse of truncation and rounding)."""
    return (x.view(torch.int32) & ~0x1FFF).view(torch.float32)


def _tf32_matmul(a, b, **kw):
    """torch.matmul whose fp32 x fp32 products take TF32 operands (fp32 accumulation), as tensor cores
    run them; other dtypes unchanged. In an fp16/bf16 model the fp32 products are exactly the memory's."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return _matmul(_tf32(a), _tf32(b), **kw)
    return _matmul(a, b, **kw)


def run_chain(model, ids, mask, fast=False, tf32=False, drop_memory=False):
    """The model's sequential loop -> {logits, A, z}; `fast`: the fast read; `tf32`: fp32 products
    with TF32 operands (_tf32_matmul); `drop_memory`: no read at all (the memory-matters probe)."""
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if fast:  # the read the fp16/bf16 graphs trace (cells(fast_memory=True)), on the model's own loop
            stack.enter_context(mock.patch("graphs.model.memory_read", memory_read_fast))
        if tf32:
            stack.enter_context(mock.patch("torch.matmul", _tf32_matmul))
        if drop_memory:
            stack.enter_context(mock.patch("graphs.model.memory_read", lambda h, *a: h))
        out = model(ids, mask, schedule="sequential")
    return {"logits": out.logits, "A": out.state.A, "z": out.state.z}


def chain_inputs(model, seed):
    """(ids (2, N), mask): 5.5 segments + 1 token; row 1 padded from inside segment 3."""
    rng = np.random.default_rng(seed)
    T = model.cfg.armt.segment_size
    N = 5 * T + T // 2 + 1
    ids = torch.from_numpy(rng.integers(0, model.cfg.base.vocab_size, (2, N)))
    mask = torch.ones(2, N, dtype=torch.int64)
    mask[1, 3 * T + 2:] = 0  # a padded row ending inside a segment
    return ids, mask


# ------------------------------------------------------------------------------ the switch
def test_fast_memory_only_in_fp16_bf16_opset_23_graphs():
    model = tiny_model("llama", seed=0, **WIDE)
    for precision, opset, on in (("fp32", 18, False), ("fp16", 23, True), ("bf16", 23, True), ("fp16", 18, False),
                                 ("bf16", 20, False)):
        assert fast_memory(precision, opset) is on
        assert memory_math(precision, opset) == (f"tensor-core-{precision}" if on else "fp32")
        for role in ("segment", "diagonal_step", "decode", "memory_write"):
            assert cell_module(model, role, precision, opset).fast_memory is on, (precision, opset, role)
    for role in ("segment", "diagonal_step", "decode", "memory_write"):
        assert cell_for(model, role).fast_memory is False  # torch runner / validation reference


# ------------------------------------------------------------------------------ one read
def _read_case(dtype, seed=0, n=2, B=3, P=7, d=32, dm=4, nu=3):
    g = torch.Generator().manual_seed(seed)
    K = 2 * nu * dm
    h = torch.randn(n, B, P, d, generator=g).to(dtype)
    w_q = 0.1 * torch.randn(n, d, dm, generator=g)
    A = 0.1 * torch.randn(n, B, K, d, generator=g)
    z = 1.0 + torch.rand(n, B, K, generator=g)
    written = torch.tensor([[True, False, True], [False, True, True]])[:n, :B]
    return h, w_q, A, z, written, nu


def test_fast_read_in_fp32_is_the_reference_bit_for_bit():
    args = _read_case(torch.float32)
    assert same(memory_read_fast(*args), memory_read(*args))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fast_read_passes_unwritten_rows_through_bit_for_bit(dtype):
    h, w_q, A, z, written, nu = _read_case(dtype)
    A = A.clone()
    A[~written] = float("nan")  # whatever an unwritten row's state holds, its slot is untouched
    z = z.clone()
    z[~written] = float("inf")
    out = memory_read_fast(h, w_q, A, z, written, nu)
    assert out.dtype == dtype and out.shape == h.shape
    assert same(out[~written], h[~written])
    assert torch.isfinite(out).all()
    assert rel_err(out[written].float() - h[written].float(), h[written].float()) > 0.01  # the read adds something


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fast_read_matches_the_fp32_read_to_the_dtype_rounding(dtype):
    """One call against memory_read on the same half-precision slot (h is exact in both), elementwise
    within the rounding model of the fast read (u = the dtype's unit roundoff):
        h Wq rounded (u) -> q = relu products (2u) -> q.z of positives (2u) -> qs = q / den (4u);
        bf16 also rounds qs and A (2u); the product qs A then errs by <= 6u (qs |A|) (signed A);
        its output is rounded (u |num|), then the sum h + num (u |h + num|)."""
    from graphs.memory import EPS, dpfp
    h, w_q, A, z, written, nu = _read_case(dtype)
    ref = memory_read(h.float(), w_q, A, z, written, nu) - h.float()  # fp32: the exact answer to ~1e-7
    got = memory_read_fast(h, w_q, A, z, written, nu).float() - h.float()
    q = dpfp(torch.matmul(h.float(), w_q[:, None]), nu)  # (n, B, P, K) >= 0
    qs = q / (torch.matmul(q, z[..., None]) + EPS)
    mag = torch.matmul(qs, A.abs()) * written[:, :, None, None]  # (n, B, P, d): |qs| |A|
    slack = UNIT[dtype] * (6 * mag + ref.abs() + (h.float() + ref).abs()) * 1.01  # 1%: the fp32 terms
    assert torch.all((got - ref).abs() <= slack), float(((got - ref).abs() - slack).max())
    assert float((got - ref).abs().max()) > 0  # not the fp32 read in disguise


# ------------------------------------------------------------------------------ whole chains
@pytest.mark.parametrize("arch,seed", [("llama", 0), ("llama", 1), ("gpt2", 0), ("gpt2", 2)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fast_memory_parity_cost_within_factor_of_the_plain_half_reference(arch, seed, dtype):
    m32 = tiny_model(arch, seed=seed, **(WIDE if arch == "llama" else {}))
    mh = copy.deepcopy(m32).cast(dtype)
    for input_seed in (0, 1):
        ids, mask = chain_inputs(m32, input_seed)
        ref = run_chain(m32, ids, mask)
        plain = run_chain(mh, ids, mask)
        bound = {k: FAST_FACTOR * max(rel_err(plain[k], ref[k]), UNIT[dtype]) for k in KINDS}
        # precondition: the memory matters beyond the bound (a fast read that read nothing would fail)
        real = mask.bool()[..., None]
        alone = run_chain(mh, ids, mask, drop_memory=True)["logits"]
        assert rel_err(alone * real, ref["logits"] * real) > bound["logits"], (arch, seed, input_seed)
        for tf32 in (False, True):
            fast = run_chain(mh, ids, mask, fast=True, tf32=tf32)
            for k in KINDS:
                assert torch.isfinite(fast[k]).all()
                err = rel_err(fast[k], ref[k])
                assert err <= bound[k], f"{arch} seed {seed} input {input_seed} {dtype} tf32={tf32} {k}: " \
                                        f"fast {err:.2e} > {FAST_FACTOR:g} x plain ({bound[k] / FAST_FACTOR:.2e})"
            assert torch.all(fast["logits"][~mask.bool()] == 0)


def test_reference_cells_are_untouched_by_the_switch():
    """The cells with fast_memory=False and the model's own loop give the same numbers as before the
    switch existed: cells(fast_memory=False) calls graphs.memory.memory_read (checked by patching it)."""
    model = tiny_model("llama", seed=0, **WIDE).cast(torch.float16)
    ids, mask = chain_inputs(model, 0)
    calls = []

    def spy(*a):
        calls.append(1)
        return memory_read(*a)

    with mock.patch("graphs.model.memory_read", spy), mock.patch("graphs.model.memory_read_fast",
                                                                  side_effect=AssertionError("fast read used")):
        with torch.no_grad():
            model(ids, mask, schedule="diagonal")
    assert calls
