"""Pruning methods on plain tensors (no model code needed), made permanent with canonical +0.0 zeros."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

METHODS = ("global-l1", "layer-l1", "random", "ln-structured", "n:m")

Progress = Callable[[str, float], None]  # (stage message, fraction done in [0, 1])


@dataclass(frozen=True)
class PruneSettings:
    method: str = "global-l1"
    sparsity: float = 0.9  # ignored by n:m (implied by the pattern)
    nm: tuple[int, int] = (2, 4)
    norm: int = 1  # ln-structured: 1 or 2
    seed: int = 0  # random
    include: Sequence[str] = ()  # glob patterns on tensor names; empty = default selection
    exclude: Sequence[str] = ()
    device: str = "cpu"
    min_dim: int = 2  # tensors with fewer dims are left alone


@dataclass
class TensorStats:
    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    zeros_before: int
    zeros_after: int
    pruned: bool
    tied_to: str | None = None  # first key sharing this tensor's storage, if any


@dataclass
class PruneResult:
    weights: dict[str, torch.Tensor]  # same keys/shapes/dtypes as input; tied keys share a tensor
    stats: list[TensorStats]
    target_sparsity: float
    achieved_sparsity: float  # zeros / numel over the pruned tensors (tied counted once)
    threshold: float | None = None  # global-l1's magnitude threshold
    warnings: list[str] = field(default_factory=list)  # e.g. tensors pruned to 100%


def prune(weights: dict[str, torch.Tensor], settings: PruneSettings, progress: Progress | None = None) -> PruneResult:
    """Prune the selected tensors of ``weights`` and return them with zeros written in."""
    raise NotImplementedError
