"""armt-deploy's applications: the `armt` command, the demo, the bench (above graphs/, exporter/, runtimes/)."""

from graphs import __version__  # noqa: F401
