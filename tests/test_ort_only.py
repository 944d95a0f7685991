"""A deployment host with onnxruntime and no torch: the wheel runs an export made here.

The environment is a fresh venv holding only the built wheel (unpacked) and the packages an ONNX
Runtime host installs (onnxruntime, numpy, ml_dtypes; polygraphy for `verify --per-graph`), taken
from this environment without network access. torch is not importable there.
"""

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.test_runtime_ort import exported

ROOT = Path(__file__).resolve().parents[1]
HOST_PACKAGES = ("onnxruntime", "numpy", "numpy.libs", "ml_dtypes", "tqdm", "polygraphy")  # base + [ort]


@pytest.fixture(scope="module")
def ort_host(tmp_path_factory):
    """(python, env) of a venv with the wheel and an ONNX Runtime host's packages, without torch."""
    import numpy
    root = tmp_path_factory.mktemp("ort-host")
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next(dist.glob("armt_deploy-*.whl"))
    site = root / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    packages = Path(numpy.__file__).resolve().parents[1]
    for name in HOST_PACKAGES:
        if (packages / name).exists():
            (site / name).symlink_to(packages / name)
    venv.EnvBuilder(with_pip=False).create(root / "venv")
    python = root / "venv" / ("Scripts" if os.name == "nt" else "bin") / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(site)
    no_torch = subprocess.run([str(python), "-c", "import torch"], env=env, capture_output=True, cwd=root)
    assert no_torch.returncode != 0  # the point of this environment
    return python, env, root


def _armt(host, *args):
    python, env, root = host
    code = ("import sys; from armt.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    return subprocess.run([str(python), "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          cwd=root, timeout=600)


@pytest.mark.slow
def test_ort_only_host_runs_inspects_and_verifies_an_export(ort_host, tmp_path):
    from runtimes.execute import run_schedule
    from runtimes.ort_runner import OrtRunner
    export_dir, _ = exported("llama")
    ids = np.random.default_rng(3).integers(0, 64, size=(2, 13))
    np.save(tmp_path / "ids.npy", ids)
    for schedule in ("sequential", "diagonal"):
        out = tmp_path / f"logits-{schedule}.npy"
        r = _armt(ort_host, "run", export_dir, "--backend", "ort", "--schedule", schedule, "--input-ids",
                  tmp_path / "ids.npy", "--output", out, "--state-out", tmp_path / f"s-{schedule}.npz")
        assert r.returncode == 0, r.stderr
        role = "segment" if schedule == "sequential" else "diagonal_step"
        with OrtRunner(export_dir, role) as runner:  # the same export in this (torch) environment
            want = run_schedule(runner, ids).logits
        np.testing.assert_array_equal(np.load(out), want)
    r = _armt(ort_host, "inspect", export_dir)
    assert r.returncode == 0 and "diagonal_step" in r.stdout, r.stderr
    r = _armt(ort_host, "verify", export_dir, "--per-graph", "--graphs-only")
    assert r.returncode == 0, r.stdout + r.stderr
    # every output of every graph: segment 4, diagonal_step 5, lm_head 1 (logits)
    assert "10/10 comparisons within bounds" in r.stdout
    r = _armt(ort_host, "verify", export_dir)  # the run comparisons need torch for the reference
    assert r.returncode == 3 and "needs torch" in r.stderr and "Traceback" not in r.stderr
    r = _armt(ort_host, "export", "--synthetic", "tiny", "-o", tmp_path / "x")  # exporting needs the [torch] extra
    assert r.returncode == 3 and "armt-deploy[torch]" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
