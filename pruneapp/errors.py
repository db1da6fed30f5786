"""The exceptions pruneapp raises, each with a one-line message written for users.

PruneAppError                 base: every error a user can cause; exit code 2
├── UnsupportedFileError      the file is not a model pruneapp can read (with how to re-save it)
├── CorruptFileError          the file is truncated, damaged or internally inconsistent
├── UnsafeFileError           the file tries to run code or to exhaust resources
├── LimitExceededError        the file is larger than a configured limit (names the limit)
├── SettingsError             a bad method, sparsity, pattern, device or option
└── OutputExistsError         an output file already exists and --force was not given
"""

from __future__ import annotations


class PruneAppError(Exception):
    """Base class: the message is one line that names the problem and, where there is one, the fix."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)


class UnsupportedFileError(PruneAppError):
    """The bytes are not a kind of model file pruneapp reads."""


class CorruptFileError(PruneAppError):
    """The file is truncated, damaged or inconsistent with itself."""


class UnsafeFileError(PruneAppError):
    """The file asks for code to run or is built to exhaust memory, disk or time."""


class LimitExceededError(PruneAppError):
    """The file is over one of the configured limits."""


class SettingsError(PruneAppError):
    """A pruning setting or command-line option is invalid."""


class OutputExistsError(PruneAppError):
    """Writing would overwrite an existing file."""
