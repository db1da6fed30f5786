"""The steps a user runs, end to end: inspect a file; load, prune, write and measure its outputs; sweep sparsity.

The CLI and the app both call these functions.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pruneapp import formats as fmt
from pruneapp import isolation, loading, packed
from pruneapp.errors import OutputExistsError, PruneAppError, SettingsError
from pruneapp.limits import Limits, default_limits
from pruneapp.loading import LoadedModel
from pruneapp.pruning import (
    Progress,
    PruneSettings,
    prune,
    resolve_device,
    selected_names,
    target_sparsity,
    validate_settings,
)
from pruneapp.report import Histogram, InputInfo, OutputSize, Report

Loader = Callable[[Path, Limits], LoadedModel]
HISTOGRAM_BINS = 80


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


def _load_isolated(path: Path, limits: Limits) -> LoadedModel:
    """Files come from users: load them in a worker process under memory, CPU and time limits."""
    return isolation.load_isolated(path, limits)


def unique_tensors(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights with tied keys (the same tensor object) counted once, first key kept."""
    seen: set[int] = set()
    out = {}
    for name, t in weights.items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def describe(model: LoadedModel) -> Inspection:
    """Summarise a loaded model for display."""
    tensors = unique_tensors(model.weights)
    dtypes: dict[str, int] = {}
    for t in tensors.values():
        key = str(t.dtype).removeprefix("torch.")
        dtypes[key] = dtypes.get(key, 0) + t.numel()
    return Inspection(
        path=str(model.path),
        kind=model.kind,
        structure=model.structure,
        file_bytes=model.file_bytes,
        n_tensors=len(tensors),
        n_params=sum(t.numel() for t in tensors.values()),
        dtypes=dtypes,
        weights_bytes=loading.tensor_bytes(model.weights),
        extra_bytes=dict(model.extra_bytes),
        metadata=dict(model.metadata),
        notes=list(model.notes),
    )


def inspect_file(path: str | Path, limits: Limits | None = None, loader: Loader | None = None) -> Inspection:
    """Load ``path`` safely and describe it."""
    limits = limits or default_limits()
    return describe((loader or _load_isolated)(Path(path), limits))


def default_out_dir(input_path: Path) -> Path:
    return Path("pruned") / input_path.name.split(".")[0]


def output_stem(input_path: Path) -> str:
    """``model.pt`` -> ``model``; ``model.v2.safetensors`` -> ``model.v2``; ``model.csr.pt.zst`` -> ``model``."""
    name = input_path.name.removesuffix(".zst")
    for suffix in (".pruned.pt", ".pruned.safetensors", ".csr.pt", packed.EXTENSION):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


class _Stages:
    """Maps each stage's own 0..1 progress onto one overall bar, and times the stages."""

    WEIGHTS = {"load": 0.15, "prune": 0.35, "encode": 0.35, "measure": 0.15}

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, message: str) -> Iterator[Progress]:
        start = sum(self.WEIGHTS[s] for s in self.WEIGHTS if s in self.seconds)
        width = self.WEIGHTS[name]

        def report(msg: str, fraction: float) -> None:
            if self.progress:
                self.progress(f"{name}: {msg}", min(1.0, start + width * max(0.0, min(1.0, fraction))))

        report(message, 0.0)
        t0 = time.perf_counter()
        yield report
        self.seconds[name] = time.perf_counter() - t0
        report("done", 1.0)


_FINE_SHIFT = 16  # fine buckets: float32 magnitude bits >> 16 = exponent + top 7 mantissa bits (1/128 octave)
_FINE_BUCKETS = 0x7F80  # keys of finite magnitudes (inf = 0x7F800000 >> 16)
_CHUNK = 1 << 22


def magnitude_histogram(
    weights: dict[str, torch.Tensor], names: Sequence[str], threshold: float | None, bins: int = HISTOGRAM_BINS
) -> Histogram:
    """Exact histogram of log10 |w| over the named tensors (zeros counted apart; NaN and inf left out).

    Counts fine buckets of the float32 bit pattern chunk by chunk (no float64 copy of the model), then joins
    them into about ``bins`` bins whose edges are fine-bucket boundaries, evenly spaced in log10 |w|.
    """
    fine = torch.zeros(1 << 15, dtype=torch.int64)  # every key; those from _FINE_BUCKETS up are inf and NaN
    zeros = 0
    for name in names:
        for chunk in weights[name].detach().reshape(-1).split(_CHUNK):
            bits = chunk.float().view(torch.int32)
            step = torch.bincount((bits >> _FINE_SHIFT) & 0x7FFF, minlength=1 << 15)  # sign bit dropped
            if step[0]:  # bucket 0 holds zeros and subnormals: count the zeros exactly
                zeros += int(((bits & 0x7FFFFFFF) == 0).sum())
            fine += step
    fine = fine[:_FINE_BUCKETS]
    fine[0] -= zeros
    used = fine.nonzero().flatten()
    if used.numel() == 0:
        return Histogram(edges=[], counts=[], zeros=zeros, threshold=threshold)
    lo, hi = int(used[0]), int(used[-1]) + 1
    bounds = torch.arange(max(lo, 1), hi + 1, dtype=torch.int32) << _FINE_SHIFT  # (k,) float32 bit patterns
    logs = bounds.view(torch.float32).double().log10()
    targets = torch.linspace(float(logs[0]), float(logs[-1]), bins + 1, dtype=torch.float64)
    picks = torch.unique(torch.searchsorted(logs, targets).clamp_(0, logs.numel() - 1))
    picks[0], picks[-1] = 0, logs.numel() - 1
    picks = torch.unique(picks)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.int64), fine[max(lo, 1) : hi].cumsum(0)])
    counts = (cumulative[picks[1:]] - cumulative[picks[:-1]]).tolist()
    counts[0] += int(fine[0]) if lo == 0 else 0  # subnormals below the first edge
    return Histogram(edges=logs[picks].tolist(), counts=counts, zeros=zeros, threshold=threshold)


def torch_prune_bytes(model: LoadedModel, pruned: Sequence[str]) -> int:
    """Size of the file ``torch.nn.utils.prune`` users save before ``prune.remove``, measured by writing it.

    The input's own structure (optimizer state and other entries included), where each pruned ``name``
    becomes ``name_orig`` (the original weights) plus ``name_mask`` (a mask of the weight's dtype and shape).
    torch.save stores records uncompressed, so a stand-in that shares the original's memory under a storage
    of its own gives the mask's exact byte count without allocating it.
    """
    pruned_set = set(pruned)
    state: dict[str, torch.Tensor] = {}
    for name, t in model.weights.items():
        if name in pruned_set:
            state[name + "_orig"] = t
            state[name + "_mask"] = _same_bytes_new_storage(t)
        else:
            state[name] = t
    return saved_size(model.rebuild(state), output_stem(model.path))


def saved_size(obj: object, stem: str) -> int:
    """Bytes ``torch.save(obj, "<stem>.pt")`` writes, without writing the tensors' bytes.

    Under ``skip_data`` torch lays the file out in full but leaves holes where storage bytes go, so the
    size is exact and costs no I/O. torch names the archive's inner folder after the file, so the file
    carries that name.
    """
    with tempfile.TemporaryDirectory(prefix="pruneapp-size-") as tmp:
        path = Path(tmp) / f"{stem}.pt"
        with torch.serialization.skip_data():
            torch.save(obj, path)
        return path.stat().st_size


def _same_bytes_new_storage(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    if t.numel() == 0:
        return torch.empty_like(t)
    raw = t.view(torch.uint8) if t.element_size() == 1 else t.view(_INT_OF_SIZE[t.element_size()])
    return torch.frombuffer(raw.numpy(), dtype=t.dtype).view(t.shape)


_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(weights: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """dtype, shape and CRC-32 of every tensor's bytes: enough to prove a read-back equal, bit for bit."""
    names = list(weights)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # zlib releases the GIL
        crcs = list(pool.map(lambda name: _crc(weights[name]), names))
    return {n: (str(weights[n].dtype), tuple(weights[n].shape), crc) for n, crc in zip(names, crcs, strict=True)}


def _crc(t: torch.Tensor) -> int:
    t = t.detach().contiguous()
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else 0


def _check_round_trip(path: Path, expected: dict[str, tuple[str, tuple[int, ...], int]], limits: Limits) -> float:
    """Read an output back, prove it equals the pruned weights bit for bit, and return the decode time."""
    t0 = time.perf_counter()
    got = fmt.read_weights(path, limits)
    seconds = time.perf_counter() - t0
    if fingerprint(got) != expected:
        wrong = sorted(set(expected) ^ set(got)) or [n for n in expected if fingerprint({n: got[n]})[n] != expected[n]]
        raise PruneAppError(
            f"Internal check failed: {path.name} does not read back {wrong[0]!r} exactly; please report this."
        )
    return seconds


def prune_model(
    model: LoadedModel,
    settings: PruneSettings,
    out_dir: Path,
    formats: Sequence[str] = fmt.ALL_FORMATS,
    zstd_level: int = 3,
    drop_extras: bool = False,
    force: bool = False,
    limits: Limits | None = None,
    stages: _Stages | None = None,
    inplace: bool = False,
) -> Report:
    """Prune an already loaded model, write every format into ``out_dir``, read each back and measure it.

    With ``inplace`` the model's own tensors are pruned (no second copy of the weights in memory) and released
    once written, so reading the outputs back never holds two copies: the model is used up.
    """
    limits = limits or default_limits()
    stages = stages or _Stages(None)
    stem = output_stem(model.path)
    with stages.stage("prune", f"{settings.method} at {target_sparsity(settings):.0%}") as report:
        selected = selected_names(model.weights, settings)
        histogram = magnitude_histogram(model.weights, selected, None)
        trap = torch_prune_bytes(model, selected)
        input_weight_bytes = loading.tensor_bytes(model.weights)
        result = prune(model.weights, settings, report, inplace=inplace)
    histogram.threshold = result.threshold
    pruned_names = [s.name for s in result.stats if s.pruned and s.tied_to is None]
    auto = tuple(formats) == ("auto",)
    write_dir = Path(tempfile.mkdtemp(prefix=".auto-", dir=out_dir)) if auto else out_dir
    try:
        with stages.stage("encode", "writing outputs") as report:
            written = fmt.write_outputs(
                model,
                result.weights,
                pruned_names,
                write_dir,
                stem,
                fmt.ALL_FORMATS if auto else formats,
                zstd_level=zstd_level,
                drop_extras=drop_extras,
                force=force or auto,
                progress=report,
            )
        with stages.stage("measure", "reading outputs back") as report:
            expected = fingerprint(result.weights)
            if inplace:  # the outputs hold the weights now: free them before reading each output back
                result.weights, model.weights, model.extras = {}, {}, {}
            outputs = []
            for i, out in enumerate(written):
                report(out.path.name, i / max(1, len(written)))
                decode = _check_round_trip(out.path, expected, limits)
                outputs.append(_output_size(out, decode, model.file_bytes))
            if auto:
                outputs = [_keep_smallest(outputs, write_dir, out_dir, force)]
    finally:
        if auto:
            shutil.rmtree(write_dir, ignore_errors=True)
    rep = Report(
        input=InputInfo(
            path=str(model.path),
            bytes=model.file_bytes,
            kind=model.kind,
            structure=model.structure,
            weights_bytes=input_weight_bytes,
            extra_bytes=dict(model.extra_bytes),
            notes=list(model.notes),
        ),
        settings=_settings_dict(settings, zstd_level, drop_extras),
        sparsity_target=result.target_sparsity,
        sparsity_achieved=result.achieved_sparsity,
        outputs=outputs,
        torch_prune_bytes=trap,
        tensors=result.stats,
        histogram=histogram,
        warnings=list(result.warnings),
        seconds=dict(stages.seconds),
    )
    rep.write_json(out_dir / "report.json")
    return rep


def _output_size(out: fmt.OutputFile, decode_seconds: float, input_bytes: int) -> OutputSize:
    return OutputSize(
        format=out.format,
        path=out.path.name,
        bytes=out.bytes,
        ratio=out.bytes / max(1, input_bytes),
        encode_seconds=out.encode_seconds,
        decode_seconds=decode_seconds,
        notes=list(out.notes),
    )


def _keep_smallest(outputs: list[OutputSize], staging: Path, out_dir: Path, force: bool) -> OutputSize:
    """``--formats auto``: move the smallest measured output into ``out_dir``; the others are discarded."""
    best = min(outputs, key=lambda o: o.bytes)
    target = out_dir / best.path
    if target.exists() and not force:
        raise OutputExistsError(f"{target} already exists; pass --force to overwrite it.")
    (staging / best.path).replace(target)
    others = ", ".join(f"{o.format} {o.bytes} B" for o in outputs if o is not best)
    best.notes.append(f"auto: smallest of all formats (others: {others})")
    return best


def _settings_dict(settings: PruneSettings, zstd_level: int, drop_extras: bool) -> dict:
    return {
        "method": settings.method,
        "sparsity": target_sparsity(settings),
        "nm": f"{settings.nm[0]}:{settings.nm[1]}",
        "norm": settings.norm,
        "seed": settings.seed,
        "include": list(settings.include),
        "exclude": list(settings.exclude),
        "device": settings.device,
        "zstd_level": zstd_level,
        "drop_extras": drop_extras,
    }


def prune_file(
    input_path: str | Path,
    settings: PruneSettings,
    out_dir: str | Path | None = None,
    formats: Sequence[str] = fmt.ALL_FORMATS,
    zstd_level: int = 3,
    drop_extras: bool = False,
    force: bool = False,
    limits: Limits | None = None,
    progress: Progress | None = None,
    loader: Loader | None = None,
) -> tuple[Report, Path]:
    """Load, prune, write each format into ``out_dir`` (default ./pruned/<stem>/) and measure it.

    Returns the report (also written as report.json) and the output directory.
    """
    input_path = Path(input_path)
    limits = limits or default_limits()
    out = Path(out_dir) if out_dir is not None else default_out_dir(input_path)
    check_settings(settings, formats, zstd_level)
    if out.resolve() == input_path.resolve() or (out.exists() and not out.is_dir()):
        raise SettingsError(f"Output directory {out} is not a directory; choose another with --out.")
    if (out / "report.json").resolve() == input_path.resolve():
        raise SettingsError(f"The report would overwrite the input {input_path}; choose another --out.")
    if not force and (out / "report.json").exists():
        raise OutputExistsError(f"{out / 'report.json'} already exists; pass --force to overwrite it, or pick --out.")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)  # before the load: an unwritable --out fails at once
        stages = _Stages(progress)
        with stages.stage("load", input_path.name):
            model = (loader or _load_isolated)(input_path, limits)
        report = prune_model(model, settings, out, formats, zstd_level, drop_extras, force, limits, stages, True)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return report, out


def check_settings(settings: PruneSettings, formats: Sequence[str], zstd_level: int) -> None:
    """Every setting checked before any work, so a typo never costs the user a long load."""
    validate_settings(settings)
    resolve_device(settings.device)
    fmt.check_formats(formats, zstd_level)


def sweep(
    input_path: str | Path,
    sparsities: Sequence[float],
    settings: PruneSettings,
    formats: Sequence[str] = fmt.ALL_FORMATS,
    zstd_level: int = 3,
    limits: Limits | None = None,
    progress: Progress | None = None,
    loader: Loader | None = None,
) -> list[SweepPoint]:
    """Measured size of each format at each sparsity (files written to a temporary directory)."""
    limits = limits or default_limits()
    model = (loader or _load_isolated)(Path(input_path), limits)
    points = []
    with tempfile.TemporaryDirectory(prefix="pruneapp-sweep-") as tmp:
        for i, s in enumerate(sparsities):
            if progress:
                progress(f"sparsity {s:.0%}", i / max(1, len(sparsities)))
            result = prune(model.weights, replace(settings, sparsity=s))
            names = [st.name for st in result.stats if st.pruned and st.tied_to is None]
            step = Path(tmp) / f"s{i}"
            stem = output_stem(model.path)
            written = fmt.write_outputs(model, result.weights, names, step, stem, formats, zstd_level)
            points.append(SweepPoint(sparsity=s, bytes={o.format: o.bytes for o in written}))
            for o in written:
                o.path.unlink(missing_ok=True)
    if progress:
        progress("done", 1.0)
    return points
