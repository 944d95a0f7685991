"""Ships the demo model inside the wheel without moving the repository's models/ folder.

models/armt-recall (the trained demo model, docs/demo-model.md) is copied into the built package as
armt/models/armt-recall, where `armt demo` finds it after `pip install`; in a checkout (PYTHONPATH=$PWD)
armt/models does not exist and the demo reads models/armt-recall directly. Everything else is in
pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DEMO_MODEL = Path(__file__).resolve().parent / "models" / "armt-recall"


class BuildWithDemoModel(build_py):
    def run(self):
        super().run()
        if not DEMO_MODEL.is_dir():  # building from an sdist without the model: fail loudly, not a wheel without it
            raise SystemExit(f"setup.py: the demo model {DEMO_MODEL} is missing")
        target = Path(self.build_lib) / "armt" / "models" / "armt-recall"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(DEMO_MODEL, target)


setup(cmdclass={"build_py": BuildWithDemoModel})
