"""pruneapp: prune PyTorch models into checkpoints that are really smaller on disk.

Names are imported on first use, so ``python -m pruneapp`` can start its loading server before torch loads.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CorruptFileError": "pruneapp.errors",
    "LimitExceededError": "pruneapp.errors",
    "OutputExistsError": "pruneapp.errors",
    "PruneAppError": "pruneapp.errors",
    "SettingsError": "pruneapp.errors",
    "UnsafeFileError": "pruneapp.errors",
    "UnsupportedFileError": "pruneapp.errors",
    "FORMATS": "pruneapp.formats",
    "read_weights": "pruneapp.formats",
    "Limits": "pruneapp.limits",
    "LoadedModel": "pruneapp.loading",
    "load_model": "pruneapp.loading",
    "inspect_file": "pruneapp.pipeline",
    "prune_file": "pruneapp.pipeline",
    "sweep": "pruneapp.pipeline",
    "METHODS": "pruneapp.pruning",
    "PruneResult": "pruneapp.pruning",
    "PruneSettings": "pruneapp.pruning",
    "prune": "pruneapp.pruning",
    "Report": "pruneapp.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pruneapp' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
