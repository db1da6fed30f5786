"""Output formats, each a write/read pair over real files: dense, CSR, zstd frames (and packed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pruneapp.limits import Limits
from pruneapp.loading import LoadedModel
from pruneapp.pruning import Progress

FORMATS = ("dense", "csr", "dense.zst", "csr.zst")


@dataclass
class OutputFile:
    format: str  # one of FORMATS
    path: Path
    bytes: int  # measured on disk
    encode_seconds: float
    notes: list[str]  # e.g. tensors kept dense in CSR because CSR would be larger


def output_name(stem: str, fmt: str, safetensors: bool = False) -> str:
    """File name for ``fmt``: <stem>.pruned.pt, <stem>.csr.pt, <stem>.pruned.pt.zst, <stem>.csr.pt.zst."""
    raise NotImplementedError


def write_outputs(
    model: LoadedModel,
    weights: dict[str, torch.Tensor],
    pruned_names: Sequence[str],
    out_dir: Path,
    stem: str,
    formats: Sequence[str] = FORMATS,
    zstd_level: int = 3,
    drop_extras: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> list[OutputFile]:
    """Write each requested format atomically (temp name, then rename) and return what was written."""
    raise NotImplementedError


def read_weights(path: str | Path, limits: Limits | None = None) -> dict[str, torch.Tensor]:
    """Read any pruneapp output back into a dense state_dict (bit-for-bit equal to the pruned tensors)."""
    raise NotImplementedError
