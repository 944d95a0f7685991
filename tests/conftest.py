import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# the checksum cache (exporter/checksums.py) of this test process: never the user's ~/.cache/armt
import tempfile  # noqa: E402

os.environ["ARMT_CACHE"] = tempfile.mkdtemp(prefix="armt-test-cache-")
