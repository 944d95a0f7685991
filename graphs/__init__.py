"""graphs: the ARMT in PyTorch (reference model, per-segment and diagonal cells, checkpoint import)."""
