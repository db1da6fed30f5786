"""Structural checks of untrusted model files, before their data is read and after their objects are built.

Before: the zip layout of torch.save files, each storage's declared size against its record, the data area of
legacy files, the safetensors header. After: only plain in-bounds tensors and simple values, within the limits.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

from pruneapp import unpickling
from pruneapp.errors import CorruptFileError, LimitExceededError, UnsafeFileError, UnsupportedFileError
from pruneapp.limits import Limits, MiB
from pruneapp.unpickling import StandIn, StorageRef

_STORED_ONLY = ("data.pkl", "constants.pkl")  # plus everything under data/ and constants/
_SAFETENSORS_HEADER_CAP = 100 * MiB  # the safetensors library's own cap
_EXPAND_ALLOWANCE = 1 << 20  # elements a stride-0 view may show beyond its storage (small broadcasts are real)
_CHUNK = 1 << 24

SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _limit(what: str, value: int, limit: int, variable: str) -> LimitExceededError:
    return LimitExceededError(
        f"{what} ({value}) is over the limit of {limit}; raise {variable} if the file is trusted."
    )


# ---------------------------------------------------------------------------------------------------------------
# torch.save zip files and TorchScript archives


@dataclass
class ZipLayout:
    """The checked entries of a torch zip: ``<prefix>/data.pkl``, ``<prefix>/data/<key>``, ..."""

    prefix: str
    infos: dict[str, zipfile.ZipInfo]
    torchscript: bool
    big_endian: bool = False  # saved on a big-endian machine: only torch.load byte-swaps such storages

    @property
    def pickle_name(self) -> str:
        return f"{self.prefix}/data.pkl"


def check_zip_directory(fh: BinaryIO, limits: Limits, name: str) -> None:
    """Count a zip's entries from its end record, before zipfile parses a central directory of any size."""
    end = zipfile._EndRecData(fh)  # the stdlib's own end-record reader (handles zip64)
    if end is None:
        raise CorruptFileError(f"{name} is not a complete zip archive (no end record); it is truncated or damaged.")
    entries = end[zipfile._ECD_ENTRIES_TOTAL]
    if entries > limits.max_zip_entries:
        raise _limit(f"{name} has too many zip entries", entries, limits.max_zip_entries, "PRUNEAPP_MAX_ZIP_ENTRIES")


def check_zip(zf: zipfile.ZipFile, file_bytes: int, limits: Limits, name: str) -> ZipLayout:
    """Check a torch zip's structure before anything in it is unpickled or read (zip bombs, lying sizes)."""
    infos = zf.infolist()
    if len(infos) > limits.max_zip_entries:
        raise _limit(f"{name} has too many zip entries", len(infos), limits.max_zip_entries, "PRUNEAPP_MAX_ZIP_ENTRIES")
    by_name = {i.filename: i for i in infos}
    if len(by_name) != len(infos):
        raise UnsafeFileError(f"{name} lists the same zip entry twice; torch.save never does. Re-save the model.")
    prefix = _prefix(by_name, name)
    layout = ZipLayout(prefix, by_name, f"{prefix}/constants.pkl" in by_name)
    layout.torchscript |= any(n.startswith(f"{prefix}/code/") for n in by_name)
    if sum(i.compress_size for i in infos) > file_bytes:
        raise UnsafeFileError(f"{name}'s zip entries claim more bytes than the file holds; it is damaged or forged.")
    for info in infos:
        _check_entry(info, prefix, file_bytes, name)
    byteorder = by_name.get(f"{prefix}/byteorder")
    layout.big_endian = byteorder is not None and byteorder.file_size < 16 and zf.read(byteorder).strip() == b"big"
    pickle_bytes = by_name[layout.pickle_name].file_size
    if pickle_bytes > limits.max_pickle_bytes:
        raise _limit(f"{name}'s data.pkl size", pickle_bytes, limits.max_pickle_bytes, "PRUNEAPP_MAX_PICKLE_BYTES")
    return layout


def _prefix(by_name: dict[str, zipfile.ZipInfo], name: str) -> str:
    pickles = [n for n in by_name if n.endswith("data.pkl") and n.count("/") == 1]
    if not pickles:
        raise UnsupportedFileError(
            f"{name} is a zip archive but not a PyTorch file (it has no data.pkl); upload a torch.save or "
            ".safetensors file."
        )
    prefix = pickles[0].split("/")[0]
    if any(not n.startswith(f"{prefix}/") for n in by_name):
        raise UnsafeFileError(f"{name} holds entries outside its top folder {prefix!r}; torch.save writes one folder.")
    return prefix


def _check_entry(info: zipfile.ZipInfo, prefix: str, file_bytes: int, name: str) -> None:
    rel = info.filename[len(prefix) + 1 :]
    if info.compress_type != zipfile.ZIP_STORED:
        if rel in _STORED_ONLY or rel.startswith(("data/", "constants/")):
            raise UnsafeFileError(
                f"{name}: zip entry {rel!r} is compressed, but torch.save stores tensor data uncompressed; "
                "the file was altered (possibly a zip bomb). Re-save it with torch.save."
            )
    elif info.file_size != info.compress_size:
        raise CorruptFileError(f"{name}: zip entry {rel!r} has inconsistent sizes; the file is damaged.")
    if info.header_offset + info.compress_size > file_bytes:
        raise CorruptFileError(f"{name}: zip entry {rel!r} runs past the end of the file; it is truncated.")


def check_storage_records(refs: Iterable[StorageRef], layout: ZipLayout, name: str) -> None:
    """Each storage the pickle declares must have a record of exactly its size (torch's mmap path never checks)."""
    for ref in refs:
        info = layout.infos.get(f"{layout.prefix}/data/{ref.key}")
        if info is None:
            raise CorruptFileError(f"{name}: the data of storage {ref.key!r} is missing; the file is incomplete.")
        if info.file_size != ref.nbytes:
            raise CorruptFileError(
                f"{name}: storage {ref.key!r} declares {ref.nbytes} bytes but its record holds {info.file_size}; "
                "the file is damaged or forged."
            )


def verify_crc(zf: zipfile.ZipFile, layout: ZipLayout) -> None:
    """Read data.pkl and every data record through zipfile, which checks each CRC-32 (torch's reader does not)."""
    for entry, info in layout.infos.items():
        if entry == layout.pickle_name or entry.startswith(f"{layout.prefix}/data/"):
            with zf.open(info) as fh:
                while fh.read(_CHUNK):
                    pass


def read_code(zf: zipfile.ZipFile, layout: ZipLayout, limits: Limits, name: str) -> dict[str, str]:
    """The Python-syntax code files of a TorchScript archive (path below ``code/`` -> text), for reading only."""
    budget, sources = limits.max_pickle_bytes, {}
    for entry, info in layout.infos.items():
        rel = entry.removeprefix(f"{layout.prefix}/code/")
        if rel == entry or not rel.endswith(".py"):
            continue
        with zf.open(info) as fh:  # code entries are compressed: read at most the remaining budget
            data = fh.read(budget + 1)
        budget -= len(data)
        if budget < 0:
            raise _limit(
                f"{name}'s TorchScript code size",
                limits.max_pickle_bytes + 1,
                limits.max_pickle_bytes,
                "PRUNEAPP_MAX_PICKLE_BYTES",
            )
        sources[rel] = data.decode("utf-8")
    return sources


# ---------------------------------------------------------------------------------------------------------------
# Legacy (non-zip) torch.save files: magic, protocol, sys info, the pickle, storage keys, then each storage's data


@dataclass
class LegacyLayout:
    """A checked legacy file: its object tree on the meta device and where each storage's bytes start."""

    dry_run: unpickling.DryRun
    pickle_start: int
    offsets: dict[str, int] = field(default_factory=dict)


def check_legacy(fh: BinaryIO, file_bytes: int, limits: Limits, name: str) -> LegacyLayout:
    """Walk a legacy file end to end, checking each storage's element count against its declaration."""
    unpickling.read_legacy_preamble(fh, limits)
    start = fh.tell()
    dry = unpickling.dry_run(fh, limits)
    if fh.tell() - start > limits.max_pickle_bytes:
        raise _limit(f"{name}'s pickle size", fh.tell() - start, limits.max_pickle_bytes, "PRUNEAPP_MAX_PICKLE_BYTES")
    keys = unpickling.unpickle(fh, unpickling.Storages(), limits)
    if not isinstance(keys, list) or len(set(map(str, keys))) != len(keys) or set(keys) != set(dry.refs):
        raise CorruptFileError(f"{name}'s list of storages does not match its tensors; the file is damaged.")
    layout = LegacyLayout(dry, start)
    for key in keys:
        layout.offsets[key] = _legacy_record(fh, dry.refs[key], file_bytes, name)
    if fh.tell() != file_bytes:
        raise CorruptFileError(f"{name} has {file_bytes - fh.tell()} bytes after its last tensor; it is damaged.")
    return layout


def _legacy_record(fh: BinaryIO, ref: StorageRef, file_bytes: int, name: str) -> int:
    head = fh.read(8)
    if len(head) < 8:
        raise CorruptFileError(f"{name} ends before the data of storage {ref.key!r}; it is truncated.")
    (count,) = struct.unpack("<q", head)
    if count != ref.numel:
        raise CorruptFileError(
            f"{name}: storage {ref.key!r} declares {ref.numel} elements but its data holds {count}; "
            "the file is damaged or forged."
        )
    start = fh.tell()
    if start + ref.nbytes > file_bytes:
        raise CorruptFileError(f"{name} ends inside the data of storage {ref.key!r}; it is truncated.")
    fh.seek(start + ref.nbytes)
    return start


# ---------------------------------------------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, a JSON header, then the tensors' bytes back to back


@dataclass(frozen=True)
class SafetensorsEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class SafetensorsHeader:
    entries: dict[str, SafetensorsEntry]
    metadata: dict[str, str]


def check_safetensors(fh: BinaryIO, file_bytes: int, limits: Limits, name: str) -> SafetensorsHeader:
    """Parse and check a safetensors header: size cap, known dtypes, offsets in order covering the data exactly."""
    raw = _safetensors_raw_header(fh, file_bytes, limits, name)
    if raw.count(b'"data_offsets"') > limits.max_tensors:
        raise _limit(f"{name}'s tensor count", raw.count(b'"data_offsets"'), limits.max_tensors, "PRUNEAPP_MAX_TENSORS")
    header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    if not isinstance(header, dict):
        raise CorruptFileError(f"{name}'s safetensors header is not a JSON object; the file is damaged.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptFileError(f"{name}'s safetensors __metadata__ must map strings to strings.")
    entries = {key: _safetensors_entry(key, spec, limits, name) for key, spec in header.items()}
    _check_coverage(entries, file_bytes - 8 - len(raw), name)
    total = sum(_numel(e.shape) for e in entries.values())
    if total > limits.max_total_elements:
        raise _limit(f"{name}'s total elements", total, limits.max_total_elements, "PRUNEAPP_MAX_TOTAL_ELEMENTS")
    return SafetensorsHeader(entries, metadata)


def _safetensors_raw_header(fh: BinaryIO, file_bytes: int, limits: Limits, name: str) -> bytes:
    if file_bytes < 8:
        raise CorruptFileError(f"{name} is too short to be a safetensors file; it is truncated.")
    (size,) = struct.unpack("<Q", fh.read(8))
    cap = min(limits.max_pickle_bytes, _SAFETENSORS_HEADER_CAP)
    if size > cap:
        raise _limit(f"{name}'s safetensors header size", size, cap, "PRUNEAPP_MAX_PICKLE_BYTES")
    if 8 + size > file_bytes:
        raise CorruptFileError(
            f"{name}'s safetensors header claims {size} bytes but the file has {file_bytes - 8}; it is truncated."
        )
    return fh.read(size)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise CorruptFileError("the safetensors header names a tensor twice; the file is damaged or forged.")
    return out


def _safetensors_entry(key: str, spec: Any, limits: Limits, name: str) -> SafetensorsEntry:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise CorruptFileError(f"{name}: safetensors entry {key!r} is malformed.")
    dtype = SAFETENSORS_DTYPES.get(spec["dtype"])
    if dtype is None:
        raise UnsupportedFileError(f"{name}: tensor {key!r} has dtype {spec['dtype']!r}, which pruneapp does not read.")
    shape, offsets = spec["shape"], spec["data_offsets"]
    if not _int_list(shape) or not _int_list(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise CorruptFileError(f"{name}: safetensors entry {key!r} has a malformed shape or offsets.")
    numel = _numel(shape)
    if numel > limits.max_tensor_elements:
        raise _limit(f"{name}: {key!r} elements", numel, limits.max_tensor_elements, "PRUNEAPP_MAX_TENSOR_ELEMENTS")
    entry = SafetensorsEntry(dtype, tuple(shape), offsets[0], offsets[1])
    if entry.end - entry.begin != numel * dtype.itemsize:
        raise CorruptFileError(f"{name}: safetensors entry {key!r} has offsets that do not match its shape.")
    return entry


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_coverage(entries: dict[str, SafetensorsEntry], data_bytes: int, name: str) -> None:
    expected = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != expected:
            problem = "overlap" if entry.begin < expected else "leave a gap"
            raise CorruptFileError(f"{name}'s safetensors offsets {problem}; the header lies about the data.")
        expected = entry.end
    if expected != data_bytes:
        raise CorruptFileError(
            f"{name}'s safetensors header covers {expected} bytes of data but the file holds {data_bytes}; "
            "it is truncated or forged."
        )


# ---------------------------------------------------------------------------------------------------------------
# After loading: the object tree


@dataclass
class TreeStats:
    tensors: int
    elements: int
    depth: int


_LEAF_TYPES = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    bytearray,
    slice,
    range,
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
)


def validate_tree(obj: Any, limits: Limits, meta: bool = False) -> TreeStats:
    """Check a loaded object: plain in-bounds tensors, simple values and stand-ins only, within the limits.

    Depth counts containers along the deepest chain, following shared references once (no path explosion).
    ``meta``: the tensors are the dry run's (meta device), whose storages have the declared sizes.
    """
    walker = _Walker(limits, meta)
    depth = walker.height(obj, 0)
    if depth > limits.max_depth:
        raise _depth_error(limits)
    return TreeStats(len(walker.tensors), walker.elements, depth)


def _depth_error(limits: Limits) -> UnsafeFileError:
    return UnsafeFileError(
        f"the file nests containers more than {limits.max_depth} levels deep (PRUNEAPP_MAX_DEPTH); real checkpoints "
        "are shallow, so it was refused."
    )


class _Walker:
    def __init__(self, limits: Limits, meta: bool) -> None:
        self.limits, self.meta = limits, meta
        self.heights: dict[int, int] = {}
        self.path: set[int] = set()
        self.tensors: dict[int, torch.Tensor] = {}
        self.elements = 0

    def height(self, obj: Any, level: int) -> int:
        if isinstance(obj, torch.Tensor):
            self.tensor(obj)
            return 0
        children = _children(obj)
        if children is None:
            return 0
        key = id(obj)
        if key in self.heights:
            return self.heights[key]
        if key in self.path:
            raise UnsafeFileError("the file contains a reference cycle; model files never do, so it was refused.")
        if level >= self.limits.max_depth:
            raise _depth_error(self.limits)
        self.path.add(key)
        height = 1 + max((self.height(child, level + 1) for child in children), default=0)
        self.path.discard(key)
        self.heights[key] = height
        return height

    def tensor(self, t: torch.Tensor) -> None:
        if id(t) in self.tensors:
            return
        self.tensors[id(t)] = t
        if len(self.tensors) > self.limits.max_tensors:
            raise _limit("the tensor count", len(self.tensors), self.limits.max_tensors, "PRUNEAPP_MAX_TENSORS")
        check_tensor(t, self.limits, self.meta)
        self.elements += t.numel()
        if self.elements > self.limits.max_total_elements:
            raise _limit(
                "the total elements", self.elements, self.limits.max_total_elements, "PRUNEAPP_MAX_TOTAL_ELEMENTS"
            )


def _children(obj: Any) -> list[Any] | None:
    """Contained objects of a container, None for an allowed leaf; anything else is refused."""
    if isinstance(obj, dict):
        extra = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
        return [*obj.keys(), *obj.values(), *extra]
    if isinstance(obj, list | tuple | set | frozenset):
        return list(obj)
    if isinstance(obj, StandIn):
        return unpickling.standin_children(obj)
    if isinstance(obj, _LEAF_TYPES) or unpickling.is_standin(obj) or obj is Ellipsis:
        return None
    raise UnsafeFileError(
        f"the file holds an object of type {type(obj).__name__} where only tensors and plain values belong."
    )


def check_tensor(t: torch.Tensor, limits: Limits, meta: bool = False) -> None:
    """A plain dense tensor on the expected device whose view stays inside its storage."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or t.is_quantized:
        raise UnsupportedFileError(
            f"the file holds a {type(t).__name__} with layout {t.layout}; pruneapp reads plain dense tensors "
            "(sparse ones only from its own CSR files). Save dense ones instead: t.to_dense()"
        )
    if t.device.type != ("meta" if meta else "cpu"):
        raise UnsupportedFileError(f"the file holds a tensor on device {t.device}; re-save it after .cpu().")
    numel = t.numel()
    if numel > limits.max_tensor_elements:
        raise _limit("a tensor's element count", numel, limits.max_tensor_elements, "PRUNEAPP_MAX_TENSOR_ELEMENTS")
    if numel == 0:
        return
    if any(s < 0 for s in t.stride()):
        raise CorruptFileError(f"a tensor of shape {tuple(t.shape)} has a negative stride; the file is damaged.")
    span = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1
    stored = t.untyped_storage().nbytes() // t.element_size()
    if span > stored:
        raise UnsafeFileError(f"a tensor of shape {tuple(t.shape)} reaches past the end of its storage; refused.")
    expanded = any(s == 0 and n > 1 for n, s in zip(t.shape, t.stride(), strict=True))
    if expanded and numel > max(stored, _EXPAND_ALLOWANCE):
        raise UnsafeFileError(
            f"a tensor of shape {tuple(t.shape)} is a stride-0 expansion of {stored} stored elements into {numel}; "
            "refused (it would inflate memory when used)."
        )
