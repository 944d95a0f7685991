"""armt-deploy's applications: the `armt` command, the demo, the bench (above graphs/, exporter/, runtimes/),
and the Python API (`armt.load`, armt/api.py)."""

from graphs import __version__  # noqa: F401


def load(path, backend: str = "torch", device: str | None = None, precision: str | None = None,
         schedule: str | None = None):
    """A model directory (torch) or an export directory (ort, trt) as one callable object with
    `generate`: see armt/api.py. Imported on first use (the command line does not pay for it)."""
    from armt.api import load as _load
    return _load(path, backend=backend, device=device, precision=precision, schedule=schedule)
