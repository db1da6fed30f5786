"""The steps a user runs, end to end: inspect a file; load, prune, write and measure its outputs; sweep sparsity.

The CLI and the app both call these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pruneapp.formats import FORMATS
from pruneapp.limits import Limits
from pruneapp.pruning import Progress, PruneSettings
from pruneapp.report import Report


@dataclass
class Inspection:
    """What a file is and where its bytes go, before any pruning."""

    path: str
    kind: str
    structure: str
    file_bytes: int
    n_tensors: int  # weight tensors (tied counted once)
    n_params: int
    dtypes: dict[str, int]  # dtype name -> number of elements
    weights_bytes: int
    extra_bytes: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class SweepPoint:
    sparsity: float
    bytes: dict[str, int]  # format -> measured file size


def inspect_file(path: str | Path, limits: Limits | None = None) -> Inspection:
    """Load ``path`` safely and describe it."""
    raise NotImplementedError


def prune_file(
    input_path: str | Path,
    settings: PruneSettings,
    out_dir: str | Path | None = None,
    formats: Sequence[str] = FORMATS,
    zstd_level: int = 3,
    drop_extras: bool = False,
    force: bool = False,
    limits: Limits | None = None,
    progress: Progress | None = None,
) -> tuple[Report, Path]:
    """Load, prune, write each format into ``out_dir`` (default ./pruned/<stem>/) and measure it.

    Returns the report (also written as report.json) and the output directory.
    """
    raise NotImplementedError


def sweep(
    input_path: str | Path,
    sparsities: Sequence[float],
    settings: PruneSettings,
    formats: Sequence[str] = FORMATS,
    zstd_level: int = 3,
    limits: Limits | None = None,
    progress: Progress | None = None,
) -> list[SweepPoint]:
    """Measured size of each format at each sparsity (files written to a temporary directory)."""
    raise NotImplementedError
