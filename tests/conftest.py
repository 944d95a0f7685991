import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# the checksum cache (exporter/checksums.py) of this test process: never the user's ~/.cache/armt.
# The trace cache (exporter/trace_cache.py) lives in it too ($ARMT_CACHE/traces): it starts empty in
# every test session, and the many exports of one tiny config across test files trace it once (set
# ARMT_TRACE_CACHE_DIR to keep traces between sessions; ARMT_TRACE_CACHE=0 to trace every export).
import tempfile  # noqa: E402

os.environ["ARMT_CACHE"] = tempfile.mkdtemp(prefix="armt-test-cache-")


import pytest  # noqa: E402


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A fresh, empty trace cache for this test (every graph misses it; ARMT_CACHE is where
    exporter.checksums.cache_dir looks): the traces directory inside it."""
    from exporter import trace_cache
    root = tmp_path / "cache"
    monkeypatch.setenv("ARMT_CACHE", str(root))
    monkeypatch.delenv(trace_cache.ENV_SWITCH, raising=False)
    monkeypatch.delenv(trace_cache.DIR_ENV, raising=False)
    return root / "traces"
