"""The exceptions autoprune raises on bad input.

Every message is one line that names the bad value, so that the CLI can print it as it is.
"""

from __future__ import annotations


class AutopruneError(Exception):
    """Base class of autoprune's own errors."""


class SpecError(AutopruneError, ValueError):
    """A study spec or a search-space setting is malformed or out of range."""


class TaskError(AutopruneError, ValueError):
    """A task cannot be built, or its model and data do not fit together."""


class StorageError(AutopruneError):
    """The study storage cannot be opened, or holds a study that does not match."""


class OutputError(AutopruneError, OSError):
    """An output path cannot be written: its directory is missing or read-only, it names a
    directory, or the write itself failed. Still an ``OSError``, as it was before."""


class TrialFailed(AutopruneError):
    """One trial failed (e.g. a non-finite loss); the study goes on."""


class DeployFailed(TrialFailed):
    """A model cannot be deployed as asked: exported to ONNX, quantized, or checked against
    PyTorch. In a study it fails that trial alone."""
