"""Parallel tracing (exporter/parallel_trace.py): the files of a parallel export are the sequential
export's byte for byte; `--jobs` is validated; a worker's trace error is the one-line ExportError, a
crashed worker's graphs are traced by the parent; an interrupt leaves no worker and nothing written;
the size limit keeps big models sequential."""

from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path

import pytest
import torch

from armt.cli import main
from exporter import parallel_trace, trace_cache
from exporter.export import export_model
from exporter.parallel_trace import MAX_JOBS, MAX_PARALLEL_BYTES, check_jobs, claim_order, plan_jobs
from graphs.errors import ExportError, InputError
from graphs.model import ArmtModel
from tests.helpers import tiny_model

GiB = 1 << 30


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def _workers_alive() -> list[str]:
    return [p.name for p in multiprocessing.active_children() if p.name.startswith("armt-trace-")]


class BrokenInWorker(ArmtModel):
    """The copy a worker unpickles has a qkv stack one column short: torch.export fails there (an
    ExportError), the parent's model is intact."""

    def __setstate__(self, state):
        super().__setstate__(state)
        self.layers["qkv"] = torch.nn.Parameter(self.layers["qkv"].data[..., :-1].clone())


class CrashInWorker(ArmtModel):
    """A worker cannot unpickle this model at all (a crash, not an ExportError)."""

    def __setstate__(self, state):
        raise RuntimeError("this model does not travel")


def _as(cls, model: ArmtModel) -> ArmtModel:
    model.__class__ = cls
    return model


# ------------------------------------------------------------------------------ byte for byte
@pytest.mark.slow
def test_parallel_export_equals_the_sequential_one_byte_for_byte(tmp_path, cache_dir, caplog):
    caplog.set_level(logging.INFO, logger="armt.export")
    par = export_model(tiny_model(), tmp_path / "par", decode=False, jobs=2)  # the cache is empty: 3 misses
    log = caplog.text
    assert "tracing 3 graphs in 2 processes" in log, log
    assert "(worker process 1)" in log, log  # a worker delivered at least one graph
    assert not _workers_alive()
    assert sorted(p.name for p in cache_dir.iterdir())  # the workers stored their traces in the cache too
    caplog.clear()
    seq = export_model(tiny_model(), tmp_path / "seq", decode=False, jobs=1, trace_cache=False)  # fresh, one process
    assert "worker process" not in caplog.text and "processes" not in caplog.text
    a, b = _files(par.export_dir), _files(seq.export_dir)
    assert sorted(a) == sorted(b)
    assert {"segment.onnx", "diagonal_step.onnx", "lm_head.onnx", "weights.data", "manifest.json"} <= set(a)
    for name in a:
        assert a[name] == b[name], f"{name} differs between the parallel and the sequential export"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging or scratch left


# ------------------------------------------------------------------------------ --jobs validation
@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5", ""])
def test_jobs_must_be_a_positive_integer(bad, tmp_path, capsys):
    assert main(["export", "--synthetic", "tiny", "-o", str(tmp_path / "out"), "--jobs", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("armt export: error: --jobs must be a positive integer"), err
    assert not (tmp_path / "out").exists()


def test_the_environment_can_pin_the_default(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(parallel_trace.JOBS_ENV, "1")
    assert parallel_trace.requested_jobs(None) == 1 and parallel_trace.requested_jobs(3) == 3  # asked beats env
    monkeypatch.setenv(parallel_trace.JOBS_ENV, "many")
    assert main(["export", "--synthetic", "tiny", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ARMT_TRACE_JOBS must be a positive integer, got 'many'" in err, err
    monkeypatch.delenv(parallel_trace.JOBS_ENV)
    assert parallel_trace.requested_jobs(None) is None


def test_check_jobs():
    assert check_jobs(None) is None and check_jobs(3) == 3 and check_jobs("2") == 2
    for bad in (0, -2, 1.5, True, "x", "-1"):
        with pytest.raises(InputError):
            check_jobs(bad)
    with pytest.raises(InputError):
        export_model(tiny_model(), "/nonexistent/never-written", jobs=0)  # refused before anything runs


# ------------------------------------------------------------------------------ failures
@pytest.mark.slow
def test_a_worker_trace_error_is_the_one_line_export_error(tmp_path):
    model = _as(BrokenInWorker, tiny_model())
    with pytest.raises(ExportError) as exc:  # the parent traces segment; the worker's first graph fails
        export_model(model, tmp_path / "out", decode=False, jobs=2, trace_cache=False)
    msg = str(exc.value)
    assert len(msg.splitlines()) == 1 and msg.startswith("torch.onnx.export of the ") and "graph failed" in msg, msg
    assert "segment graph" not in msg  # the parent's own graph traced fine: the error is the worker's
    assert not _workers_alive()
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging left


def test_a_crashed_worker_leaves_its_graphs_to_the_parent(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="armt.export")
    model = _as(CrashInWorker, tiny_model())
    result = export_model(model, tmp_path / "out", only=("diagonal_step", "lm_head"), jobs=2, trace_cache=False)
    assert "trace worker 1 failed (RuntimeError: this model does not travel)" in caplog.text, caplog.text
    assert set(result.manifest.graphs) == {"diagonal_step", "lm_head"}
    assert (tmp_path / "out" / "diagonal_step.onnx").is_file()
    assert not _workers_alive()


def test_an_interrupt_stops_the_workers_and_writes_nothing(tmp_path, cache_dir, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    import exporter.export as ex
    monkeypatch.setattr(ex, "trace_graph", interrupted)  # this process's first trace is "Ctrl-C"
    with pytest.raises(KeyboardInterrupt):
        export_model(tiny_model(), tmp_path / "out", only=("diagonal_step", "lm_head"), jobs=2)
    assert not _workers_alive()
    assert [p.name for p in tmp_path.iterdir()] == []  # no export, no staging; the cache dir not even made
    assert not cache_dir.exists() or not [p for p in cache_dir.iterdir() if p.suffix == trace_cache.SUFFIX]


# ------------------------------------------------------------------------------ the decision
def test_plan_jobs_defaults_and_caps():
    small = 1 << 20
    assert plan_jobs(None, 5, small, 2, 64 * GiB).jobs == 2
    assert plan_jobs(None, 5, small, 64, 64 * GiB).jobs == MAX_JOBS
    assert plan_jobs(None, 2, small, 64, 64 * GiB).jobs == 2  # no more processes than graphs to trace
    assert plan_jobs(None, 5, small, 1, 64 * GiB).jobs == 1
    assert plan_jobs(3, 5, small, 2, 64 * GiB).jobs == 3  # asked for: more than the CPUs is allowed
    assert plan_jobs(8, 2, small, 2, 64 * GiB).jobs == 2
    assert plan_jobs(1, 5, small, 8, 64 * GiB).jobs == 1
    assert plan_jobs(None, 1, small, 8, 64 * GiB).jobs == 1  # one miss (the rest from the trace cache)
    assert plan_jobs(None, 0, small, 8, 64 * GiB).jobs == 1
    assert plan_jobs(None, 5, small, 8, None).jobs == 4  # /dev/shm unknown: not a reason to stop
    plan = plan_jobs(4, 5, small, 8, 64 * GiB, on_cpu=False)  # a CUDA (or meta) model: no worker opens the GPU
    assert plan.jobs == 1 and "CPU memory" in plan.reason


def test_the_size_limit_keeps_big_models_sequential():
    one_b = int(2.76e9)  # LLaMA-1B shape, fp16 + fp32 memory weights (docs/exporter.md)
    for asked in (None, 2, 8):
        plan = plan_jobs(asked, 5, one_b, 16, 512 * GiB)
        assert plan.jobs == 1 and "exceed the parallel-trace limit" in plan.reason, plan
    assert plan_jobs(None, 5, MAX_PARALLEL_BYTES, 16, 512 * GiB).jobs == 4  # the limit itself still runs
    assert plan_jobs(None, 5, MAX_PARALLEL_BYTES + 1, 16, 512 * GiB).jobs == 1
    plan = plan_jobs(None, 5, 100 << 20, 16, 150 << 20)  # /dev/shm without room for twice the tensors
    assert plan.jobs == 1 and "/dev/shm" in plan.reason


def test_model_bytes_and_claim_order():
    m = tiny_model()
    want = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    assert parallel_trace.model_bytes(m) == want
    assert claim_order(["lm_head", "diagonal_step", "segment", "decode", "memory_write"]) == \
        ["segment", "memory_write", "diagonal_step", "decode", "lm_head"]
    assert claim_order(["rmt_segment", "lm_head", "rmt_decode", "rmt_memory_write"])[0] == "rmt_segment"
