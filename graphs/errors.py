"""Typed errors shared by every package. The CLI maps them to one-line messages and exit codes."""


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
