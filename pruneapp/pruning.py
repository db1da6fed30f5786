"""Pruning methods on plain tensors (no model code needed), made permanent with canonical +0.0 zeros.

Methods (``METHODS``):

- ``global-l1``: one magnitude threshold over all selected tensors, the mask of ``torch.nn.utils.prune``'s
  ``global_unstructured(..., L1Unstructured, amount=s)``. The threshold is found without concatenating the weights:
  a radix selection over the magnitudes' bit patterns (``global_threshold``), so extra memory is one chunk of keys
  and a 65536-bin histogram, not a copy of the model.
- ``layer-l1``: ``prune.l1_unstructured`` on each tensor; ``random``: the same count per tensor, chosen at random
  (seeded per tensor name, so the mask does not depend on which other tensors are selected); ``ln-structured``:
  whole output rows (dim 0) with the smallest L1/L2 norm, as ``prune.ln_structured(dim=0)``; ``n:m``: in every group
  of M consecutive elements along the input dimension (a conv kernel's flattened ``in*kh*kw``) keep the N largest
  magnitudes. Tensors whose input dimension is not a multiple of M are left dense, with a warning.

Exact counts and ties: every method prunes exactly ``round(s * n)`` elements (rows for ``ln-structured``), as
torch's ``_compute_nparams_toprune``. torch picks an arbitrary subset among values equal to the threshold; here
everything below the threshold is pruned, then values equal to it in a fixed order (tensor order, then flat
index) until the count is reached, so the mask is the same on every run and device. ``n:m`` keeps, among equal
magnitudes in a group, the first ones. NaN sorts above +inf: it is pruned only if the sparsity asks for more
elements than there are numbers (torch's ``topk`` does the same).
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import numbers
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from pruneapp.errors import SettingsError

METHODS = ("global-l1", "layer-l1", "random", "ln-structured", "n:m")

# One plain sentence per method, for users choosing one (app and CLI help).
METHOD_HELP = {
    "global-l1": "Removes the smallest weights of the whole model at one threshold: the default, and usually best.",
    "layer-l1": "Removes the same share of smallest weights from every layer: use it when no layer may lose much more"
    " than the others.",
    "random": "Removes weights at random (seeded): a baseline to compare the other methods with, not for real use.",
    "ln-structured": "Removes whole rows (output channels) with the smallest norm: use it when you later want to"
    " slim the layers themselves.",
    "n:m": "Keeps N of every M neighbouring weights (2:4 by default): the pattern that sparse tensor cores on recent"
    " NVIDIA GPUs run faster.",
}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

Progress = Callable[[str, float], None]  # (stage message, fraction done in [0, 1])

_CHUNK = 1 << 22  # elements handled at once: bounds every temporary to a few times 16 MiB
_DIGIT_BITS = 16  # bits resolved per radix pass: a 65536-bin histogram
_KEYS = {  # float dtype -> (integer view of the same width, magnitude bits)
    torch.float16: (torch.int16, 15),
    torch.bfloat16: (torch.int16, 15),
    torch.float32: (torch.int32, 31),
    torch.float64: (torch.int64, 63),
}


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


# ---------------------------------------------------------------------------------------------------------------
# Settings and devices


def parse_nm(text: str) -> tuple[int, int]:
    """Parse an N:M pattern such as ``"2:4"``."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not match:
        raise SettingsError(f"Bad N:M pattern {text!r}: write it as two integers like 2:4.")
    nm = (int(match[1]), int(match[2]))
    _check_nm(nm)
    return nm


def validate_settings(settings: PruneSettings) -> None:
    """Raise SettingsError, with the fix, for the first invalid field of ``settings``."""
    if settings.method not in METHODS:
        raise SettingsError(f"Unknown pruning method {settings.method!r}: choose one of {', '.join(METHODS)}.")
    if settings.method != "n:m":
        _check_sparsity(settings.sparsity)
    _check_nm(settings.nm)
    if settings.norm not in (1, 2) or isinstance(settings.norm, bool):
        raise SettingsError(f"Bad norm {settings.norm!r} for ln-structured: use 1 (L1) or 2 (L2).")
    if not isinstance(settings.seed, int) or isinstance(settings.seed, bool):
        raise SettingsError(f"Bad seed {settings.seed!r}: the seed must be an integer.")
    if not isinstance(settings.min_dim, int) or isinstance(settings.min_dim, bool) or settings.min_dim < 0:
        raise SettingsError(f"Bad min_dim {settings.min_dim!r}: use a whole number of dimensions, e.g. 2.")


def _check_sparsity(sparsity: object) -> None:
    ok = isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool) and math.isfinite(sparsity)
    if ok and sparsity == 1:
        raise SettingsError("Sparsity 1.0 would set every weight to zero: choose a value below 1, e.g. 0.9.")
    if not ok or not 0 <= sparsity < 1:
        raise SettingsError(f"Bad sparsity {sparsity!r}: give the fraction of weights to prune in [0, 1), e.g. 0.9.")


def _check_nm(nm: object) -> None:
    ok = isinstance(nm, (tuple, list)) and len(nm) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in nm) and 0 < nm[0] < nm[1]
    if not ok:
        raise SettingsError(f"Bad N:M pattern {nm!r}: N and M must be positive integers with N < M, e.g. 2:4.")


def available_devices() -> list[str]:
    """Every device this machine can prune on: cpu, each CUDA GPU torch sees, and mps where present."""
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return devices + (["mps"] if torch.backends.mps.is_available() else [])


def resolve_device(name: str) -> torch.device:
    """The torch device for ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; SettingsError if absent on this machine."""
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", str(name).strip().lower())
    if not match or (match[2] is not None and match[1] != "cuda"):
        raise SettingsError(f"Unknown device {name!r}: use cpu, cuda, cuda:N or mps.")
    kind, index = match[1], match[2]
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SettingsError(f"Device {name!r} is not available: this machine has no CUDA GPU; use --device cpu.")
        if index is not None and int(index) >= count:
            raise SettingsError(
                f"Device {name!r} is not available: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}."
            )
        return torch.device("cuda", int(index) if index is not None else torch.cuda.current_device())
    if kind == "mps" and not torch.backends.mps.is_available():
        raise SettingsError(f"Device {name!r} is not available: this machine has no Apple GPU; use --device cpu.")
    return torch.device(kind)


# ---------------------------------------------------------------------------------------------------------------
# Exact k-th smallest magnitude by radix selection over bit patterns


@dataclass
class _Cut:
    """Prune every key below ``key``, then the next ``ties`` keys equal to it in the order they are shown."""

    key: int
    ties: int
    kdtype: torch.dtype

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Bool mask (True = prune) for a 1-D chunk of scores; chunks must come in tensor order, then index order."""
        keys = _keys(scores, self.kdtype)
        if self.ties == 0:
            return keys < self.key
        tie = keys == self.key
        found = int(torch.count_nonzero(tie))
        if found <= self.ties:
            self.ties -= found
            return keys <= self.key
        tie &= tie.cumsum(0) <= self.ties
        self.ties = 0
        return tie | (keys < self.key)

    @property
    def value(self) -> float:
        ints = _KEYS[self.kdtype][0]
        return torch.tensor([self.key], dtype=torch.int64).to(ints).view(self.kdtype).item()


def _keys(values: torch.Tensor, kdtype: torch.dtype) -> torch.Tensor:
    """|values| as integers in the order of the magnitudes: the bits with the sign cleared (NaN sorts above +inf)."""
    ints, bits = _KEYS[kdtype]
    keys = values.to(kdtype).view(ints)
    return keys.to(torch.int64 if bits == 63 else torch.int32) & ((1 << bits) - 1)


def _chunks(t: torch.Tensor, device: torch.device | None = None) -> Iterator[torch.Tensor]:
    """1-D chunks of ``t`` in flat index order (views when ``t`` is contiguous and already on ``device``)."""
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        yield chunk if device is None else chunk.to(device)


def _key_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype torch.cat would compare in; every magnitude converts to it exactly."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _pass_widths(bits: int) -> list[int]:
    widths = [_DIGIT_BITS] * (bits // _DIGIT_BITS)
    return widths + [bits % _DIGIT_BITS] if bits % _DIGIT_BITS else widths


def _find_cut(
    sources: Sequence[torch.Tensor], k: int, device: torch.device, tick: Callable[[str], None] | None = None
) -> _Cut:
    """The k-th smallest magnitude (k >= 1) over ``sources``: one histogram pass per 16 bits of key."""
    kdtype = _key_dtype(sources)
    bits = _KEYS[kdtype][1]
    prefix, rank, done = 0, k, 0
    for width in _pass_widths(bits):
        shift = bits - done - width
        hist = torch.zeros(1 << width, dtype=torch.int64, device=device)
        for src in sources:
            for chunk in _chunks(src, device):
                keys = _keys(chunk, kdtype)
                if done:  # keep only keys inside the bucket chosen so far
                    keys = keys[(keys >> (shift + width)) == prefix] & ((1 << (shift + width)) - 1)
                hist += torch.bincount(keys >> shift, minlength=1 << width)
            if tick:
                tick(f"threshold pass {done // _DIGIT_BITS + 1}/{len(_pass_widths(bits))}")
        cum = hist.cumsum(0).cpu()
        digit = int(torch.searchsorted(cum, torch.tensor([rank]))[0])
        rank -= int(cum[digit - 1]) if digit else 0
        prefix, done = (prefix << width) | digit, done + width
    return _Cut(prefix, rank, kdtype)


def global_threshold(tensors: Sequence[torch.Tensor], sparsity: float) -> tuple[float, int]:
    """Return ``(threshold, k)``: ``k = round(sparsity * total)`` and the k-th smallest magnitude over ``tensors``.

    The threshold is the largest magnitude global-l1 prunes (0.0 when k is 0); it is exact, found on the tensors'
    own device without concatenating them. Tensors must be fp16, bf16, fp32 or fp64 (compared as torch.cat would).
    """
    _check_sparsity(sparsity)
    if not tensors or any(t.dtype not in FLOAT_DTYPES for t in tensors):
        raise SettingsError("global_threshold needs at least one fp16, bf16, fp32 or fp64 tensor.")
    k = round(sparsity * sum(t.numel() for t in tensors))
    return (_find_cut(tensors, k, tensors[0].device).value if k else 0.0), k


# ---------------------------------------------------------------------------------------------------------------
# Which tensors


@dataclass
class _Target:
    """One storage to prune: its first key, the tensor and the other keys that hold the very same tensor."""

    name: str
    tensor: torch.Tensor
    aliases: list[str] = field(default_factory=list)
    own_storage: bool = False  # safe to prune in place: no other key sees any byte of its storage


def _share_key(t: torch.Tensor) -> tuple:
    """Equal for tensors that are the same view of the same memory (tied weights)."""
    if t.layout != torch.strided or t.numel() == 0 or t.device.type == "meta":
        return ("object", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)


def _patterns(value: Sequence[str] | str) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _wanted(name: str, t: torch.Tensor, settings: PruneSettings) -> bool:
    if t.dtype not in FLOAT_DTYPES or t.layout != torch.strided or t.numel() == 0:
        return False
    include = _patterns(settings.include)
    return _matches(name, include) if include else t.dim() >= settings.min_dim


def _groups(weights: dict[str, torch.Tensor]) -> dict[tuple, list[str]]:
    groups: dict[tuple, list[str]] = {}
    for name, t in weights.items():
        groups.setdefault(_share_key(t), []).append(name)
    return groups


def _select(weights: dict[str, torch.Tensor], settings: PruneSettings) -> list[_Target]:
    """Selected tensors in key order; a tied tensor is pruned if one of its keys is selected and none excluded."""
    exclude = _patterns(settings.exclude)
    groups = _groups(weights)
    storages: dict[int, int] = {}
    for key in groups:
        storages[key[0]] = storages.get(key[0], 0) + 1
    targets = []
    for key, names in groups.items():
        t = weights[names[0]]
        if any(_wanted(n, t, settings) for n in names) and not any(_matches(n, exclude) for n in names):
            targets.append(_Target(names[0], t, names[1:], storages[key[0]] == 1 and _owns_storage(t)))
    if not targets:
        raise SettingsError(
            f"No tensor to prune: none is a floating-point tensor with at least {settings.min_dim} dimensions"
            f" matching include {list(_patterns(settings.include))} and exclude {list(exclude)}; adjust the patterns."
        )
    return targets


def selected_names(weights: dict[str, torch.Tensor], settings: PruneSettings) -> list[str]:
    """The keys ``prune`` would prune (first key of each tied group), before pruning anything."""
    return [t.name for t in _select(weights, settings)]


def _owns_storage(t: torch.Tensor) -> bool:
    if t.layout != torch.strided or not t.is_contiguous() or t.storage_offset() != 0:
        return False
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(out, everything else) view of a contiguous tensor; 1-D and 0-d tensors are one element per row."""
    return t.view(t.shape[0], -1) if t.dim() >= 2 else t.view(-1, 1)


def _nm_cols(t: torch.Tensor) -> int:
    return t.numel() // t.shape[0] if t.dim() >= 2 else t.numel()


def _nm_divisible(targets: list[_Target], m: int) -> tuple[list[_Target], list[str]]:
    keep, notes = [], []
    for target in targets:
        cols = _nm_cols(target.tensor)
        if cols % m:
            notes.append(f"n:m left {target.name!r} dense: its input dimension ({cols}) is not a multiple of {m}.")
        else:
            keep.append(target)
    return keep, notes


# ---------------------------------------------------------------------------------------------------------------
# Masks, written into a working copy


# writes zeros into the contiguous working copy; True when every zero in it is already +0.0
Applier = Callable[[_Target, torch.Tensor], bool]


def _apply_cut(work: torch.Tensor, cut: _Cut, scores: torch.Tensor | None = None) -> bool:
    """Zero ``work`` where ``cut`` prunes ``scores`` (default: ``work`` itself), chunk by chunk.

    Returns True when that rewrote every zero of ``work`` (its own magnitudes, threshold above 0) as +0.0.
    """
    device = work.device
    score_chunks = _chunks(work if scores is None else scores, device)
    for chunk, score in zip(_chunks(work), score_chunks, strict=True):
        chunk.masked_fill_(cut.mask(score), 0)
    return scores is None and cut.key > 0


def _global_l1(
    targets: list[_Target], settings: PruneSettings, device: torch.device, tick: _Ticker
) -> tuple[Applier, float]:
    tensors = [t.tensor for t in targets]
    k = round(settings.sparsity * sum(t.numel() for t in tensors))
    if k == 0:
        return (lambda target, work: False), 0.0
    cut = _find_cut(tensors, k, device, tick)
    threshold = cut.value
    return (lambda target, work: _apply_cut(work, cut)), threshold


def _layer_l1(settings: PruneSettings, device: torch.device) -> Applier:
    def apply(target: _Target, work: torch.Tensor) -> bool:
        k = round(settings.sparsity * work.numel())
        return _apply_cut(work, _find_cut([work], k, device)) if k else False

    return apply


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little")


def _random(settings: PruneSettings, device: torch.device) -> Applier:
    def apply(target: _Target, work: torch.Tensor) -> bool:
        k = round(settings.sparsity * work.numel())
        if k:
            # scores drawn on the CPU so that every device prunes the same elements
            gen = torch.Generator().manual_seed(_tensor_seed(settings.seed, target.name))
            scores = torch.rand(work.numel(), generator=gen)
            _apply_cut(work, _find_cut([scores], k, device), scores)
        return False

    return apply


def _row_norms(rows: torch.Tensor, n: int) -> torch.Tensor:
    """(out,) L1/L2 norm of each row, accumulated in float64 (float32 on mps, which has no float64)."""
    dtype = torch.float32 if rows.device.type == "mps" else torch.float64
    norms = torch.empty(rows.shape[0], dtype=dtype, device=rows.device)
    step = max(1, _CHUNK // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        norms[start : start + step] = torch.linalg.vector_norm(rows[start : start + step], ord=n, dim=1, dtype=dtype)
    return norms


def _ln_structured(settings: PruneSettings, device: torch.device) -> Applier:
    def apply(target: _Target, work: torch.Tensor) -> bool:
        rows = _rows(work)
        k = round(settings.sparsity * rows.shape[0])
        if k:
            norms = _row_norms(rows, settings.norm)
            rows.masked_fill_(_find_cut([norms], k, device).mask(norms)[:, None], 0)
        return False

    return apply


def _nm_prune_(rows: torch.Tensor, n: int, m: int) -> None:
    """Zero all but the N largest magnitudes in each group of M along dim 1 of ``rows`` (out, cols)."""
    step = max(1, _CHUNK // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step]
        groups = block.view(block.shape[0], -1, m)  # (rows, cols / m, m)
        # a stable sort keeps the first of equal magnitudes, on every device
        order = torch.sort(groups.abs(), dim=-1, descending=True, stable=True).indices
        prune = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., n:], True)
        groups.masked_fill_(prune, 0)


def _nm(settings: PruneSettings) -> Applier:
    n, m = settings.nm

    def apply(target: _Target, work: torch.Tensor) -> bool:
        _nm_prune_(work.view(-1, _nm_cols(work)), n, m)
        return False

    return apply


# ---------------------------------------------------------------------------------------------------------------
# The driver


class _Ticker:
    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, max(1, total), 0

    def __call__(self, message: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(message, min(1.0, self.done / self.total))


def _applier(
    targets: list[_Target], settings: PruneSettings, device: torch.device, tick: _Ticker
) -> tuple[Applier, float | None]:
    if settings.method == "global-l1":
        return _global_l1(targets, settings, device, tick)
    makers = {"layer-l1": _layer_l1, "random": _random, "ln-structured": _ln_structured}
    if settings.method in makers:
        return makers[settings.method](settings, device), None
    return _nm(settings), None


def _count_zeros(t: torch.Tensor) -> int:
    if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
        return 0
    return t.numel() - int(torch.count_nonzero(t))


def _working_copy(target: _Target, device: torch.device, inplace: bool) -> torch.Tensor:
    t = target.tensor.detach()
    if inplace and target.own_storage and t.device == device:
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=device).copy_(t)


def _canonical_zeros_(work: torch.Tensor) -> None:
    """Write every zero as +0.0: ``w * mask`` and negative weights leave -0.0, which costs compressors."""
    for chunk in _chunks(work):
        chunk.masked_fill_(chunk == 0, 0)


def _output(target: _Target, work: torch.Tensor, inplace: bool) -> torch.Tensor:
    original = target.tensor
    if inplace and target.own_storage:
        if work.data_ptr() != original.data_ptr():
            original.detach().copy_(work)
        return original
    return work.cpu()


def target_sparsity(settings: PruneSettings) -> float:
    """The sparsity asked for: n:m's pattern implies it (2:4 is 0.5), whatever ``settings.sparsity`` says."""
    return 1 - settings.nm[0] / settings.nm[1] if settings.method == "n:m" else float(settings.sparsity)


def prune(
    weights: dict[str, torch.Tensor],
    settings: PruneSettings,
    progress: Progress | None = None,
    *,
    inplace: bool = False,
) -> PruneResult:
    """Prune the selected tensors of ``weights`` and return them with zeros written in.

    Pruned tensors come back on the CPU, contiguous, with the input's shapes and dtypes; the rest are the caller's
    own objects. By default the caller's tensors are left untouched (each pruned tensor is copied once). With
    ``inplace=True`` a tensor that owns its whole storage is pruned in place, saving that copy; others are copied.
    """
    validate_settings(settings)
    device = resolve_device(settings.device)
    targets = _select(weights, settings)
    notes: list[str] = []
    if settings.method == "n:m":
        targets, notes = _nm_divisible(targets, settings.nm[1])
    passes = len(_pass_widths(_KEYS[_key_dtype([t.tensor for t in targets])][1])) if targets else 0
    tick = _Ticker(progress, len(targets) * (1 + (passes if settings.method == "global-l1" else 0)))
    zeros_before = {key: _count_zeros(weights[names[0]]) for key, names in _groups(weights).items()}
    outputs: dict[str, torch.Tensor] = {}
    zeros_after: dict[str, int] = {}
    with torch.no_grad():
        apply, threshold = _applier(targets, settings, device, tick)
        for target in targets:
            work = _working_copy(target, device, inplace)
            if not apply(target, work):
                _canonical_zeros_(work)
            zeros_after[target.name] = _count_zeros(work)
            outputs[target.name] = _output(target, work, inplace)
            tick(f"{settings.method}: {target.name}")
    return _result(weights, settings, outputs, zeros_before, zeros_after, threshold, notes)


def _result(
    weights: dict[str, torch.Tensor],
    settings: PruneSettings,
    outputs: dict[str, torch.Tensor],
    zeros_before: dict[tuple, int],
    zeros_after: dict[str, int],
    threshold: float | None,
    notes: list[str],
) -> PruneResult:
    """Output weights (tied keys share the pruned tensor), stats for every key, and the 100% warnings."""
    out_weights, stats, warnings, first_of = {}, [], list(notes), {}
    for name, t in weights.items():
        first = first_of.setdefault(_share_key(t), name)
        pruned = first in outputs
        before = zeros_before[_share_key(t)]
        after = zeros_after[first] if pruned else before
        out_weights[name] = outputs[first] if pruned else t
        shape, dtype = tuple(t.shape), str(t.dtype).removeprefix("torch.")
        tied_to = first if first != name else None
        stats.append(TensorStats(name, shape, dtype, t.numel(), before, after, pruned, tied_to))
        if pruned and tied_to is None and after == t.numel() and before < t.numel():
            warnings.append(
                f"{name!r} was pruned to 100%: all {t.numel()} of its weights are zero;"
                " exclude it from pruning or lower the sparsity."
            )
    counted = [s for s in stats if s.pruned and s.tied_to is None]
    total = sum(s.numel for s in counted)
    achieved = sum(s.zeros_after for s in counted) / total if total else 0.0
    return PruneResult(out_weights, stats, target_sparsity(settings), achieved, threshold, warnings)
