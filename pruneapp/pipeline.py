"""The steps a user runs, end to end: inspect a file; load, prune, write and measure its outputs; sweep sparsity.

The CLI and the app both call these functions.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pruneapp import formats as fmt
from pruneapp import isolation, loading
from pruneapp.errors import OutputExistsError, PruneAppError, SettingsError
from pruneapp.limits import Limits, default_limits
from pruneapp.loading import LoadedModel
from pruneapp.pruning import Progress, PruneSettings, prune, selected_names
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
    """``model.pt`` -> ``model``; ``model.v2.safetensors`` -> ``model.v2``."""
    return input_path.stem or input_path.name


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


def magnitude_histogram(
    weights: dict[str, torch.Tensor], names: Sequence[str], threshold: float | None, bins: int = HISTOGRAM_BINS
) -> Histogram:
    """Histogram of log10 |w| over the named tensors, built tensor by tensor (zeros counted apart)."""
    lo, hi, zeros = math.inf, -math.inf, 0
    for name in names:
        a = weights[name].detach().abs().float()
        nz = a[(a > 0) & torch.isfinite(a)]
        zeros += a.numel() - nz.numel()
        if nz.numel():
            lo, hi = min(lo, nz.min().item()), max(hi, nz.max().item())
    if lo > hi:
        return Histogram(edges=[], counts=[], zeros=zeros, threshold=threshold)
    lo, hi = math.log10(lo), math.log10(hi)
    hi = hi if hi > lo else lo + 1.0
    counts = torch.zeros(bins, dtype=torch.float64)
    for name in names:
        a = weights[name].detach().abs().float()
        nz = a[(a > 0) & torch.isfinite(a)]
        counts += torch.histc(nz.double().log10().clamp_(lo, hi), bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64).tolist()
    return Histogram(edges=edges, counts=[int(c) for c in counts.tolist()], zeros=zeros, threshold=threshold)


def torch_prune_bytes(weights: dict[str, torch.Tensor], pruned: Sequence[str], directory: Path, stem: str) -> int:
    """Size of the file ``torch.nn.utils.prune`` saves before ``prune.remove``, measured by writing it.

    Each pruned ``name`` becomes ``name_orig`` (the original weights) plus ``name_mask`` (a mask of the
    weight's own dtype and shape). torch.save stores records uncompressed, so a stand-in that shares the
    original's memory under a storage of its own gives the mask's exact byte count without allocating it.
    """
    pruned_set = set(pruned)
    state: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if name in pruned_set:
            state[name + "_orig"] = t
            state[name + "_mask"] = _same_bytes_new_storage(t)
        else:
            state[name] = t
    with tempfile.TemporaryDirectory(prefix=".torch-prune-", dir=directory) as tmp:
        path = Path(tmp) / f"{stem}.pt"  # torch names the archive's folder after the file
        torch.save(state, path)
        return path.stat().st_size


def _same_bytes_new_storage(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    if t.numel() == 0:
        return torch.empty_like(t)
    raw = t.view(torch.uint8) if t.element_size() == 1 else t.view(_INT_OF_SIZE[t.element_size()])
    return torch.frombuffer(raw.numpy(), dtype=t.dtype).view(t.shape)


_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _check_round_trip(path: Path, expected: dict[str, torch.Tensor], limits: Limits) -> float:
    """Read an output back, prove it equals the pruned weights bit for bit, and return the decode time."""
    t0 = time.perf_counter()
    got = fmt.read_weights(path, limits)
    seconds = time.perf_counter() - t0
    for name, t in expected.items():
        other = got.get(name)
        if other is None or other.dtype != t.dtype or other.shape != t.shape or not _bits_equal(other, t):
            raise PruneAppError(
                f"Internal check failed: {path.name} does not read back {name!r} exactly; please report this."
            )
    return seconds


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.is_floating_point and a.element_size() in (2, 4, 8):
        return torch.equal(
            a.contiguous().view(_INT_OF_SIZE[a.element_size()]), b.contiguous().view(_INT_OF_SIZE[a.element_size()])
        )
    return torch.equal(a, b)


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

    With ``inplace`` the model's own tensors are pruned (no second copy of the weights in memory).
    """
    limits = limits or default_limits()
    stages = stages or _Stages(None)
    stem = output_stem(model.path)
    with stages.stage("prune", f"{settings.method} at {settings.sparsity:.0%}") as report:
        selected = selected_names(model.weights, settings)
        histogram = magnitude_histogram(model.weights, selected, None)
        trap = torch_prune_bytes(model.weights, selected, out_dir, stem)
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
            outputs = []
            for i, out in enumerate(written):
                report(out.path.name, i / max(1, len(written)))
                decode = _check_round_trip(out.path, result.weights, limits)
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
        "sparsity": settings.sparsity,
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
    if out.resolve() == input_path.resolve() or (out.exists() and not out.is_dir()):
        raise SettingsError(f"Output directory {out} is not a directory; choose another with --out.")
    if not force and (out / "report.json").exists():
        raise OutputExistsError(f"{out / 'report.json'} already exists; pass --force to overwrite it, or pick --out.")
    stages = _Stages(progress)
    with stages.stage("load", input_path.name):
        model = (loader or _load_isolated)(input_path, limits)
    out.mkdir(parents=True, exist_ok=True)
    report = prune_model(model, settings, out, formats, zstd_level, drop_extras, force, limits, stages, inplace=True)
    return report, out


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
