"""The reference bound: how few bytes pruned weights need under a simple, stated entropy model.

Per pruned tensor: the mask's entropy (n * H2(density) bits, positions independent) plus the order-0
entropy of each byte plane of the kept values; unpruned tensors count at their raw size. Formats are
compared against it; a format can go below it only by exploiting structure the model ignores.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch

INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-size integer views


def byte_rows(t: torch.Tensor) -> torch.Tensor:
    """(n, itemsize) uint8 view of a tensor's elements (a contiguous CPU copy if needed)."""
    t = t.detach().resolve_conj().resolve_neg().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).view(t.numel(), t.element_size())


def nonzero_mask(rows: torch.Tensor) -> torch.Tensor:
    """True where an element's bits are not all zero: -0.0 and NaN are values, only +0.0 (or 0) is a zero."""
    w = rows.shape[1]
    if w in INT_VIEW:
        return rows.view(INT_VIEW[w]).view(-1) != 0
    return (rows.view(torch.int64) != 0).any(dim=1)


def kept_rows(rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(k, itemsize) rows where ``mask`` is True, selected through an integer view (faster than row indexing)."""
    w = rows.shape[1]
    if w not in INT_VIEW:
        return rows[mask]
    return rows.view(INT_VIEW[w]).view(-1)[mask].view(torch.uint8).view(-1, w)


def entropy_bits(hist: torch.Tensor) -> float:
    """Order-0 entropy, in bits per symbol, of a histogram of counts."""
    total = float(hist.sum())
    if total == 0:
        return 0.0
    p = hist[hist > 0].double() / total
    return float(-(p * p.log2()).sum())


def binary_entropy(p: float) -> float:
    """H2(p) in bits."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def plane_histograms(rows: torch.Tensor) -> list[torch.Tensor]:
    """Histogram of byte i of every element, for each byte position i (little-endian)."""
    return [torch.bincount(rows[:, i].contiguous(), minlength=256) for i in range(rows.shape[1])]


def tensor_bound_bits(t: torch.Tensor, pruned: bool) -> float:
    """Bits the reference model allows for one tensor: mask + kept byte planes, or raw when unpruned."""
    rows = byte_rows(t)
    n = rows.shape[0]
    if not pruned or n == 0:
        return 8.0 * rows.numel()
    mask = nonzero_mask(rows)
    k = int(mask.sum())
    kept = kept_rows(rows, mask)
    return n * binary_entropy(k / n) + sum(k * entropy_bits(h) for h in plane_histograms(kept))


def tie_key(t: torch.Tensor) -> tuple | None:
    """Identifies tensors that are the very same view of one storage (tied weights); None for empty ones."""
    if t.numel() == 0:
        return None
    return (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)


def reference_bound_bytes(weights: dict[str, torch.Tensor], pruned_names: Collection[str]) -> int:
    """Reference bound in bytes, rounded to the nearest byte; keys sharing one tensor count once."""
    pruned = set(pruned_names)
    seen: set[object] = set()
    bits = 0.0
    for name, t in weights.items():
        keys = {("id", id(t)), tie_key(t)} - {None}
        if keys & seen:
            continue
        seen |= keys
        bits += tensor_bound_bits(t, name in pruned)
    return round(bits / 8)
