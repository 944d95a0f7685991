"""The trace cache (exporter/trace_cache.py): a hit gives the bytes a fresh trace gives, a damaged or
foreign entry is never used, and the key moves with everything that shapes the graph."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from exporter import trace, trace_cache
from exporter.export import export_model
from exporter.trace_cache import TraceCache, trace_key
from tests.helpers import flip_bits, tiny_model, tiny_rmt


def _no_tracing(monkeypatch) -> list[str]:
    """Make a fresh trace fail: a run that passes took every graph from the cache."""
    traced: list[str] = []

    def refuse(module, model, role, precision, opset):
        traced.append(role)
        raise AssertionError(f"{role} was traced although the cache holds it")
    monkeypatch.setattr(trace, "_translate", refuse)
    return traced


def _serialized(model) -> bytes:
    import onnx_ir as ir
    return ir.serde.serialize_model(model).SerializeToString()


def _entries(root: Path) -> list[Path]:
    return sorted(root.glob(f"*{trace_cache.SUFFIX}"))


def _files(export_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(export_dir.iterdir()) if p.suffix in (".onnx", ".data")}


def test_reexport_after_finetuning_is_byte_identical_to_a_fresh_export(cache_dir, tmp_path, monkeypatch):
    """Users re-export after fine-tuning: same shape, new weights. The cached export (no tracing at all)
    equals a fresh export of the new weights in every graph and weight byte, and its weights are the
    new ones (not the weights of the export that filled the cache)."""
    with torch.no_grad():
        export_model(tiny_model(seed=0), tmp_path / "first", decode=False)  # fills the cache
        assert len(_entries(cache_dir)) == 3  # segment, diagonal_step, lm_head (decode=False: the default exports the decode graphs too)
        export_model(tiny_model(seed=1), tmp_path / "fresh", decode=False, trace_cache=False)
        assert len(_entries(cache_dir)) == 3  # trace_cache=False neither reads nor writes
        traced = _no_tracing(monkeypatch)
        export_model(tiny_model(seed=1), tmp_path / "cached", decode=False)
    assert traced == []
    cached, fresh, first = _files(tmp_path / "cached"), _files(tmp_path / "fresh"), _files(tmp_path / "first")
    assert set(cached) == {"segment.onnx", "diagonal_step.onnx", "lm_head.onnx", "weights.data"}
    for name in cached:
        assert cached[name] == fresh[name], f"{name} from the cache differs from a fresh export"
    assert cached["weights.data"] != first["weights.data"]


def test_fused_fp16_graph_from_the_cache_is_the_fresh_graph(cache_dir, monkeypatch):
    """The fused opset-23 graphs (Attention, RMSNormalization) go through the cache unchanged too."""
    with torch.no_grad():
        model = tiny_model().cast(torch.float16)
        graph = trace.trace_graph(model, "diagonal_step", "fp16", cache=True)  # a miss: traced and stored
        assert {"Attention", "RMSNormalization"} <= {n.op_type for n in graph.graph}
        fresh = _serialized(graph)
        _no_tracing(monkeypatch)
        cached = _serialized(trace.trace_graph(model, "diagonal_step", "fp16", cache=True))
    assert cached == fresh


def test_rmt_graph_from_the_cache_is_the_fresh_graph(cache_dir, monkeypatch):
    with torch.no_grad():
        model = tiny_rmt()
        fresh = _serialized(trace.trace_graph(model, "lm_head", "fp32", cache=True))  # a miss: stores
        _no_tracing(monkeypatch)
        cached = _serialized(trace.trace_graph(model, "lm_head", "fp32", cache=True))
    assert cached == fresh


def test_cached_initializers_share_the_models_memory(cache_dir, monkeypatch):
    """Like a fresh trace's (exporter/weights.py streams them from the parameters, no copy)."""
    model = tiny_model()
    with torch.no_grad():
        trace.trace_graph(model, "lm_head", "fp32", cache=True)
        _no_tracing(monkeypatch)
        graph = trace.trace_graph(model, "lm_head", "fp32", cache=True)
    head = graph.graph.initializers["model.globals.lm_head"].const_value
    assert head.numpy().ctypes.data == model.globals.lm_head.data_ptr()


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "other_key"])
def test_a_damaged_or_foreign_entry_is_ignored_with_a_warning_and_replaced(cache_dir, monkeypatch, caplog, damage):
    model = tiny_model()
    with torch.no_grad():
        fresh = _serialized(trace.trace_graph(model, "lm_head", "fp32", cache=True))
    (entry,) = _entries(cache_dir)
    if damage == "flip":
        flip_bits(entry, entry.stat().st_size - 40, 0x10)  # inside the payload
    elif damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:200])
    elif damage == "garbage":
        entry.write_bytes(b"not a cache entry")
    else:  # a valid entry of another key under this key's name
        other = tiny_model(segment_size=7)
        with torch.no_grad():
            trace.trace_graph(other, "lm_head", "fp32", cache=True)
        (foreign,) = [p for p in _entries(cache_dir) if p != entry]
        entry.write_bytes(foreign.read_bytes())
    caplog.set_level(logging.WARNING, logger="armt.export")
    with torch.no_grad():
        again = _serialized(trace.trace_graph(model, "lm_head", "fp32", cache=True))
    assert again == fresh
    assert any("unusable" in r.getMessage() and entry.name in r.getMessage() for r in caplog.records)
    traced = _no_tracing(monkeypatch)  # the fresh trace rewrote the entry: the next one is a hit
    with torch.no_grad():
        assert _serialized(trace.trace_graph(model, "lm_head", "fp32", cache=True)) == fresh
    assert traced == []


def test_an_entry_whose_tensors_do_not_fit_the_cell_is_not_used(cache_dir, caplog):
    model = tiny_model()
    module = trace.cell_module(model, "lm_head")
    key = trace_key(model, "lm_head", "fp32", 18, False, module)
    with torch.no_grad():
        trace.trace_graph(model, "lm_head", "fp32", cache=True)
    other = trace.cell_module(tiny_model(vocab_size=67), "lm_head")  # another head shape, same key asked
    caplog.set_level(logging.WARNING, logger="armt.export")
    assert TraceCache(cache_dir).load(key, other) is None
    assert any("in the cell" in r.getMessage() for r in caplog.records)
    assert TraceCache(cache_dir).load(key, module) is not None


def test_the_key_moves_with_everything_that_shapes_the_graph(monkeypatch):
    model = tiny_model()

    def key(m=model, role="segment", precision="fp32", opset=18, fused=False):
        return trace_key(m, role, precision, opset, fused, trace.cell_module(m, role))
    base = key()
    assert key() == base  # deterministic
    assert key(role="diagonal_step") != base
    assert key(precision="fp16") != base
    assert key(opset=17) != base
    assert key(fused=True) != base
    fast = trace.cell_module(model, "segment")
    fast.fast_memory = True  # the tensor-core memory read (a test tracing with the switch patched)
    assert trace_key(model, "segment", "fp32", 18, False, fast) != base
    assert key(m=tiny_model(seed=3)) == base  # weights are re-bound, not part of the key
    assert key(m=tiny_model(segment_size=7)) != base
    assert key(m=tiny_model(correction=False)) != base
    assert key(m=tiny_model().cast(torch.float16)) != base  # tensor dtypes
    assert key(m=tiny_rmt(), role="rmt_segment") != key(m=tiny_rmt(segment_size=7), role="rmt_segment")
    monkeypatch.setattr(trace_cache, "_versions", lambda: {"torch": "0.0"})
    assert key() != base
    monkeypatch.undo()
    assert key() == base


def test_the_source_digest_covers_the_code_and_its_location(tmp_path):
    """The graphs' node metadata records source paths and lines: another checkout or an edit is another key."""
    import shutil
    root = trace_cache._ROOT
    copy = tmp_path / "checkout"
    for rel in ["graphs", "exporter"]:
        (copy / rel).mkdir(parents=True)
    for f in list((root / "graphs").glob("*.py")) + [root / "exporter" / f for f in trace_cache.TRACE_SOURCES]:
        shutil.copy(f, copy / f.relative_to(root))
    here, there = trace_cache.source_digest(), trace_cache.source_digest(copy)
    assert here != there  # same bytes, another location
    with open(copy / "graphs" / "blocks.py", "a") as f:
        f.write("\n# an edit\n")
    trace_cache.source_digest.cache_clear()
    assert trace_cache.source_digest(copy) not in (here, there)


def test_the_cache_can_be_switched_off(cache_dir, monkeypatch):
    monkeypatch.setenv(trace_cache.ENV_SWITCH, "0")
    assert not trace_cache.enabled()
    with torch.no_grad():
        trace.trace_graph(tiny_model(), "lm_head", "fp32")  # cache=None: the environment's default
    assert _entries(cache_dir) == []
    monkeypatch.setenv(trace_cache.ENV_SWITCH, "1")
    assert trace_cache.enabled()


def test_the_cache_directory_can_be_chosen(cache_dir, tmp_path, monkeypatch):
    assert trace_cache.cache_root() == cache_dir
    monkeypatch.setenv(trace_cache.DIR_ENV, str(tmp_path / "mine"))
    assert trace_cache.cache_root() == tmp_path / "mine"
    with torch.no_grad():
        trace.trace_graph(tiny_model(), "lm_head", "fp32", cache=True)
    assert len(_entries(tmp_path / "mine")) == 1 and _entries(cache_dir) == []


def test_cli_flag_no_trace_cache():
    from armt.cli import build_parser
    parse = build_parser().parse_args
    assert parse(["export", "m", "-o", "x"]).trace_cache is None
    assert parse(["export", "m", "-o", "x", "--no-trace-cache"]).trace_cache is False


def test_pruning_keeps_the_most_recent_entries(tmp_path):
    import os
    store = TraceCache(tmp_path)
    for i in range(5):
        p = store.path(f"{i:064x}")
        p.write_bytes(b"x")
        os.utime(p, ns=(i * 10**9, i * 10**9))
    store.prune(keep=2)
    assert [p.name[:64] for p in _entries(tmp_path)] == [f"{3:064x}", f"{4:064x}"]
