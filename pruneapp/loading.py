"""Detect what a model file is from its bytes and load its tensors without running code from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pruneapp.limits import Limits

# File kinds, as detect_kind() names them.
KINDS = (
    "torch-zip",  # torch.save (zip, torch >= 1.6): state_dict, checkpoint or pickled module
    "torch-legacy",  # torch.save before 1.6 / _use_new_zipfile_serialization=False
    "torchscript",  # torch.jit.save archive
    "safetensors",
    "zstd",  # a .zst frame around one of the above (our own outputs)
    "pruneapp-packed",  # our packed format
)


@dataclass
class LoadedModel:
    """The weights of a file plus what is needed to write it back in its own structure.

    ``weights`` is a flat state_dict: tied keys hold the very same tensor object.
    """

    path: Path
    kind: str  # one of KINDS
    structure: str  # "state_dict" | "checkpoint" | "safetensors" | "pickled-module" | "torchscript"
    weights: dict[str, torch.Tensor]
    extras: dict[str, Any] = field(default_factory=dict)  # non-weight entries of a checkpoint
    extra_bytes: dict[str, int] = field(default_factory=dict)  # tensor bytes each extra entry holds
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors __metadata__
    notes: list[str] = field(default_factory=list)  # user-facing remarks about the file
    file_bytes: int = 0

    def rebuild(self, weights: dict[str, torch.Tensor], drop_extras: bool = False) -> Any:
        """The object to torch.save for a dense output: the input's structure with ``weights`` in it."""
        raise NotImplementedError


def detect_kind(path: str | Path) -> str:
    """Name the kind of file from its leading bytes (never from its name)."""
    raise NotImplementedError


def load_model(path: str | Path, limits: Limits | None = None) -> LoadedModel:
    """Load a model file safely; raise a PruneAppError subclass for anything else."""
    raise NotImplementedError
