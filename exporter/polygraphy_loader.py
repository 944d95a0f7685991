"""Write `polygraphy_data_loader.py` into an export directory (a Polygraphy data-loader script).

The script needs only numpy (and ml_dtypes for bf16 graphs, which onnx already depends on). It
reads `sample_feeds.npz` from its own directory, so the export directory can be moved as a whole.
"""

from __future__ import annotations

from pathlib import Path

from graphs.atomic import atomic_write_bytes

from exporter.manifest import SAMPLE_FEEDS
from graphs.contracts import GRAPH_FILES

_TEMPLATE = '''"""Polygraphy data loader for this ARMT export (written by `armt export`).

    polygraphy run diagonal_step.onnx --onnxrt --data-loader-script ./polygraphy_data_loader.py
    polygraphy run segment.onnx --onnxrt --data-loader-script ./polygraphy_data_loader.py

`load_data()` picks the graph from $ARMT_GRAPH (segment | diagonal_step) or else from the model file
named on the command line (segment.* / diagonal_step.*); `load_segment` / `load_diagonal_step` name
it explicitly (`--data-loader-script ./polygraphy_data_loader.py:load_segment`). Each yields one feed
dict: a call from inside a real multi-segment run (non-zero memory state, a padded row, mixed
write/active flags), stored in {samples}.
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = os.path.join(HERE, {samples!r})
GRAPH_FILES = {graph_files!r}
# inputs whose dtype numpy lacks: stored as float32 (exact), cast back here
CAST = {cast!r}


def _feeds(role):
    with np.load(SAMPLES, allow_pickle=False) as data:
        prefix = role + "/"
        feeds = {{k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}}
    if not feeds:
        raise RuntimeError("%s holds no sample feeds for graph %r" % (SAMPLES, role))
    for name, dtype in CAST.get(role, {{}}).items():
        import ml_dtypes  # bfloat16 for numpy
        feeds[name] = feeds[name].astype(getattr(ml_dtypes, dtype))
    return feeds


def _loader(role):
    def load():
        yield _feeds(role)
    load.__name__ = "load_" + role
    return load


for _r in GRAPH_FILES:  # load_segment, load_diagonal_step, ...: one loader per graph
    globals()["load_" + _r] = _loader(_r)


def _role():
    env = os.environ.get("ARMT_GRAPH")
    if env:
        if env not in GRAPH_FILES:
            raise RuntimeError("ARMT_GRAPH=%r is not one of %s" % (env, ", ".join(GRAPH_FILES)))
        return env
    found = set()
    for arg in sys.argv[1:]:
        base = os.path.basename(arg)
        for role, graph_file in GRAPH_FILES.items():
            if base == graph_file or base.startswith(role + "."):
                found.add(role)
    if len(found) != 1:
        raise RuntimeError("cannot tell which graph to feed (found %s on the command line); set ARMT_GRAPH "
                           "or use --data-loader-script %s:load_segment / :load_diagonal_step"
                           % (sorted(found) or "none", os.path.basename(__file__)))
    return found.pop()


def load_data():
    yield from _loader(_role())()
'''


def write_script(path: Path, input_dtypes: dict[str, dict[str, str]]) -> None:
    """`input_dtypes`: role -> input name -> dtype (from the manifest's specs)."""
    cast = {role: {n: d for n, d in dts.items() if d == "bfloat16"} for role, dts in input_dtypes.items()}
    cast = {r: c for r, c in cast.items() if c}
    graph_files = {role: GRAPH_FILES[role] for role in input_dtypes}  # the export's own graphs
    text = _TEMPLATE.format(samples=SAMPLE_FEEDS, graph_files=graph_files, cast=cast)
    atomic_write_bytes(path, text.encode())
