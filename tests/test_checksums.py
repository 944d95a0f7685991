"""Checksums where they belong (issue 12): `armt run` hashes a file only when its stat is not in the
checksum cache (exporter/checksums.py), `armt verify` / `inspect --verify` always hash, and
`--no-verify-checksums` checks sizes and the manifest's fields only."""

import json
import os

import numpy as np
import pytest

import exporter.checksums as checksums
from armt.cli import main
from exporter.manifest import check_export, load_manifest
from graphs.errors import ExportError
from tests.helpers import flip_bits
from tests.test_export_units import _fake_export

OLD = 10 * checksums.RACY_NS  # how far back the test files' mtimes are set (well outside the racy window)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A private cache directory, and a counter of the files sha256_file reads."""
    monkeypatch.setenv("ARMT_CACHE", str(tmp_path / "cache"))
    calls = []
    real = checksums.sha256_file
    monkeypatch.setattr(checksums, "sha256_file", lambda p, *a, **k: calls.append(os.path.basename(p)) or real(p, *a, **k))
    return calls


def _age(*paths, by_ns=OLD):
    for p in paths:
        st = os.stat(p)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - by_ns))


def _export(tmp_path):
    d = tmp_path / "export"
    d.mkdir()
    _fake_export(d)
    _age(d / "segment.onnx", d / "weights.data")
    return d


def _rewrite_same_size(path):
    """Other bytes, same size, a new mtime (what an edit in place gives)."""
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


def test_second_load_does_not_rehash(tmp_path, cache):
    d = _export(tmp_path)
    load_manifest(d)
    assert sorted(cache) == ["segment.onnx", "weights.data"]
    cache.clear()
    load_manifest(d)
    load_manifest(d, verify_checksums="cached")
    assert cache == []  # both files came from the cache
    assert (tmp_path / "cache" / checksums.CACHE_FILE).is_file()


def test_changed_file_is_rehashed_and_refused(tmp_path, cache):
    d = _export(tmp_path)
    load_manifest(d)
    cache.clear()
    _rewrite_same_size(d / "weights.data")
    with pytest.raises(ExportError, match="weights.data was altered \\(sha256"):
        load_manifest(d)
    assert cache == ["weights.data"]  # only the changed file is read again


def test_restored_mtime_is_still_seen(tmp_path, cache):
    """An edit that puts the old mtime back changes the ctime, which the cache key holds too."""
    d = _export(tmp_path)
    load_manifest(d)
    st = os.stat(d / "weights.data")
    _rewrite_same_size(d / "weights.data")
    os.utime(d / "weights.data", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(d / "weights.data").st_mtime_ns == st.st_mtime_ns
    with pytest.raises(ExportError, match="weights.data was altered"):
        load_manifest(d)


def test_full_policy_always_hashes(tmp_path, cache):
    d = _export(tmp_path)
    load_manifest(d)
    cache.clear()
    load_manifest(d, verify_checksums="full")
    assert sorted(cache) == ["segment.onnx", "weights.data"]
    cache.clear()
    check_export(d)  # inspect --verify
    assert sorted(cache) == ["segment.onnx", "weights.data"]


def test_a_forged_cache_fools_cached_but_not_full(tmp_path, cache):
    """The documented limit: "cached" trusts an entry whose stat matches; only "full" reads the bytes."""
    d = _export(tmp_path)
    load_manifest(d)
    _rewrite_same_size(d / "weights.data")
    path = tmp_path / "cache" / checksums.CACHE_FILE
    raw = json.loads(path.read_text())
    key = str((d / "weights.data").resolve())
    manifest = json.loads((d / "manifest.json").read_text())
    raw["files"][key] = {"stat": checksums._stat_key(os.stat(d / "weights.data")),
                         "sha256": manifest["files"]["weights.data"]["sha256"], "used": 0.0}
    path.write_text(json.dumps(raw))
    load_manifest(d)  # fooled
    with pytest.raises(ExportError, match="weights.data was altered"):
        load_manifest(d, verify_checksums="full")


def test_fresh_files_are_not_remembered(tmp_path, cache):
    """A file written within the racy window is hashed every time (its stat could hide a second write)."""
    d = tmp_path / "export"
    d.mkdir()
    _fake_export(d)
    load_manifest(d)
    load_manifest(d)
    assert sorted(cache) == ["segment.onnx", "segment.onnx", "weights.data", "weights.data"]


@pytest.mark.parametrize("garbage", [b"{not json", b"\xff\xfe\x00", b"[]", b'{"version": 1, "files": []}',
                                     b'{"version": 1, "files": {"x": {"stat": "s", "sha256": 3}}}', b""])
def test_corrupted_cache_is_harmless(tmp_path, cache, garbage):
    d = _export(tmp_path)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / checksums.CACHE_FILE).write_bytes(garbage)
    load_manifest(d)  # hashed as without a cache
    assert sorted(cache) == ["segment.onnx", "weights.data"]
    cache.clear()
    load_manifest(d)  # and the cache was rewritten whole
    assert cache == []
    _rewrite_same_size(d / "weights.data")
    with pytest.raises(ExportError):
        load_manifest(d)


def test_unwritable_cache_is_harmless(tmp_path, cache, monkeypatch):
    d = _export(tmp_path)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("ARMT_CACHE", str(blocker / "cache"))
    load_manifest(d)
    load_manifest(d)
    assert len(cache) == 4  # no cache: every load hashes


def test_sizes_policy_hashes_nothing_but_checks_sizes(tmp_path, cache):
    d = _export(tmp_path)
    _rewrite_same_size(d / "weights.data")
    load_manifest(d, verify_checksums="sizes")
    assert cache == []
    (d / "weights.data").write_bytes(b"\0" * 65)
    with pytest.raises(ExportError, match="65 bytes"):
        load_manifest(d, verify_checksums="sizes")


def test_cache_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(checksums, "MAX_ENTRIES", 3)
    c = checksums.ChecksumCache(tmp_path / "c.json")
    for i in range(5):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x")
        _age(p)
        checksums.file_digest(p, "cached", c)
    c.save()
    assert len(checksums.ChecksumCache.load(tmp_path / "c.json").entries) == 3


# ------------------------------------------------------------------------------- the commands
def test_cli_run_hashes_once_verify_always(tmp_path, cache, capsys):
    from tests.test_runtime_ort import export_copy
    d = export_copy("llama", tmp_path / "copy")
    files = [p for p in d.iterdir() if p.name != "manifest.json"]
    _age(*files)
    np.save(tmp_path / "ids.npy", np.zeros((1, 7), np.int64))
    run = ["run", str(d), "--backend", "ort", "--input-ids", str(tmp_path / "ids.npy")]
    assert main(run) == 0
    assert len(cache) == len(files)
    cache.clear()
    assert main(run) == 0
    assert cache == []  # the second run of the same export hashes nothing
    # an edit in place (same size, new mtime) is re-hashed and refused
    flip_bits(d / "weights.data", 100, 0x01)
    assert main(run) == 2
    assert "weights.data was altered" in capsys.readouterr().err
    assert cache == ["weights.data"]
    cache.clear()
    assert main([*run, "--no-verify-checksums"]) == 0  # the host verifies elsewhere: sizes only
    assert cache == []
    assert main(["verify", str(d), "--backend", "ort", "--graphs-only", "--per-graph"]) == 2
    assert "weights.data was altered" in capsys.readouterr().err
    assert main(["inspect", str(d), "--verify"]) == 2
