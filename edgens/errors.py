"""One exception family for everything the user can cause.

Every error edgens raises on purpose derives from :class:`EdgensError`; each subclass also derives from the builtin
that fits (``ValueError``, ``FileNotFoundError``...), so callers can catch either. Messages say what was received
and what was expected. The CLI prints these as one line without a traceback. This module imports nothing heavy:
the torch-free runtime uses it too.
"""

from __future__ import annotations


class EdgensError(Exception):
    """Root of all errors edgens raises on purpose."""


class ConfigError(EdgensError, ValueError):
    """A setting is out of range or inconsistent (e.g. lam > 1, an unknown preset)."""


class InputError(EdgensError, ValueError):
    """Data given to a function has the wrong shape, dtype, range or non-finite values."""


class DataNotFoundError(EdgensError, FileNotFoundError):
    """A data set, run directory or bundle file is missing."""


class RunDirectoryError(EdgensError, ValueError):
    """A run directory is incomplete, inconsistent or already in use."""


class NotWritableError(EdgensError, PermissionError):
    """A file edgens must write cannot be written there (checked before long work starts)."""


class BundleError(EdgensError, ValueError):
    """A deployment bundle is unreadable, incompatible or fails its checks."""


class ExportError(EdgensError, RuntimeError):
    """Export failed, e.g. the exported graph does not match the torch model."""


class BackendUnavailableError(EdgensError, ImportError):
    """An inference backend (onnxruntime, TensorRT, CUDA) is not installed or cannot run here."""


class PredictorClosedError(EdgensError, RuntimeError):
    """A closed predictor was asked to predict (load the bundle again)."""


class NoMembersAvailableError(EdgensError, RuntimeError):
    """No member of the ensemble could answer (all stacks failed or were excluded)."""


class OverloadedError(EdgensError, RuntimeError):
    """A bounded queue is full (the serving batcher refuses the request at once instead of queueing it)."""


class ServiceStoppingError(EdgensError, RuntimeError):
    """A service is draining or stopped and accepts no new requests."""


class TrainingDivergedError(EdgensError, FloatingPointError):
    """Training produced a non-finite loss; the learning rate is usually too high."""


class DistributedError(EdgensError, RuntimeError):
    """A distributed run failed: a rank died, hung or disagreed with the others."""


def unknown_choice(kind: str, received: object, valid: list[str] | tuple[str, ...]) -> ConfigError:
    """Build the standard "unknown X" error that lists the valid choices."""
    return ConfigError(f"unknown {kind} {received!r}; expected one of: {', '.join(sorted(valid))}")
