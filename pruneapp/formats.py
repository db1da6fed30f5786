"""Output formats, each a write/read pair over real files: dense, CSR, zstd frames (and packed).

Writing is atomic (temporary name in the target folder, then ``os.replace``). Reading treats our own files as
untrusted input too: decompressed sizes are capped while streaming and sparse indices are validated.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickletools
import shutil
import struct
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import zstandard

from pruneapp import checks, loading, packed
from pruneapp.errors import (
    CorruptFileError,
    LimitExceededError,
    OutputExistsError,
    PruneAppError,
    SettingsError,
    UnsupportedFileError,
)
from pruneapp.limits import Limits, default_limits

if TYPE_CHECKING:
    from pruneapp.pruning import Progress

FORMATS = ("dense", "csr", "dense.zst", "csr.zst")
ALL_FORMATS = (*FORMATS, "packed")
FORMAT_ALIASES = {"zstd": ("dense.zst", "csr.zst"), "all": ALL_FORMATS}
AUTO = "auto"  # write every format, keep only the smallest

# Level 3 by measurement: a 5.0M-parameter fp32 state_dict (bench.synthetic_weights) pruned to 0.9 by global-l1,
# compress_file() on 2 CPU cores, best of 3 runs:
#   level  dense .pt (20.0 MB) -> .zst     CSR .pt (4.14 MB) -> .zst
#     1    2.64 MB   0.03 s                 2.58 MB   0.01 s
#     3    2.80 MB   0.05 s                 2.51 MB   0.02 s
#     5    2.72 MB   0.07 s                 2.44 MB   0.03 s
#     9    2.58 MB   0.23 s                 2.44 MB   0.05 s
#    19    2.35 MB   7.71 s                 2.38 MB   1.15 s
# At sparsity 0.5 (dense 20.0 MB): 11.28 / 10.89 / 10.86 / 10.83 / 10.46 MB in 0.05 / 0.08 / 0.26 / 0.62 / 11.7 s.
# Level 3 is within 3% of level 9 on the smallest output (CSR .zst) at 4-8x its speed; 19 saves 3-11% at ~100x.
DEFAULT_ZSTD_LEVEL = 3
ZSTD_LEVELS = range(1, zstandard.MAX_COMPRESSION_LEVEL + 1)

CSR_FORMAT = "pruneapp-csr"
CSR_VERSION = 1
ALIASES_METADATA_KEY = "pruneapp.aliases"  # safetensors cannot share tensors: tied keys are recorded here

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZIP_MAGIC = b"PK\x03\x04"
_ZSTD_INPUT_CHUNK = 2048  # a zstd block turns 4 bytes into 128 KiB at most: <= 64 MiB of output per chunk
_COPY_CHUNK = 1 << 20
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # same width, compared bit for bit
_INT32_MAX = 2**31 - 1
_CSR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class OutputFile:
    format: str  # one of ALL_FORMATS
    path: Path
    bytes: int  # measured on disk
    encode_seconds: float  # for .zst: writing the inner file plus compressing it
    notes: list[str] = field(default_factory=list)  # e.g. tensors kept dense in CSR because CSR would be larger


# ---------------------------------------------------------------------------------------------------------------
# Names


def parse_formats(text: str) -> tuple[str, ...]:
    """``"dense,csr,zstd"`` -> ``("dense", "csr", "dense.zst", "csr.zst")``; unknown names raise SettingsError."""
    wanted: set[str] = set()
    names = [part.strip().lower() for part in text.split(",")]
    if AUTO in names:
        if names != [AUTO]:
            raise SettingsError(f"--formats auto picks one file by itself; give it alone, not with {text!r}.")
        return (AUTO,)
    for name in names:
        if name in FORMAT_ALIASES:
            wanted.update(FORMAT_ALIASES[name])
        elif name in ALL_FORMATS:
            wanted.add(name)
        elif name:
            choices = ", ".join((*ALL_FORMATS, *FORMAT_ALIASES, AUTO))
            raise SettingsError(f"Unknown output format {name!r}; choose from {choices}.")
    if not wanted:
        raise SettingsError(f"No output format given; use for example --formats {','.join(FORMATS)}.")
    return tuple(f for f in ALL_FORMATS if f in wanted)


def check_formats(formats: Sequence[str], zstd_level: int) -> tuple[str, ...]:
    """The formats, parsed, after checking that they and the zstd level are valid."""
    parsed = parse_formats(",".join(formats))
    uses_zstd = parsed == (AUTO,) or any(f.endswith(".zst") or f == "packed" for f in parsed)
    if uses_zstd and zstd_level not in ZSTD_LEVELS:
        raise SettingsError(f"zstd level {zstd_level} is out of range; choose 1 to {ZSTD_LEVELS[-1]}.")
    return parsed


def output_name(stem: str, fmt: str, safetensors: bool = False) -> str:
    """File name for ``fmt``: <stem>.pruned.pt (.pruned.safetensors), <stem>.csr.pt, <name>.zst, <stem>.pruneapp."""
    dense = f"{stem}.pruned.safetensors" if safetensors else f"{stem}.pruned.pt"
    names = {"dense": dense, "csr": f"{stem}.csr.pt", "dense.zst": dense + ".zst", "csr.zst": f"{stem}.csr.pt.zst"}
    if fmt == "packed":
        return stem + packed.EXTENSION
    if fmt not in names:
        raise SettingsError(f"Unknown output format {fmt!r}; choose from {', '.join(ALL_FORMATS)}.")
    return names[fmt]


def _is_safetensors(model: loading.LoadedModel) -> bool:
    return model.structure == "safetensors" or model.kind == "safetensors"


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_outputs(
    model: loading.LoadedModel,
    weights: dict[str, torch.Tensor],
    pruned_names: Sequence[str],
    out_dir: Path,
    stem: str,
    formats: Sequence[str] = FORMATS,
    zstd_level: int = DEFAULT_ZSTD_LEVEL,
    drop_extras: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> list[OutputFile]:
    """Write each requested format atomically (temp name, then rename) and return what was written.

    Every target is checked before anything is written, so a refusal leaves the folder as it was.
    """
    formats = check_formats(formats, zstd_level)
    out_dir = _prepare_dir(Path(out_dir))
    targets = {f: out_dir / output_name(stem, f, _is_safetensors(model)) for f in formats}
    _check_targets(targets.values(), Path(model.path), force)
    writer = _Writer(model, weights, set(pruned_names), zstd_level, drop_extras)
    written = []
    for i, fmt in enumerate(formats):
        if progress:
            progress(f"writing {targets[fmt].name}", i / len(formats))
        written.append(writer.write(fmt, targets[fmt]))
    if progress:
        progress("outputs written", 1.0)
    return written


def _prepare_dir(out_dir: Path) -> Path:
    if out_dir.exists() and not out_dir.is_dir():
        raise SettingsError(f"Output folder {out_dir} is a file; choose another folder with --out.")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _check_targets(targets: Iterable[Path], input_path: Path, force: bool) -> None:
    for target in targets:
        if _same_file(target, input_path):
            raise SettingsError(f"Writing {target} would overwrite the input file; choose another folder with --out.")
        if target.exists() and not force:
            raise OutputExistsError(f"{target} already exists; pass --force to overwrite it or choose another --out.")
        if target.exists() and target.is_dir():
            raise SettingsError(f"{target} is a folder; remove it or choose another --out.")


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path for ``target`` in a private folder beside it; move it onto ``target`` on success.

    The temporary file has ``target``'s own name (torch.save names the archive's inner folder after the file,
    so the finished file is the same as one written to ``target`` directly) and umask permissions.
    """
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        tmp = folder / target.name
        yield tmp
        os.chmod(tmp, _FILE_MODE)  # as open() would create it; safetensors' writer makes 0600 files
        os.replace(tmp, target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _read_umask() -> int:
    """The process umask (read once, at import: setting it is process-wide, not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()


class _Writer:
    """Writes the formats of one pruned model; a .zst compresses its base file when this call already wrote it."""

    def __init__(
        self,
        model: loading.LoadedModel,
        weights: dict[str, torch.Tensor],
        pruned: set[str],
        level: int,
        drop_extras: bool,
    ) -> None:
        self.model, self.weights, self.pruned = model, weights, pruned
        self.level, self.drop_extras = level, drop_extras
        self.done: dict[str, OutputFile] = {}

    def write(self, fmt: str, target: Path) -> OutputFile:
        t0 = time.perf_counter()
        with atomic_path(target) as tmp:
            if fmt == "packed":
                notes = self._packed(tmp)
            elif fmt.endswith(".zst"):
                notes = self._zst(fmt.removesuffix(".zst"), tmp)
            else:
                notes = self._base(fmt, tmp)
        seconds = time.perf_counter() - t0
        base = self.done.get(fmt.removesuffix(".zst")) if fmt.endswith(".zst") else None
        seconds += base.encode_seconds if base else 0.0  # a .zst's cost includes writing what it compresses
        self.done[fmt] = OutputFile(fmt, target, os.path.getsize(target), seconds, notes)
        return self.done[fmt]

    def _base(self, fmt: str, path: Path) -> list[str]:
        if fmt == "csr":
            return write_csr(self.weights, self.pruned, path, self._extras(), self.model.metadata)
        if _is_safetensors(self.model):
            return write_safetensors(self.weights, path, self.model.metadata)
        torch.save(self.model.rebuild(compact(self.weights), self.drop_extras), path)
        return []

    def _zst(self, base: str, path: Path) -> list[str]:
        if base in self.done:
            compress_file(self.done[base].path, path, self.level)
            return list(self.done[base].notes)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".pruneapp-") as tmp:
            inner = Path(tmp) / "inner"
            notes = self._base(base, inner)
            compress_file(inner, path, self.level)
        return notes

    def _packed(self, path: Path) -> list[str]:
        notes = packed.write_packed(self.weights, path, self.level)
        notes = list(notes) if isinstance(notes, list) else []
        if self._extras():
            others = ", ".join(map(str, self._extras()))
            notes.append(f"holds the weights only; {others} are in the dense and CSR files")
        return notes

    def _extras(self) -> dict[str, Any]:
        return {} if self.drop_extras else dict(self.model.extras)


# ---------------------------------------------------------------------------------------------------------------
# Shared storage: ties are kept, views into larger storages are saved compactly


def tie_map(weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """Map every key to the first key holding the same tensor (same object, or same storage, offset and shape)."""
    first: dict[Any, str] = {}
    return {key: first.setdefault(_tensor_identity(t), key) for key, t in weights.items()}


def _tensor_identity(t: torch.Tensor) -> Any:
    if t.numel() == 0:
        return ("object", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def compact(weights: dict[str, torch.Tensor], exclusive: bool = False) -> dict[str, torch.Tensor]:
    """Clone tensors that would drag a larger storage into the file; tied keys keep sharing one object.

    A storage that some tensor uses whole is kept, with every view into it. ``exclusive`` (safetensors) also
    clones every further tensor on an already used storage, since that format cannot share bytes.
    """
    whole = {t.untyped_storage().data_ptr() for t in weights.values() if _uses_whole_storage(t)}
    used: set[int] = set()
    made: dict[Any, torch.Tensor] = {}  # keyed like tie_map, so tied keys get one (possibly cloned) tensor
    out = {}
    for key, t in weights.items():
        ident = _tensor_identity(t)
        if ident not in made and t.device.type != "cpu":
            made[ident] = t.cpu()  # a file that plain torch.load reads on any machine
        if ident not in made:
            ptr = t.untyped_storage().data_ptr()
            keep = ptr in whole and not (exclusive and (ptr in used or not t.is_contiguous()))
            made[ident] = t if keep else t.clone(memory_format=torch.contiguous_format)
            used.add(ptr)
        out[key] = made[ident]
    return out


def _uses_whole_storage(t: torch.Tensor) -> bool:
    nbytes = t.numel() * t.element_size()
    return t.is_contiguous() and t.storage_offset() == 0 and nbytes == t.untyped_storage().nbytes()


def _canonical(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors stored once (first key of each tied group) and ``{alias: canonical key}`` for the others."""
    ties = tie_map(weights)  # after compact(), tied keys hold one object
    tensors = {k: t for k, t in weights.items() if ties[k] == k}
    return tensors, {k: v for k, v in ties.items() if k != v}


# ---------------------------------------------------------------------------------------------------------------
# Dense safetensors


def write_safetensors(weights: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> list[str]:
    """safetensors file with the input's ``__metadata__``; tied tensors stored once, their aliases in metadata."""
    from safetensors.torch import save_file

    tensors, aliases = _canonical(compact(weights, exclusive=True))
    meta = {k: str(v) for k, v in metadata.items() if k != ALIASES_METADATA_KEY}
    if aliases:
        meta[ALIASES_METADATA_KEY] = json.dumps(aliases)
    save_file(tensors, str(path), metadata=meta)
    return [f"tied tensors stored once; {len(aliases)} alias(es) recorded in metadata"] if aliases else []


def _retie_safetensors(weights: dict[str, torch.Tensor], metadata: dict[str, str], name: str) -> None:
    raw = metadata.get(ALIASES_METADATA_KEY)
    if raw is None:
        return
    try:
        aliases = json.loads(raw)
    except ValueError:
        aliases = None
    if not isinstance(aliases, dict) or not all(isinstance(v, str) and v in weights for v in aliases.values()):
        raise CorruptFileError(f"{name}: its {ALIASES_METADATA_KEY} metadata is damaged; write the file again.")
    if any(alias in weights for alias in aliases):
        raise CorruptFileError(f"{name}: its {ALIASES_METADATA_KEY} metadata names stored tensors; write it again.")
    for alias, key in aliases.items():
        weights[alias] = weights[key]


# ---------------------------------------------------------------------------------------------------------------
# CSR


@contextlib.contextmanager
def _sparse_quiet() -> Iterator[None]:
    """Silence torch's one-time 'sparse CSR support is in beta' notice (the format itself is stable)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        yield


def write_csr(
    weights: dict[str, torch.Tensor],
    pruned: set[str],
    path: Path,
    extras: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """A .pt that plain ``torch.load(weights_only=True)`` reads: pruned tensors in CSR (int32 indices), rest dense."""
    ties = tie_map(weights)
    pruned_groups = {ties[k] for k in pruned if k in ties}
    tensors, aliases = _canonical(compact(weights))
    out: dict[str, torch.Tensor] = {}
    larger = []
    with _sparse_quiet():
        for key, t in tensors.items():
            csr = to_csr(t) if key in pruned_groups and _csr_candidate(t) else None
            if csr is None and key in pruned_groups and _csr_candidate(t):
                larger.append(key)
            out[key] = t if csr is None else csr
        obj = {
            "format": CSR_FORMAT,
            "version": CSR_VERSION,
            "tensors": out,
            "shapes": {k: list(t.shape) for k, t in weights.items()},  # every key, in the input's order
            "aliases": aliases,
            "extras": extras or {},
            "metadata": dict(metadata or {}),
        }
        torch.save(obj, path)
    return [f"kept dense: CSR would be larger for {', '.join(larger)}"] if larger else []


def _csr_candidate(t: torch.Tensor) -> bool:
    return t.dtype in _CSR_DTYPES and t.dim() >= 1 and t.numel() > 0


def to_csr(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as a 2-D sparse CSR tensor with int32 indices, or None where that is not smaller than dense.

    Shapes: (d0, d1, ...) -> (d0, d1*...), (n,) -> (1, n). A value is stored when its bits are not all zero,
    so -0.0 and every NaN payload survive.
    """
    rows = t.shape[0] if t.dim() >= 2 else 1
    bits = t.reshape(rows, -1).view(_INT_VIEW[t.element_size()])  # (rows, cols)
    nnz = int(torch.count_nonzero(bits))
    csr_bytes = nnz * (t.element_size() + 4) + (rows + 1) * 4
    if csr_bytes >= t.numel() * t.element_size() or max(nnz, bits.shape[1]) > _INT32_MAX:
        return None
    sparse = bits.to_sparse_csr()
    crow, col = sparse.crow_indices().to(torch.int32), sparse.col_indices().to(torch.int32)
    return torch.sparse_csr_tensor(crow, col, sparse.values().view(t.dtype), bits.shape, check_invariants=True)


def _read_csr(path: Path, limits: Limits) -> dict[str, torch.Tensor]:
    """Our CSR file: the loader's zip checks first, then torch's weights-only load under sparse invariant checks."""
    try:
        with zipfile.ZipFile(path) as zf:
            checks.verify_crc(zf, checks.check_zip(zf, path.stat().st_size, limits, path.name))
        with _sparse_quiet(), torch.sparse.check_sparse_tensor_invariants():
            obj = torch.load(path, weights_only=True, map_location="cpu", mmap=False)
    except PruneAppError:
        raise
    except Exception as e:  # zipfile and torch raise many kinds on damaged files
        raise CorruptFileError(f"{path.name} is not a readable CSR file ({_why(e)}); write it again.") from None
    return densify_csr(obj, limits, path.name)


def densify_csr(obj: Any, limits: Limits, name: str = "CSR file") -> dict[str, torch.Tensor]:
    """The dense state_dict held by a loaded CSR dict, bit for bit, with tied keys sharing one tensor."""
    tensors, shapes, aliases = _csr_parts(obj, name)
    _check_csr_sizes(tensors, shapes, limits, name)
    with _sparse_quiet():
        dense = {key: _densify(key, t, shapes[key], limits, name) for key, t in tensors.items()}
    return {key: dense[aliases.get(key, key)] for key in shapes}


def _csr_parts(obj: Any, name: str) -> tuple[dict[str, torch.Tensor], dict[str, list[int]], dict[str, str]]:
    if not isinstance(obj, dict) or obj.get("format") != CSR_FORMAT:
        raise CorruptFileError(f"{name} is not a pruneapp CSR file; read it with torch.load instead.")
    if obj.get("version") != CSR_VERSION:
        raise UnsupportedFileError(f"{name} is CSR version {obj.get('version')!r}; upgrade pruneapp to read it.")
    tensors, shapes, aliases = obj.get("tensors"), obj.get("shapes"), obj.get("aliases")
    ok = isinstance(tensors, dict) and isinstance(shapes, dict) and isinstance(aliases, dict)
    ok = ok and all(isinstance(t, torch.Tensor) for t in tensors.values())
    ok = ok and all(isinstance(s, list) and all(type(d) is int and d >= 0 for d in s) for s in shapes.values())
    ok = ok and all(aliases.get(k, k) in tensors and k in shapes for k in (*shapes, *tensors))
    if not ok:
        raise CorruptFileError(f"{name}: its tensors, shapes and aliases do not match; write the file again.")
    return tensors, shapes, aliases


def _check_csr_sizes(tensors: dict, shapes: dict, limits: Limits, name: str) -> None:
    if len(shapes) > limits.max_tensors:
        raise LimitExceededError(
            f"{name} holds {len(shapes)} tensors, over the limit of {limits.max_tensors} (PRUNEAPP_MAX_TENSORS)."
        )
    sizes = {key: math.prod(shapes[key]) for key in tensors}
    big = [k for k, n in sizes.items() if n > limits.max_tensor_elements]
    if big:
        raise LimitExceededError(
            f"{name}: {big[0]} has {sizes[big[0]]} elements, over the limit of {limits.max_tensor_elements} "
            "(PRUNEAPP_MAX_TENSOR_ELEMENTS)."
        )
    if sum(sizes.values()) > limits.max_total_elements:
        raise LimitExceededError(
            f"{name} holds {sum(sizes.values())} elements, over the limit of {limits.max_total_elements} "
            "(PRUNEAPP_MAX_TOTAL_ELEMENTS)."
        )


def _densify(key: str, t: torch.Tensor, shape: list[int], limits: Limits, name: str) -> torch.Tensor:
    bad = CorruptFileError(f"{name}: tensor {key!r} does not match its recorded shape {shape}; write it again.")
    if t.layout == torch.strided:
        checks.check_tensor(t, limits)  # an in-bounds view, no stride-0 inflation
        if list(t.shape) != shape:
            raise bad
        return t
    if t.layout != torch.sparse_csr or t.dim() != 2 or t.values().dtype not in _CSR_DTYPES:
        raise CorruptFileError(f"{name}: tensor {key!r} is not a dense or 2-D floating CSR tensor; write it again.")
    if t.numel() != math.prod(shape):
        raise bad
    for part in (t.crow_indices(), t.col_indices(), t.values()):
        checks.check_tensor(part, limits)
    values = t.values()
    try:
        # integer add of the stored bits onto zeros: exact for -0.0 and NaN payloads, unlike a float to_dense()
        bits = torch.sparse_csr_tensor(
            t.crow_indices(),
            t.col_indices(),
            values.view(_INT_VIEW[values.element_size()]),
            t.shape,
            check_invariants=True,
        )
        return bits.to_dense().view(values.dtype).reshape(shape)
    except RuntimeError as e:
        raise CorruptFileError(f"{name}: tensor {key!r} has invalid sparse indices ({_why(e)}).") from None


# ---------------------------------------------------------------------------------------------------------------
# zstd


def compress_file(src: Path, dst: Path, level: int = DEFAULT_ZSTD_LEVEL) -> None:
    """One standard zstd frame (``zstd -d`` reads it) with the content size and a checksum, all cores, streamed."""
    cctx = zstandard.ZstdCompressor(level=level, threads=-1, write_content_size=True, write_checksum=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        cctx.copy_stream(fin, fout, size=os.path.getsize(src), read_size=_COPY_CHUNK, write_size=_COPY_CHUNK)


def decompress_file(src: Path, dst: Path, max_bytes: int) -> int:
    """Decompress the single zstd frame of ``src`` into ``dst``, refusing more than ``max_bytes`` of output.

    Streamed in small input chunks, so a bomb costs at most one chunk's output in memory (zstandard's one-shot
    ``max_output_size`` is not enough: it is ignored when the frame declares its size). A truncated frame,
    a second frame and trailing bytes are all refused: pruneapp writes exactly one frame.
    """
    with open(src, "rb") as fin:
        _check_declared_size(fin.read(18), src.name, max_bytes)
        fin.seek(0)
        dobj = zstandard.ZstdDecompressor().decompressobj()
        total = 0
        with open(dst, "wb") as fout:
            while not dobj.eof and (chunk := fin.read(_ZSTD_INPUT_CHUNK)):
                out = _zstd_step(dobj, chunk, src.name)
                total += len(out)
                if total > max_bytes:
                    raise _decompressed_limit(src.name, max_bytes)
                fout.write(out)
        if not dobj.eof:
            raise CorruptFileError(f"{src.name} ends inside its zstd frame (truncated); download it again.")
        if dobj.unused_data or fin.read(1):
            raise CorruptFileError(
                f"{src.name} has bytes after its zstd frame (a second frame or appended data); "
                "pruneapp writes one frame, so download the file again."
            )
    return total


def _zstd_step(dobj: Any, chunk: bytes, name: str) -> bytes:
    try:
        return dobj.decompress(chunk)
    except zstandard.ZstdError as e:
        raise CorruptFileError(f"{name} is not a valid zstd file ({_why(e)}); download it again.") from None


def _check_declared_size(head: bytes, name: str, max_bytes: int) -> None:
    try:
        declared = zstandard.frame_content_size(head)
    except zstandard.ZstdError:
        raise CorruptFileError(f"{name} has a damaged zstd frame header; download it again.") from None
    if declared > max_bytes:
        raise _decompressed_limit(name, max_bytes)


def _decompressed_limit(name: str, max_bytes: int) -> LimitExceededError:
    return LimitExceededError(
        f"{name} decompresses to more than {max_bytes} bytes (PRUNEAPP_MAX_DECOMPRESSED_BYTES); "
        "raise that limit if the file is genuine."
    )


# ---------------------------------------------------------------------------------------------------------------
# Reading any of our outputs


def read_weights(path: str | Path, limits: Limits | None = None) -> dict[str, torch.Tensor]:
    """Read any pruneapp output back into a dense state_dict (bit-for-bit equal to the pruned tensors).

    The kind is taken from the bytes: a zstd frame is decompressed (capped) and its content read as below; our
    CSR dict is densified under sparse invariant checks; packed goes to pruneapp.packed; any other model file
    goes through pruneapp.loading. Tied keys come back sharing one tensor.
    """
    limits = limits or default_limits()
    path = Path(path)
    head = _head(path, limits)
    if head.startswith(ZSTD_MAGIC):
        with tempfile.TemporaryDirectory(prefix="pruneapp-") as tmp:
            inner = Path(tmp) / path.name  # errors about the inner file name the file the user gave
            decompress_file(path, inner, limits.max_decompressed_bytes)
            return _read_plain(inner, _head(inner, limits), limits)
    return _read_plain(path, head, limits)


def _head(path: Path, limits: Limits) -> bytes:
    loading.checked_size(path, limits)
    with open(path, "rb") as f:
        return f.read(64)


def _read_plain(path: Path, head: bytes, limits: Limits) -> dict[str, torch.Tensor]:
    if head.startswith(ZSTD_MAGIC):
        raise UnsupportedFileError(f"{path.name} holds a zstd frame inside a zstd frame; pruneapp writes only one.")
    if head.startswith(packed.MAGIC):
        return packed.read_packed(path, limits)
    if head.startswith(ZIP_MAGIC) and _is_csr_zip(path):
        return _read_csr(path, limits)
    model = loading.load_model(path, limits)
    weights = dict(model.weights)
    _retie_safetensors(weights, model.metadata, path.name)
    return weights


def _is_csr_zip(path: Path) -> bool:
    """Whether the first zip entry is a pickle that starts ``{"format": "pruneapp-csr"`` (torch writes data.pkl first).

    Only the opcodes are parsed, nothing is run; anything unexpected means "not ours" and goes to the loader.
    """
    with open(path, "rb") as f:
        header = f.read(30)
        if len(header) < 30:
            return False
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        name = f.read(name_len)
        f.seek(extra_len, os.SEEK_CUR)
        data = f.read(512)
    if header[8:10] != b"\x00\x00" or not name.endswith(b"data.pkl"):
        return False
    return _first_strings(data, 2) == ["format", CSR_FORMAT]


def _first_strings(data: bytes, n: int) -> list[str]:
    strings: list[str] = []
    with contextlib.suppress(Exception):  # a truncated or odd prefix just yields fewer strings
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            if isinstance(arg, str) and op.name.endswith("UNICODE"):
                strings.append(arg)
            if len(strings) == n:
                break
    return strings


def _why(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


# ---------------------------------------------------------------------------------------------------------------
# How users read each format without pruneapp (shown next to downloads)

_ZST_OPEN = """\
with open(path, "rb") as f:  # streamed; the frame records its size
    data = io.BytesIO(zstandard.ZstdDecompressor().stream_reader(f).read())
"""

_CSR_BODY = """\
with torch.sparse.check_sparse_tensor_invariants():  # validates the sparse indices while loading
    ckpt = torch.load(source, weights_only=True, map_location="cpu")
dense = {k: t.to_dense() if t.layout == torch.sparse_csr else t for k, t in ckpt["tensors"].items()}
dense = {k: t.reshape(ckpt["shapes"][k]) for k, t in dense.items()}
state_dict = {k: dense[ckpt["aliases"].get(k, k)] for k in ckpt["shapes"]}  # tied keys share one tensor
# to_dense() reads a stored -0.0 back as 0.0; pruneapp.read_weights(path) keeps every bit.
"""

_SAFETENSORS_RETIE = """\
header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
aliases = json.loads(header.get("__metadata__", {}).get("pruneapp.aliases", "{}"))
state_dict.update({k: state_dict[v] for k, v in aliases.items()})  # tied keys share one tensor
"""


def load_snippet(fmt: str, filename: str) -> str:
    """A few lines of Python that read ``filename`` (written as ``fmt``) back, with plain torch where possible."""
    path = f"path = {json.dumps(str(filename))}\n"
    safetensors = ".safetensors" in str(filename)
    snippets: dict[str, Callable[[], str]] = {
        "dense": lambda: _dense_snippet(path, safetensors, zst=False),
        "dense.zst": lambda: _dense_snippet(path, safetensors, zst=True),
        "csr": lambda: f"import torch\n\n{path}source = path\n{_CSR_BODY}",
        "csr.zst": lambda: (
            f"import io\n\nimport torch\nimport zstandard\n\n{path}{_ZST_OPEN}source = data\n{_CSR_BODY}"
        ),
        "packed": lambda: f"import pruneapp\n\n{path}state_dict = pruneapp.read_weights(path)\n",
    }
    if fmt not in snippets:
        raise SettingsError(f"Unknown output format {fmt!r}; choose from {', '.join(ALL_FORMATS)}.")
    return snippets[fmt]()


def _dense_snippet(path: str, safetensors: bool, zst: bool) -> str:
    if not safetensors:
        imports = "import io\n\nimport torch\nimport zstandard\n\n" if zst else "import torch\n\n"
        source = f"{_ZST_OPEN}source = data\n" if zst else "source = path\n"
        load = 'state_dict = torch.load(source, weights_only=True, map_location="cpu")  # your structure, as uploaded\n'
        return f"{imports}{path}{source}{load}"
    imports = "import io\nimport json\n\nimport zstandard\n" if zst else "import json\n\n"
    read = f"{_ZST_OPEN}raw = data.getvalue()\n" if zst else 'with open(path, "rb") as f:\n    raw = f.read()\n'
    load = "state_dict = safetensors.torch.load(raw)\n"
    return f"{imports}import safetensors.torch\n\n{path}{read}{load}{_SAFETENSORS_RETIE}"


CSR_LOAD_SNIPPET = load_snippet("csr", "model.csr.pt")
