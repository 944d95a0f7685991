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
