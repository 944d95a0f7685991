"""Logits on demand (issue 10): the lm_head graph role, step graphs that output hidden states only,
`collect` = logits | last_logits | hidden | nothing, and `armt run --logits all|last|none --hidden-out`.

The reference for every check is the same backend's (B, N, V) logits of the same run: the last
logits of row b must be its logits at its last real position of the call (bit for bit on torch,
which runs the same arithmetic on fewer rows; within the fp32 bound on ONNX Runtime, whose GEMM
blocking may change with the row count). The ARMT export is the official LLaMA fixture shared
with test_runtime_ort.py (one export per test process); the RMT's are in test_rmt_ort.py."""

import numpy as np
import pytest
import torch

from armt.cli import main
from exporter.bounds import compare
from exporter.manifest import load_manifest
from graphs.contracts import LM_HEAD, contract, role_for, roles_of, step_roles_of
from graphs.errors import InputError
from runtimes.execute import collect_for, run_schedule
from runtimes.ort_runner import OrtRunner
from runtimes.torch_runner import TorchRunner, run_torch
from tests.helpers import rel_err, tiny_model, tiny_rmt
from tests.test_runtime_ort import exported

FP32 = 1e-5  # fp32 relative bound of the per-position logits (exporter/bounds.py's fp32 row is the same order)


def _batch(V, B=3, N=17, seed=0):
    """Right-padded rows of different lengths: a full row, one ending inside segment 1, one inside segment 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, N)).astype(np.int64)
    lengths = np.array([N, 10, 4][:B])
    mask = (np.arange(N)[None] < lengths[:, None]).astype(np.int64)
    return ids, mask, lengths


def _last_of(logits, lengths):
    return np.stack([logits[b, n - 1] for b, n in enumerate(lengths)])  # (B, V)


# ------------------------------------------------------------------------------------------ contracts
def test_step_graphs_output_no_logits_and_lm_head_is_a_role_of_both_kinds():
    for model in (tiny_model("llama"), tiny_rmt("llama")):
        cfg = model.cfg
        assert roles_of(cfg)[-1] == LM_HEAD and LM_HEAD not in step_roles_of(cfg)
        for role in step_roles_of(cfg):
            c = contract(cfg, role, "fp16")
            assert "logits" not in c.output_names and c.output("hidden").dtype == "float32"
        head = contract(cfg, LM_HEAD, "fp16")
        assert head.schedule is None and head.recurrent == {}
        assert head.input_names == ("hidden",) and head.output("logits").shape == ("batch", "rows", cfg.base.vocab_size)


def test_collect_for_modes():
    assert collect_for("all") == ("logits",)
    assert collect_for("last", hidden=True) == ("last_logits", "hidden")
    assert collect_for("none") == ()
    with pytest.raises(InputError):
        collect_for("first")


# ------------------------------------------------------------------------------------------ torch
@pytest.mark.parametrize("kind,schedule", [("armt", "sequential"), ("armt", "diagonal"), ("rmt", "sequential")])
def test_torch_last_logits_are_the_last_real_positions(kind, schedule):
    model = tiny_model("llama") if kind == "armt" else tiny_rmt("llama")
    ids, mask, lengths = _batch(model.cfg.base.vocab_size)
    with TorchRunner(model, role_for(model.cfg, schedule)) as runner:
        full = run_schedule(runner, ids, mask, collect=("logits", "hidden"))
        last = run_schedule(runner, ids, mask, collect=("last_logits",))
        none = run_schedule(runner, ids, mask, collect=())
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), torch.from_numpy(mask))
    assert rel_err(full.logits, ref.logits) < FP32 and rel_err(full.hidden, ref.hidden) < FP32
    assert last.logits is None and last.hidden is None and none.logits is None and none.last_logits is None
    assert np.array_equal(last.last_index, lengths - 1)
    assert rel_err(last.last_logits, _last_of(full.logits, lengths)) < FP32
    for a, b in ((last.state, full.state), (none.state, full.state)):  # what is collected changes no state
        for name, t in a.tensors().items():
            assert np.array_equal(t, getattr(b, name)), name


@pytest.mark.parametrize("schedule", ["sequential", "diagonal"])
def test_run_torch_last_logits_fast_executor_and_resume(schedule):
    """run_torch (the fast executor: rows of equal length) and a resumed call: the last logits of the
    second call are those of one uncut call at its last position; a row without tokens gets zeros."""
    model = tiny_model("llama")
    ids = np.random.default_rng(3).integers(0, model.cfg.base.vocab_size, (2, 20)).astype(np.int64)
    one = run_torch(model, ids, schedule=schedule, collect=("logits", "last_logits"))
    assert rel_err(one.last_logits, one.logits[:, -1]) < FP32
    first = run_torch(model, ids[:, :8], schedule=schedule, collect=("last_logits",))
    rest = run_torch(model, ids[:, 8:], state=first.state, schedule=schedule, collect=("last_logits", "hidden"))
    assert rel_err(first.last_logits, one.logits[:, 7]) < FP32
    assert rel_err(rest.last_logits, one.logits[:, -1]) < FP32 and np.array_equal(rest.last_index, [11, 11])
    # a resumed call where row 1 brings no tokens (reference cells: rows of different lengths)
    mask = np.ones((2, 12), np.int64)
    mask[1] = 0
    part = run_torch(model, ids[:, 8:], mask, state=first.state, schedule=schedule, collect=("last_logits",))
    assert np.array_equal(part.last_index, [11, -1]) and not part.last_logits[1].any()
    assert rel_err(part.last_logits[0], one.logits[0, -1]) < FP32


def test_run_torch_refuses_unknown_collect():
    model = tiny_model("llama")
    with pytest.raises(InputError, match="cannot collect"):
        run_torch(model, np.zeros((1, 4), np.int64), collect=("logit",))


# ------------------------------------------------------------------------------------------ ONNX Runtime
def test_export_holds_an_lm_head_graph():
    export_dir, _ = exported("llama")
    m = load_manifest(export_dir)
    assert set(m.graphs) == {"segment", "diagonal_step", "lm_head"}
    assert [s.name for s in m.graph("lm_head").outputs] == ["logits"]
    assert "logits" not in [s.name for s in m.graph("diagonal_step").outputs]


@pytest.mark.parametrize("role", ["segment", "diagonal_step"])
def test_ort_logits_on_demand_match_torch(role):
    export_dir, model_dir = exported("llama")
    from graphs.modeldir import load_model_dir
    model = load_model_dir(model_dir)
    ids, mask, lengths = _batch(model.cfg.base.vocab_size, N=23)
    with TorchRunner(model, role) as t:
        want = run_schedule(t, ids, mask, collect=("logits", "hidden"))
    with OrtRunner(export_dir, role) as runner, OrtRunner(export_dir, LM_HEAD) as head:
        full = run_schedule(runner, ids, mask, collect=("logits", "hidden"), head=head)
        last = run_schedule(runner, ids, mask, collect=("last_logits",), head=head)
        own = run_schedule(runner, ids, mask, collect=("last_logits",))  # the runner opens its own head
    for name in ("logits", "hidden"):
        c = compare(name, name, "fp32", getattr(full, name), getattr(want, name))
        assert c.ok, (name, c)
    assert rel_err(last.last_logits, _last_of(want.logits, lengths)) < FP32
    assert np.array_equal(own.last_logits, last.last_logits)


def test_ort_resume_with_last_logits():
    export_dir, _ = exported("llama")
    ids = np.random.default_rng(5).integers(0, 64, (2, 19)).astype(np.int64)
    with OrtRunner(export_dir, "diagonal_step") as runner:
        one = run_schedule(runner, ids, collect=("logits",))
        first = run_schedule(runner, ids[:, :7], collect=("last_logits",))
        rest = run_schedule(runner, ids[:, 7:], state=first.state, collect=("last_logits",))
    assert rel_err(first.last_logits, one.logits[:, 6]) < FP32
    assert rel_err(rest.last_logits, one.logits[:, -1]) < FP32


def _one_line(capsys, match):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and match in err, err


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_cli_logits_last_none_and_hidden_out(backend, tmp_path, capsys):
    export_dir, model_dir = exported("llama")
    path = model_dir if backend == "torch" else export_dir
    ids, mask, lengths = _batch(64, N=15)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask)
    run = lambda *a: main(["run", str(path), "--backend", backend, "--no-progress", "--input-ids",  # noqa: E731
                           str(tmp_path / "ids.npy"), "--attention-mask", str(tmp_path / "mask.npy"), *map(str, a)])
    assert run("--output", tmp_path / "all.npy", "--hidden-out", tmp_path / "h.npy") == 0
    assert run("--logits", "last", "--output", tmp_path / "last.npy", "--strict") == 0
    assert run("--logits", "none", "--hidden-out", tmp_path / "h2.npy", "--state-out", tmp_path / "s.npz") == 0
    full, last = np.load(tmp_path / "all.npy"), np.load(tmp_path / "last.npy")
    assert full.shape == (3, 15, 64) and last.shape == (3, 64)
    assert rel_err(last, _last_of(full, lengths)) < FP32
    assert np.array_equal(np.load(tmp_path / "h.npy"), np.load(tmp_path / "h2.npy"))
    capsys.readouterr()
    assert run("--logits", "none", "--output", tmp_path / "x.npy") == 2
    _one_line(capsys, "--logits none writes no logits file")
    assert not (tmp_path / "x.npy").exists()
