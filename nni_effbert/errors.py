"""Exceptions raised for bad user input (config, data, checkpoints)."""


class EffBertError(Exception):
    """Base class of every error nni-effbert raises on purpose."""


class ConfigError(EffBertError, ValueError):
    """An experiment config (YAML file or ``--set`` override) is invalid."""


class DataError(EffBertError, ValueError):
    """A task's data files or dataset cannot be used as they are."""


class CheckpointError(EffBertError):
    """A checkpoint is missing, corrupt or does not match the model."""


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (what the CLI and the trial entry print)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
