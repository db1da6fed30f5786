"""The reference bound: how few bytes pruned weights need under a simple, stated entropy model.

Per pruned tensor: the mask's entropy (n * H2(density) bits, positions independent) plus the order-0
entropy of each byte plane of the kept values; unpruned tensors count at their raw size. Formats are
compared against it; a format can go below it only by exploiting structure the model ignores.
Also the byte-level helpers the packed format shares (numpy: several times faster than torch here).
"""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np
import torch


def byte_rows(t: torch.Tensor) -> np.ndarray:
    """(n, itemsize) uint8 view of a tensor's elements, little-endian (a contiguous CPU copy if needed)."""
    t = t.detach().resolve_conj().resolve_neg().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().reshape(t.numel(), t.element_size())


_ITEM_TYPES = {w: np.dtype(f"<u{w}" if w in (1, 2, 4, 8) else f"V{w}") for w in range(1, 17)}


def items(rows: np.ndarray) -> np.ndarray:
    """1-D view with one item per row: unsigned integers where the width allows, else raw bytes (void)."""
    w = rows.shape[1]
    return rows.view(_ITEM_TYPES.get(w) or np.dtype(f"V{w}")).reshape(-1)


def nonzero_mask(rows: np.ndarray) -> np.ndarray:
    """True where an element's bits are not all zero: -0.0 and NaN are values, only +0.0 (or 0) is a zero."""
    w = rows.shape[1]
    if w in (1, 2, 4, 8):
        return items(rows) != 0
    return (rows.view("<u8") != 0).any(axis=1)


def kept_rows(rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(k, itemsize) rows where ``mask`` is True."""
    return np.compress(mask, items(rows)).view(np.uint8).reshape(-1, rows.shape[1])


def byte_histogram(data: np.ndarray) -> np.ndarray:
    """Counts of each byte value in a 1-D uint8 array (bincount over byte pairs, then folded: ~5x faster)."""
    pairs = np.bincount(data[: data.size // 2 * 2].view("<u2"), minlength=65536).reshape(256, 256)
    hist = pairs.sum(axis=0) + pairs.sum(axis=1)  # low bytes + high bytes
    if data.size % 2:
        hist[data[-1]] += 1
    return hist


def entropy_bits(hist: np.ndarray) -> float:
    """Order-0 entropy, in bits per symbol, of a histogram of counts."""
    total = float(hist.sum())
    if total == 0:
        return 0.0
    p = hist[hist > 0] / total
    return float(-(p * np.log2(p)).sum())


def binary_entropy(p: float) -> float:
    """H2(p) in bits."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def planes(rows: np.ndarray) -> np.ndarray:
    """(itemsize, n) byte planes: plane i holds byte i of every element (the shuffle of blosc)."""
    return np.ascontiguousarray(rows.T)


def tensor_bound_bits(t: torch.Tensor, pruned: bool) -> float:
    """Bits the reference model allows for one tensor: mask + kept byte planes, or raw when unpruned."""
    rows = byte_rows(t)
    n = rows.shape[0]
    if not pruned or n == 0:
        return 8.0 * rows.size
    mask = nonzero_mask(rows)
    k = int(np.count_nonzero(mask))
    return n * binary_entropy(k / n) + sum(k * entropy_bits(byte_histogram(p)) for p in planes(kept_rows(rows, mask)))


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
