"""Exceptions raised for bad user input (config, data, checkpoints)."""


class EffBertError(Exception):
    """Base class of every error nni-effbert raises on purpose."""


class ConfigError(EffBertError, ValueError):
    """An experiment config (YAML file or ``--set`` override) is invalid."""


class DataError(EffBertError, ValueError):
    """A task's data files or dataset cannot be used as they are."""


class CheckpointError(EffBertError):
    """A checkpoint is missing, corrupt or does not match the model."""


class DiskFullError(EffBertError, OSError):
    """A write failed because the disk (or quota) is full: ``disk full while writing <path>``.
    The previous file stays intact and no temporary file is left (:mod:`nni_effbert.io`)."""

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror else super().__str__()


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (what the CLI and the trial entry print)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
