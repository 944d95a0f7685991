"""The wheel works outside the repository (issue 12): built from this tree, installed into a fresh venv in
a temporary directory (no PYTHONPATH, not run from the checkout), it carries the demo model, the
LICENSE and one version, and `armt demo --quick --out DIR` runs end to end from there.

Offline and fast: the wheel is built with `pip wheel --no-deps --no-build-isolation`, installed with
`pip --python VENV install --no-deps --no-index`, and the venv sees this environment's third-party
packages through a .pth line (a path line in a .pth is not itself scanned for .pth files, so this
environment's editable install of the project is not picked up: the test asserts that the imported
code is the wheel's).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

import graphs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a clean copy of the tree (the files git tracks or would track, as a fresh clone has
    them): a build/ folder left in the checkout could carry stale modules into the wheel."""
    src = tmp_path_factory.mktemp("src")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(src)], check=True, capture_output=True, timeout=600, env=env, cwd=src)
    return next(dist.glob("armt_deploy-*.whl"))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """(bin dir, env, work dir) of a fresh venv outside the repo with the wheel installed."""
    root = tmp_path_factory.mktemp("wheel-host")
    venv.EnvBuilder(with_pip=False).create(root / "venv")
    bindir = root / "venv" / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # without PYTHONPATH: an armt_deploy.egg-info in the checkout (left by a build there) would make pip see
    # the project as already installed and install nothing
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=600, env=env, cwd=root)
    assert (bindir / ("armt.exe" if os.name == "nt" else "armt")).is_file()
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True, env=env).stdout.strip()
    (Path(site) / "armt-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    work = root / "work"
    work.mkdir()
    return bindir, env, work


def test_wheel_carries_the_demo_model_license_and_version(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    model = {n.split("/")[-1] for n in names if n.startswith("armt/models/armt-recall/")}
    want = {p.name for p in (ROOT / "models" / "armt-recall").iterdir() if p.is_file()}
    assert want <= model and "model.safetensors" in model
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert f"armt_deploy-{graphs.__version__}-" in wheel.name
    meta = zipfile.ZipFile(wheel).read(f"armt_deploy-{graphs.__version__}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()


def test_base_install_is_what_an_export_host_needs():
    """torch and onnxruntime are extras; onnxruntime and onnxruntime-gpu never in one extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    for heavy in ("torch", "onnxruntime", "transformers", "tensorrt", "safetensors", "onnxscript"):
        assert heavy not in base, heavy
    extras = project["optional-dependencies"]
    assert any(d.startswith("torch") for d in extras["torch"]) and any(d.startswith("onnx-ir") for d in extras["torch"])
    assert extras["ort"] == [d for d in extras["ort"] if d.startswith("onnxruntime>")]
    assert all("onnxruntime-gpu" in d for d in extras["ort-gpu"])
    for name, deps in extras.items():
        both = any(d.startswith("onnxruntime>") for d in deps) and any(d.startswith("onnxruntime-gpu") for d in deps)
        assert not both, name
    assert any("cu13" in d for d in extras["trt"]) and any("cu12" in d for d in extras["trt-cu12"])
    assert not any("==" in d for d in extras["trt"] + extras["trt-cu12"])  # not pinned to one build


@pytest.mark.slow
def test_installed_wheel_runs_version_and_the_demo_outside_the_repo(installed):
    bindir, env, work = installed
    armt = str(bindir / "armt")
    r = subprocess.run([armt, "--version"], env=env, cwd=work, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"armt-deploy {graphs.__version__}", r.stderr
    where = subprocess.run([str(bindir / "python"), "-c", "import graphs, armt.demo, importlib.metadata as m; "
                            "print(graphs.__file__); print(armt.demo.MODEL_DIR); print(m.version('armt-deploy'))"],
                           env=env, cwd=work, capture_output=True, text=True, timeout=120)
    code_file, model_dir, version = where.stdout.split()
    venv_dir = bindir.parent.resolve()
    assert Path(code_file).resolve().is_relative_to(venv_dir), code_file  # the wheel's code, not the checkout's
    assert Path(model_dir).resolve().is_relative_to(venv_dir) and (Path(model_dir) / "model.safetensors").is_file()
    assert version == graphs.__version__

    out = work / "demo-out"
    r = subprocess.run([armt, "demo", "--quick", "--out", str(out)], env=env, cwd=work, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "export-fp32" / "manifest.json").is_file()
    assert "demo passed" in r.stdout and "parity fp32" in r.stdout
    assert f"{armt.split(os.sep)[-1]} export MODEL_DIR" in r.stdout  # the next lines name a command that works here
    leftovers = [p for p in Path(model_dir).parent.rglob("*") if "export" in p.name]
    assert not leftovers, leftovers  # nothing written into the installed package


@pytest.mark.slow
def test_demo_writes_to_the_current_directory_by_default(installed):
    """Without --out the demo's exports land in ./armt-demo of the caller, not in site-packages
    (checked with --help's default; the full run is the test above)."""
    bindir, env, work = installed
    r = subprocess.run([str(bindir / "armt"), "demo", "--help"], env={**env, "COLUMNS": "300"}, cwd=work, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "default ./armt-demo" in r.stdout
    from armt.demo import DEFAULT_OUT
    assert not Path(DEFAULT_OUT).is_absolute()


def test_train_recall_refuses_to_overwrite_without_flag(tmp_path):
    target = tmp_path / "armt-recall"
    target.mkdir()
    (target / "keep").write_text("x")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_recall.py"), "--out", str(target), "--steps", "1"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert (target / "keep").read_text() == "x"
