"""graphs: the ARMT in PyTorch (reference model, per-segment and diagonal cells, checkpoint import),
and the torch-free core every layer shares (config, graph contracts, schedules, slots, state, dtypes)."""

__version__ = "0.2.0"  # the one version string of armt-deploy (pyproject.toml reads it)
