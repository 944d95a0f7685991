"""Typed errors shared by every package. The CLI maps them to one-line messages and exit codes:

    0  ok
    1  a parity miss (ParityFailure), or non-finite values under --strict (NonFiniteError)
    2  bad input: files, paths, ids, masks, states, configs, exports (every other ArmtError)
    3  a backend or resource that cannot run here (BackendUnavailable; out of memory)
    4  an internal error (a bug: an exception that is not an ArmtError)
"""

EXIT_OK, EXIT_MISS, EXIT_INPUT, EXIT_UNAVAILABLE, EXIT_INTERNAL = 0, 1, 2, 3, 4


class ArmtError(Exception):
    """Base class: a problem the user can fix. `exit_code` is what `armt` exits with."""

    exit_code = 2


class ConfigError(ArmtError):
    """A model or ARMT configuration is missing, malformed or unsupported."""


class CheckpointError(ArmtError):
    """A checkpoint is unreadable, unsafe, or its tensors do not match the model."""


class InputError(ArmtError):
    """Token ids, masks or state files that do not fit the model."""


class ExportError(ArmtError):
    """An export directory is missing, incomplete, altered, or cannot be produced."""


class BackendUnavailable(ArmtError):
    """An optional backend (onnxruntime, TensorRT, CUDA, torch) is not installed or cannot run here."""

    exit_code = 3


class ParityFailure(ArmtError):
    """A backend's outputs miss the precision's bounds against the PyTorch reference."""

    exit_code = 1


class OutputError(ArmtError):
    """An output location that cannot be written (missing folder, a directory, no permission), or
    one that would overwrite an input of the same call."""


class NonFiniteError(ArmtError):
    """NaN or Inf in a run's outputs or memory state (`--strict`)."""

    exit_code = 1
