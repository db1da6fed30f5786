"""pruneapp: prune PyTorch models into checkpoints that are really smaller on disk."""

from pruneapp.errors import (
    CorruptFileError,
    LimitExceededError,
    OutputExistsError,
    PruneAppError,
    SettingsError,
    UnsafeFileError,
    UnsupportedFileError,
)
from pruneapp.formats import FORMATS, read_weights
from pruneapp.limits import Limits
from pruneapp.loading import LoadedModel, load_model
from pruneapp.pipeline import inspect_file, prune_file, sweep
from pruneapp.pruning import METHODS, PruneResult, PruneSettings, prune
from pruneapp.report import Report

__all__ = [
    "FORMATS",
    "METHODS",
    "CorruptFileError",
    "LimitExceededError",
    "Limits",
    "LoadedModel",
    "OutputExistsError",
    "PruneAppError",
    "PruneResult",
    "PruneSettings",
    "Report",
    "SettingsError",
    "UnsafeFileError",
    "UnsupportedFileError",
    "inspect_file",
    "load_model",
    "prune",
    "prune_file",
    "read_weights",
    "sweep",
]
