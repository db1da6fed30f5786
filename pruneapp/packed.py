"""The packed format: per tensor a position stream and byte-shuffled kept values, each zstd-compressed.

Pruned tensors store where their nonzeros are (a 1-bit mask, or gaps between them when that is
smaller) and only the kept values, split into byte planes (as blosc's shuffle filter does).
Low-entropy byte streams with at most 16 distinct bytes are first packed several symbols to a byte,
which brings zstd's Huffman stage to within about 1% of their entropy. The layout is in
docs/packed-format.md; reading treats the file as untrusted input.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
import threading
import zlib
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import zstandard

from pruneapp.entropy import (
    binary_entropy,
    byte_histogram,
    byte_rows,
    entropy_bits,
    items,
    kept_rows,
    nonzero_mask,
    planes,
    tie_key,
)
from pruneapp.errors import CorruptFileError, LimitExceededError, SettingsError, UnsupportedFileError
from pruneapp.limits import Limits, default_limits

MAGIC = b"\x89PRUNEPK\r\n\x1a\n"  # 12 bytes; the \r\n and \x1a catch text-mode mangling, as in PNG
EXTENSION = ".pruneapp"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
DEFAULT_LEVEL = 3

Progress = Callable[[str, float], None]

_PREFIX = struct.Struct("<12sI")  # magic, format version
_FOOTER = struct.Struct("<III4s")  # header length, JSON size, crc32 of header bytes, end mark (version 2)
_FOOTER_V1 = struct.Struct("<QQQI4s")  # header offset, header length, JSON size, crc32 of header bytes, end mark
_HEADER_LEVEL = 19  # the header is a few KB at most: the highest level costs nothing noticeable
_END_MARK = b"PKND"
_DATA_START = _PREFIX.size
_RAW_ENTROPY = 7.9  # bits per byte above which zstd cannot win enough to pay for its time
_OPTIMAL_LEVEL = 16  # zstd levels from here on use optimal parsing, which picks its own matches
_MT_BYTES = 8 << 20  # streams this large also use zstd's own worker threads
_MAX_WINDOW = 1 << 27  # largest zstd window a level <= 22 frame needs
_MAX_DIMS = 64
_CHUNK = 1 << 18  # elements per decode step (a multiple of 8): its temporaries stay in cache
_WORKERS = os.cpu_count() or 1
_PARALLEL_BYTES = 1 << 22  # decoded stream bytes from which a tensor decodes on worker threads (less: not worth it)
_BATCH_BYTES = 1 << 22  # stored bytes of consecutive tensors read with one call, at most (or one tensor's)
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint8)
_EMPTY = np.empty(0, np.uint8)
_BYTE_VALUES = frozenset(range(256))
_SHIFT_BYTES = 1 << 14  # interleaving this many bytes or more: shifts beat strided copies
_local = threading.local()  # per-thread zstd decompressor
_ENCODINGS = {"dense", "mask", "gaps", "alias"}
_CODECS = {"raw", "zstd"}

_DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
        torch.uint16, torch.uint32, torch.uint64,
        torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    )
}  # fmt: skip
_ITEMSIZE = {dt: torch.empty(0, dtype=dt).element_size() for dt in _DTYPES.values()}


@dataclass
class _Stream:
    """One encoded byte stream: the payload on disk and how to turn it back into `size` bytes."""

    codec: str  # "raw" | "zstd"
    payload: bytes | np.ndarray
    crc32: int  # of the decoded bytes
    symbols: list[int] | None = None  # the stream's distinct bytes, most frequent first, when symbol-packed


@dataclass(slots=True)
class _Spec:
    """A validated stream record from the header."""

    offset: int
    length: int
    codec: str
    symbols: list[int] | None
    size: int  # decoded bytes
    packed: int  # bytes the codec produces: size, or fewer when symbol-packed


@dataclass(slots=True)
class _Entry:
    """A validated tensor record from the header."""

    name: str
    encoding: str
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] = ()
    kept: int = 0
    width: int = 0  # bytes per gap, "gaps" encoding only
    crc32: int = 0  # of the streams' decoded bytes, see _combined_crc
    streams: tuple[_Spec, ...] = ()
    alias_of: str = ""
    extent: tuple[int, int, int] = (0, 0, 0)  # first and end byte of the streams holding bytes, bytes they hold


# ---- symbol packing: s <= 16 distinct bytes -> floor(log_s 256) symbols per byte -------------------------


_PER_BYTE = {s: next(m for m in range(8, 0, -1) if s**m <= 256) for s in range(1, 17)}


def _per_byte(s: int) -> int:
    return _PER_BYTE[s]


def _pack_symbols(data: np.ndarray, hist: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Map bytes to frequency ranks and pack m ranks per byte, first rank in the lowest digit."""
    order = np.argsort(-hist, kind="stable")
    symbols = [int(x) for x in order[: np.count_nonzero(hist)]]
    s = len(symbols)
    if s == 1:
        return symbols, np.empty(0, np.uint8)
    rank = np.zeros(256, np.uint8)
    rank[symbols] = np.arange(s, dtype=np.uint8)
    m = _per_byte(s)
    ranks = np.zeros(-(-data.size // m) * m, np.uint8)
    ranks[: data.size] = rank[data]
    ranks = ranks.reshape(-1, m)
    codes = ranks[:, m - 1].copy()
    for j in range(m - 2, -1, -1):
        codes *= s
        codes += ranks[:, j]
    return symbols, codes


@functools.lru_cache(maxsize=4096)
def _symbol_table(symbols: tuple[int, ...]) -> np.ndarray:
    """Item c: the m bytes that code c stands for, as one item (every code < 256 decodes to stored symbols)."""
    s = len(symbols)
    m = _per_byte(s)
    digits = (np.arange(256)[:, None] // s ** np.arange(m)[None, :]) % s  # (256, m), first index in the lowest digit
    return items(np.ascontiguousarray(np.asarray(symbols, np.uint8)[digits]))


def _unpack_symbols(codes: np.ndarray, symbols: list[int], size: int) -> np.ndarray:
    if len(symbols) == 1:
        return np.full(size, symbols[0], np.uint8)
    return _symbol_table(tuple(symbols)).take(codes).view(np.uint8)[:size]


def _packed_size(size: int, symbols: list[int] | None) -> int:
    """Bytes the codec must produce for a stream of `size` decoded bytes."""
    if symbols is None:
        return size
    return 0 if len(symbols) == 1 else -(-size // _per_byte(len(symbols)))


# ---- encoding ---------------------------------------------------------------------------------------------


def _zstd(data: np.ndarray, level: int, threads: int) -> bytes:
    """zstd at ``level``; below the optimal-parsing levels, matches shorter than 7 bytes are not searched:
    these streams are mostly literals, where short matches cost more than they save (measured: -2% on masks)."""
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        min_match=7 if level < _OPTIMAL_LEVEL else 0,
        threads=threads if data.size >= _MT_BYTES else 0,
    )
    return zstandard.ZstdCompressor(compression_params=params).compress(memoryview(data))


def _encode_stream(data: np.ndarray, level: int, threads: int, hist: np.ndarray | None = None) -> _Stream:
    """The smallest of: raw, zstd, or symbol-packed then raw or zstd."""
    crc = zlib.crc32(data)
    if data.size == 0:
        return _Stream("raw", data, crc)
    hist = byte_histogram(data) if hist is None else hist
    raw = _Stream("raw", data, crc)
    if np.count_nonzero(hist) <= 16:
        symbols, codes = _pack_symbols(data, hist)
        packed = _Stream("raw", codes, crc, symbols)
        return _smaller(raw, packed, _Stream("zstd", _zstd(codes, level, threads), crc, symbols))
    if entropy_bits(hist) > _RAW_ENTROPY:
        return raw
    return _smaller(raw, _Stream("zstd", _zstd(data, level, threads), crc))


def _smaller(*candidates: _Stream) -> _Stream:
    """The candidate costing the fewest bytes, its symbol table in the header included (~3 bytes a symbol)."""
    return min(candidates, key=lambda s: len(s.payload) + 3 * len(s.symbols or ()))


def _dense_is_smaller(n: int, k: int, hists: list[np.ndarray]) -> bool:
    """Estimate from order-0 entropies whether storing zeros beats storing positions."""
    if k == n:
        return True
    sparse = n * binary_entropy(k / n) / 8 + sum(k * entropy_bits(h) / 8 for h in hists)
    dense = 0.0
    for h in hists:
        h = h.copy()
        h[0] += n - k
        dense += n * entropy_bits(h) / 8
    return dense < sparse


def _gap_planes(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """Gaps between kept positions (the zeros skipped before each), as little-endian byte planes."""
    gaps = np.diff(np.flatnonzero(mask), prepend=-1) - 1
    top = int(gaps.max()) if gaps.size else 0
    width = next(w for w in (1, 2, 4, 8) if top < 256**w)
    return width, planes(gaps.astype(f"<u{width}").view(np.uint8).reshape(-1, width))


def _position_streams(mask: np.ndarray, k: int, pool: _Pool) -> tuple[str, int, list[_Stream]]:
    """The smaller of a packed bit mask and gap planes (tried only below 25% density)."""
    best = ("mask", 0, [pool.stream(np.packbits(mask, bitorder="little"))])
    if 4 * k <= mask.size:
        width, gap_planes = _gap_planes(mask)
        gaps = ("gaps", width, pool.streams(list(gap_planes)))
        if _total(gaps[2]) < _total(best[2]):
            best = gaps
    return best


def _total(streams: list[_Stream]) -> int:
    return sum(len(s.payload) for s in streams)


class _Pool:
    """Encodes streams on worker threads (zstd releases the GIL)."""

    def __init__(self, level: int, threads: int) -> None:
        self.level, self.threads = level, threads
        workers = (os.cpu_count() or 1) if threads < 0 else max(threads, 1)
        self.executor = ThreadPoolExecutor(max_workers=workers)

    def stream(self, data: np.ndarray, hist: np.ndarray | None = None) -> _Stream:
        return _encode_stream(data, self.level, self.threads, hist)

    def streams(self, data: list[np.ndarray], hists: list[np.ndarray] | None = None) -> list[_Stream]:
        hists = hists or [None] * len(data)
        return list(self.executor.map(self.stream, data, hists))

    def histograms(self, data: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.executor.map(byte_histogram, data))


def _encode_tensor(t: torch.Tensor, pool: _Pool) -> tuple[dict, list[_Stream]]:
    """Header record (without offsets) and streams for one contiguous CPU tensor."""
    rows = byte_rows(t)
    n = rows.shape[0]
    record = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    mask = nonzero_mask(rows)
    k = int(np.count_nonzero(mask))
    values = list(planes(kept_rows(rows, mask) if k < n else rows))
    hists = pool.histograms(values)
    if _dense_is_smaller(n, k, hists):
        if k < n:
            values, hists = list(planes(rows)), None
        return {**record, "encoding": "dense"}, pool.streams(values, hists)
    encoding, width, positions = _position_streams(mask, k, pool)
    del mask
    record = {**record, "encoding": encoding, "kept": k} | ({"width": width} if encoding == "gaps" else {})
    return record, positions + pool.streams(values, hists)


def _check_tensor(name: object, value: object) -> torch.Tensor:
    """``value`` if packed files can store it under ``name``; else a one-line error naming the fix."""
    if not isinstance(name, str):
        raise UnsupportedFileError(f"key {name!r} is not a string; packed files name tensors by string keys.")
    if not isinstance(value, torch.Tensor):
        raise UnsupportedFileError(f"{name!r} is a {type(value).__name__}, not a tensor; pass tensors only.")
    if value.layout != torch.strided or value.is_quantized:
        raise UnsupportedFileError(f"tensor {name!r} is sparse or quantized; convert it with .to_dense() first.")
    if value.is_meta:
        raise UnsupportedFileError(f"tensor {name!r} is on the meta device and has no data; load real weights.")
    if value.dtype not in _DTYPES.values():
        raise UnsupportedFileError(f"tensor {name!r} has dtype {value.dtype}, which packed files do not store.")
    return value


def write_packed(
    weights: dict[str, torch.Tensor],
    path: str | Path,
    level: int = DEFAULT_LEVEL,
    threads: int = -1,
    progress: Progress | None = None,
) -> None:
    """Write ``weights`` to ``path`` tensor by tensor; keys sharing a tensor are stored once, as aliases."""
    if not 1 <= level <= 22:
        raise SettingsError(f"zstd level {level} is out of range; choose a level from 1 to 22.")
    pool = _Pool(level, threads)
    records: list[list] = []
    seen: dict[object, str] = {}
    try:
        with open(path, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION))
            for i, (name, value) in enumerate(weights.items()):
                if progress:
                    progress(f"packing {name}", i / max(len(weights), 1))
                records.append(_write_tensor(f, name, value, pool, seen))
            _write_header(f, records)
    finally:
        pool.executor.shutdown()
    if progress:
        progress("packed", 1.0)


def _write_tensor(f: BinaryIO, name: str, value: object, pool: _Pool, seen: dict[object, str]) -> list:
    """Store one tensor's streams; returns its compact header record (see docs/packed-format.md)."""
    t = _check_tensor(name, value)
    keys = {("id", id(t)), tie_key(t)} - {None}
    for key in keys & seen.keys():
        return [name, "alias", seen[key]]
    seen.update(dict.fromkeys(keys, name))
    record, streams = _encode_tensor(t, pool)
    specs = []
    for s in streams:
        specs.append([len(s.payload), s.codec] + ([s.symbols] if s.symbols is not None else []))
        f.write(s.payload)
    crc = _combined_crc([s.crc32 for s in streams])
    extra = [record["kept"]] + ([record["width"]] if "width" in record else []) if "kept" in record else []
    return [name, record["encoding"], record["dtype"], record["shape"], crc, specs, *extra]


def _combined_crc(crcs: list[int]) -> int:
    """One checksum for a tensor: CRC-32 of its streams' CRC-32s (of their decoded bytes), little-endian, in order."""
    return zlib.crc32(struct.pack(f"<{len(crcs)}I", *crcs))


def _write_header(f: BinaryIO, records: list[list]) -> None:
    """The compact header: a JSON list of positional records, one zstd frame, then the footer."""
    raw = json.dumps(records, separators=(",", ":")).encode()
    blob = zstandard.ZstdCompressor(level=_HEADER_LEVEL).compress(raw)
    f.write(blob)
    f.write(_FOOTER.pack(len(blob), len(raw), zlib.crc32(blob), _END_MARK))


# ---- reading and validation -------------------------------------------------------------------------------


def _corrupt(path: Path, what: str) -> CorruptFileError:
    return CorruptFileError(f"{path.name} is not a valid packed file ({what}); re-create it with pruneapp.")


def _check_prefix(f: BinaryIO, path: Path, size: int, limits: Limits) -> int:
    """Size limit, magic and version: what tells a packed file, and one this code can read. Returns the version."""
    if size > limits.max_file_bytes:
        raise LimitExceededError(
            f"{path.name} is {size} bytes, over max_file_bytes={limits.max_file_bytes}; raise PRUNEAPP_MAX_FILE_BYTES."
        )
    head = f.read(_PREFIX.size)
    if len(head) < _PREFIX.size or not head.startswith(MAGIC):
        raise UnsupportedFileError(f"{path.name} is not a pruneapp packed file (its first bytes are not {MAGIC!r}).")
    version = _PREFIX.unpack(head)[1]
    if version not in READABLE_VERSIONS:
        raise UnsupportedFileError(
            f"{path.name} is packed format version {version}; this pruneapp reads versions 1 and 2, upgrade it."
        )
    return version


def _read_header(f: BinaryIO, path: Path, size: int, limits: Limits) -> tuple[list, int]:
    """The header's tensor records (in the version-1 form) and where the data area ends, after the footer, the
    header's size limit and its checksum are checked."""
    version = _check_prefix(f, path, size, limits)
    footer = _FOOTER if version == 2 else _FOOTER_V1
    if size < _DATA_START + footer.size:
        raise _corrupt(path, "truncated before its footer")
    f.seek(size - footer.size)
    fields = footer.unpack(f.read(footer.size))
    if version == 2:
        length, raw_size, crc, mark = fields
        offset = size - footer.size - length
    else:
        offset, length, raw_size, crc, mark = fields
    if mark != _END_MARK or offset < _DATA_START or offset + length != size - footer.size:
        raise _corrupt(path, "truncated or bad footer")
    if raw_size > limits.max_pickle_bytes:
        raise LimitExceededError(
            f"{path.name} has a {raw_size}-byte header, over max_pickle_bytes={limits.max_pickle_bytes}; "
            "raise PRUNEAPP_MAX_PICKLE_BYTES."
        )
    f.seek(offset)
    blob = f.read(length)
    if zlib.crc32(blob) != crc:
        raise _corrupt(path, "header checksum mismatch")
    header = _parse_json(_decompress(blob, raw_size, path, "header"), path)
    return (_parse_header(header, path) if version == 1 else _expand(header, path)), offset


def _parse_json(text: bytes, path: Path) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise _corrupt(path, "header is not valid JSON") from None


def _parse_header(header: object, path: Path) -> list:
    """Version 1: the tensor list of a ``{"format", "version", "tensors"}`` object."""
    if not isinstance(header, dict) or header.get("version") != 1:
        raise _corrupt(path, "header lacks its version")
    if not isinstance(header.get("tensors"), list):
        raise _corrupt(path, "header lacks a tensor list")
    return header["tensors"]


def _decompress(payload: bytes | np.ndarray, size: int, path: Path, what: str) -> bytes:
    """Decompress one zstd frame that must hold exactly ``size`` bytes (never allocating more)."""
    try:
        declared = zstandard.frame_content_size(payload)
        if declared not in (-1, size):
            raise _corrupt(path, f"{what} declares {declared} bytes, expected {size}")
        out = _dctx().decompress(payload, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise _corrupt(path, f"{what} does not decode to the expected {size} bytes: {e}") from None
    if len(out) != size:
        raise _corrupt(path, f"{what} holds {len(out)} bytes, expected {size}")
    return out


_FIELDS = {"alias": ("of",), "dense": (), "mask": ("kept",), "gaps": ("kept", "width")}


def _expand(header: object, path: Path) -> list[dict]:
    """Version 2's positional records as version-1 records, stream offsets summed from the lengths; the
    validator then checks them the same way."""
    if type(header) is not list:
        raise _corrupt(path, "header lacks a tensor list")
    records, offset = [], _DATA_START
    for r in header:
        encoding = r[1] if type(r) is list and len(r) >= 2 else None
        fields = _FIELDS.get(encoding) if type(encoding) is str else None
        stored = encoding != "alias"
        if fields is None or type(r[0]) is not str or len(r) != 2 + 4 * stored + len(fields):
            raise _corrupt(path, "a tensor record lacks a name, a known encoding or its fields")
        if not stored:
            records.append({"name": r[0], "encoding": "alias", "of": r[2]})
            continue
        streams, offset = _expand_streams(r[0], r[5], offset, path)
        record = {"name": r[0], "encoding": encoding, "dtype": r[2], "shape": r[3], "crc32": r[4], "streams": streams}
        records.append(record | dict(zip(fields, r[6:], strict=True)))
    return records


def _expand_streams(name: str, specs: object, offset: int, path: Path) -> tuple[list[dict], int]:
    """``[length, codec, symbols?]`` lists as stream records at consecutive offsets from ``offset``."""
    if type(specs) is not list:
        raise _corrupt(path, f"tensor {name!r} has no streams")
    streams = []
    for s in specs:
        if type(s) is not list or len(s) not in (2, 3) or not _is_count(s[0]):
            raise _corrupt(path, f"tensor {name!r} has a bad stream record")
        streams.append({"offset": offset, "length": s[0], "codec": s[1]} | ({"symbols": s[2]} if len(s) == 3 else {}))
        offset += s[0]
    return streams, offset


class _Validator:
    """Checks header records against the format and the limits, tracking names, totals and byte ranges."""

    def __init__(self, path: Path, data_end: int, limits: Limits) -> None:
        self.path, self.data_end, self.limits = path, data_end, limits
        self.names: dict[str, bool] = {}  # name -> is a stored (non-alias) tensor
        self.ranges: list[tuple[int, int]] = []
        self.total = self.bytes = 0

    def fail(self, what: str) -> CorruptFileError:
        return _corrupt(self.path, what)

    def entries(self, records: list) -> list[_Entry]:
        if len(records) > self.limits.max_tensors:
            raise LimitExceededError(
                f"{self.path.name} lists {len(records)} tensors, over max_tensors={self.limits.max_tensors}; "
                "raise PRUNEAPP_MAX_TENSORS."
            )
        entries = [self.entry(r) for r in records]
        self.ranges.sort()
        for (a_start, a_len), (b_start, _) in zip(self.ranges, self.ranges[1:], strict=False):
            if a_start + a_len > b_start:
                raise self.fail("two streams overlap")
        return entries

    def entry(self, r: object) -> _Entry:
        if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not _one_of(r.get("encoding"), _ENCODINGS):
            raise self.fail("a tensor record lacks a name or a known encoding")
        name = r["name"]
        if name in self.names:
            raise self.fail(f"tensor {name!r} is listed twice")
        if r["encoding"] == "alias":
            if not isinstance(r.get("of"), str) or self.names.get(r["of"]) is not True:
                raise self.fail(f"alias {name!r} does not point to an earlier stored tensor")
            self.names[name] = False
            return _Entry(name, "alias", alias_of=r["of"])
        self.names[name] = True
        return self.stored(name, r)

    def stored(self, name: str, r: dict) -> _Entry:
        dtype = _DTYPES[r["dtype"]] if _one_of(r.get("dtype"), _DTYPES) else None
        if dtype is None:
            raise UnsupportedFileError(f"tensor {name!r} in {self.path.name} has unknown dtype {r.get('dtype')!r}.")
        shape = r.get("shape")
        if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(_is_count(d) for d in shape):
            raise self.fail(f"tensor {name!r} has a bad shape")
        n = self.count(name, shape, _itemsize(dtype))
        e = _Entry(name, r["encoding"], dtype, tuple(shape), crc32=r.get("crc32"))
        if not _is_count(e.crc32) or e.crc32 > 0xFFFFFFFF:
            raise self.fail(f"tensor {name!r} has no valid checksum")
        e.kept = r.get("kept", n) if e.encoding != "dense" else n
        e.width = r.get("width", 0) if e.encoding == "gaps" else 0
        if not _is_count(e.kept) or e.kept > n or (e.encoding == "gaps" and e.width not in (1, 2, 4, 8)):
            raise self.fail(f"tensor {name!r} has a bad kept count or gap width")
        e.streams = self.streams(name, r.get("streams"), _stream_sizes(e, n))
        e.extent = _extent(e.streams)
        return e

    def count(self, name: str, shape: list[int], itemsize: int) -> int:
        """Element count of one tensor, checked with the running totals against the limits."""
        n = math.prod(shape)
        if n > self.limits.max_tensor_elements:
            raise LimitExceededError(
                f"tensor {name!r} in {self.path.name} has {n} elements, over max_tensor_elements="
                f"{self.limits.max_tensor_elements}; raise PRUNEAPP_MAX_TENSOR_ELEMENTS."
            )
        self.total += n
        self.bytes += n * itemsize
        if self.total > self.limits.max_total_elements:
            raise LimitExceededError(
                f"{self.path.name} holds over max_total_elements={self.limits.max_total_elements} elements; "
                "raise PRUNEAPP_MAX_TOTAL_ELEMENTS."
            )
        if self.bytes > self.limits.max_decompressed_bytes:
            raise LimitExceededError(
                f"{self.path.name} decodes to over max_decompressed_bytes={self.limits.max_decompressed_bytes} bytes; "
                "raise PRUNEAPP_MAX_DECOMPRESSED_BYTES."
            )
        return n

    def streams(self, name: str, raw: object, sizes: list[int]) -> tuple[_Spec, ...]:
        if type(raw) is not list or len(raw) != len(sizes):
            raise self.fail(f"tensor {name!r} has {len(raw) if isinstance(raw, list) else 'no'} streams")
        return tuple([self.spec(name, s, size) for s, size in zip(raw, sizes, strict=True)])

    def spec(self, name: str, s: object, size: int) -> _Spec:
        codec = s.get("codec") if type(s) is dict else None
        if type(codec) is not str or codec not in _CODECS:
            raise self.fail(f"tensor {name!r} has a stream with an unknown codec")
        offset, length, symbols = s.get("offset"), s.get("length"), s.get("symbols")
        if type(offset) is not int or type(length) is not int or length < 0 or offset < _DATA_START:
            raise self.fail(f"tensor {name!r} has a stream outside the data area")
        if offset + length > self.data_end:
            raise self.fail(f"tensor {name!r} has a stream outside the data area")
        if symbols is not None and not _valid_symbols(symbols):
            raise self.fail(f"tensor {name!r} has a bad symbol table")
        spec = _Spec(offset, length, codec, symbols, size, _packed_size(size, symbols))
        if codec == "raw" and length != spec.packed:
            raise self.fail(f"tensor {name!r} has a raw stream of the wrong length")
        if length:
            self.ranges.append((offset, length))
        return spec


def _one_of(x: object, options: Collection[str]) -> bool:
    return isinstance(x, str) and x in options


def _is_count(x: object) -> bool:
    return type(x) is int and x >= 0  # JSON gives int or bool; bool is not a count


def _valid_symbols(symbols: object) -> bool:
    return (
        type(symbols) is list
        and 1 <= len(symbols) <= 16
        and set(map(type, symbols)) == {int}
        and len(_BYTE_VALUES.intersection(symbols)) == len(symbols)
    )


def _stream_sizes(e: _Entry, n: int) -> list[int]:
    """Decoded size of each stream, in file order, implied by the encoding."""
    itemsize = _itemsize(e.dtype)
    if e.encoding == "dense":
        return [n] * itemsize
    positions = [-(-n // 8)] if e.encoding == "mask" else [e.kept] * e.width
    return positions + [e.kept] * itemsize


def _dctx() -> zstandard.ZstdDecompressor:
    """This thread's decompressor: making one costs more than decompressing a small stream."""
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW)
    return dctx


def _stream(payload: np.ndarray, spec: _Spec, path: Path, what: str) -> np.ndarray:
    """One stream's decoded bytes (spec.size of them); a raw stream's are its payload, uncopied."""
    if spec.codec == "zstd":
        payload = np.frombuffer(_decompress(payload, spec.packed, path, what), np.uint8)
    if spec.symbols is not None:
        payload = _unpack_symbols(payload, spec.symbols, spec.size)
    return payload


def _extent(streams: tuple[_Spec, ...]) -> tuple[int, int, int]:
    """First and end byte of the streams that hold bytes, and how many bytes they hold."""
    lo, hi, used = -1, 0, 0
    for s in streams:
        if s.length:
            lo = s.offset if lo < 0 else min(lo, s.offset)
            hi = max(hi, s.offset + s.length)
            used += s.length
    return (lo, hi, used) if used else (0, 0, 0)


def _groups(stored: list[_Entry]) -> Iterator[tuple[list[_Entry], int, int, int]]:
    """Runs of tensors whose streams fill one byte range without gaps (as the writer lays them out), up to
    _BATCH_BYTES or one tensor: each is read with one call. Yields (tensors, first byte, end byte, bytes used)."""
    group: list[_Entry] = []
    lo = hi = used = 0
    for e in stored:
        a, b, u = e.extent
        if not (used and u):
            joined = (lo, hi, used) if used else (a, b, u)
        else:
            joined = (min(lo, a), max(hi, b), used + u)
        if group and (joined[1] - joined[0] != joined[2] or joined[2] > _BATCH_BYTES):
            yield group, lo, hi, used
            group, joined = [], (a, b, u)
        group.append(e)
        lo, hi, used = joined
    if group:
        yield group, lo, hi, used


def _read_at(f: BinaryIO, path: Path, offset: int, length: int, name: str) -> np.ndarray:
    out = np.empty(length, np.uint8)
    f.seek(offset)
    if f.readinto(memoryview(out)) != length:
        raise _corrupt(path, f"the streams of tensor {name!r} are truncated")
    return out


def _payloads(f: BinaryIO, path: Path, group: list[_Entry], lo: int, hi: int, used: int) -> list[list[np.ndarray]]:
    """Each tensor's stored stream bytes: views of one read when they fill lo..hi, else one read per stream."""
    if hi - lo != used:
        return [[_read_at(f, path, s.offset, s.length, e.name) for s in e.streams] for e in group]
    data = _read_at(f, path, lo, used, group[0].name)
    return [[data[s.offset - lo : s.offset - lo + s.length] if s.length else _EMPTY for s in e.streams] for e in group]


def _interleave(byte_planes: list[np.ndarray], start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """Elements start..stop from their byte planes, one item each, into ``out`` (items, or rows for other widths)
    if given. 2- and 4-byte elements are built with shifts: faster than strided byte copies."""
    w = len(byte_planes)
    if w == 1 and out is None:
        return byte_planes[0][start:stop]
    if w in (2, 4) and (stop - start) * w >= _SHIFT_BYTES:
        v = np.empty(stop - start, f"<u{w}") if out is None else out
        v[...] = byte_planes[-1][start:stop]
        for plane in byte_planes[-2::-1]:
            v <<= 8
            v |= plane[start:stop]
        return v
    rows = np.empty((stop - start, w), np.uint8) if out is None else out.view(np.uint8).reshape(stop - start, w)
    for i, plane in enumerate(byte_planes):
        rows[:, i] = plane[start:stop]
    return items(rows)


def _mask_starts(e: _Entry, bits: np.ndarray, count: int, path: Path) -> np.ndarray:
    """Index of the first kept value of each chunk and the end: [0, ..., kept], from the mask's popcount."""
    if count <= 1:
        return np.array([0, e.kept])  # the one chunk checks its own count
    counts = np.add.reduceat(_popcount(bits), np.arange(0, bits.size, _CHUNK // 8), dtype=np.int64)
    if int(counts.sum()) != e.kept:
        raise _corrupt(path, f"tensor {e.name!r} has a mask with the wrong number of kept values")
    return np.concatenate([[0], np.cumsum(counts)])


def _popcount(bits: np.ndarray) -> np.ndarray:
    return np.bitwise_count(bits) if hasattr(np, "bitwise_count") else _POPCOUNT[bits]  # numpy < 2: a table


def _gap_positions(e: _Entry, gap_planes: list[np.ndarray], n: int, path: Path) -> np.ndarray:
    """Indices of the kept elements, summed from the gaps before each."""
    if e.kept == 0:
        return np.empty(0, np.int64)
    gaps = _interleave(gap_planes, 0, e.kept)
    if e.kept * 256**e.width >= 1 << 63 and int(gaps.max()) >= n:  # else the sum below cannot overflow
        raise _corrupt(path, f"tensor {e.name!r} has a gap beyond its end")
    index = gaps.astype(np.int64)
    index += 1
    index.cumsum(out=index)
    index -= 1
    if int(index[-1]) >= n:
        raise _corrupt(path, f"tensor {e.name!r} has a kept position beyond its end")
    return index


Step = Callable[[int], None]  # decodes chunk j of a tensor into its output; chunks are independent


def _dense_steps(values: list[np.ndarray], out: np.ndarray) -> tuple[int, Step]:
    n, out_items = out.shape[0], items(out)

    def step(j: int) -> None:
        start, stop = j * _CHUNK, min(n, (j + 1) * _CHUNK)
        _interleave(values, start, stop, out_items[start:stop])

    return -(-n // _CHUNK), step


def _gap_steps(e: _Entry, streams: list[np.ndarray], out: np.ndarray, path: Path) -> tuple[int, Step]:
    """Chunks of kept values; chunk j also clears the elements from its first position to the next chunk's."""
    values, n, out_items = streams[e.width :], out.shape[0], items(out)
    index = _gap_positions(e, streams[: e.width], n, path)

    def step(j: int) -> None:
        start, stop = j * _CHUNK, min(e.kept, (j + 1) * _CHUNK)
        out[int(index[start]) if j else 0 : int(index[stop]) if stop < e.kept else n] = 0
        out_items[index[start:stop]] = _interleave(values, start, stop)

    return max(1, -(-e.kept // _CHUNK)), step


def _mask_steps(e: _Entry, streams: list[np.ndarray], out: np.ndarray, path: Path) -> tuple[int, Step]:
    bits, values, n = streams[0], streams[1:], out.shape[0]
    count = -(-n // _CHUNK)
    if n % 8 and int(bits[-1]) >> (n % 8):
        raise _corrupt(path, f"tensor {e.name!r} has a mask with the wrong number of kept values")
    starts = _mask_starts(e, bits, count, path)

    def step(j: int) -> None:
        start, stop = j * _CHUNK, min(n, (j + 1) * _CHUNK)
        chunk = np.unpackbits(bits[start // 8 : -(-stop // 8)], count=stop - start, bitorder="little")
        index = np.flatnonzero(chunk.view(np.bool_))
        first, end = int(starts[j]), int(starts[j + 1])
        if index.size != end - first:
            raise _corrupt(path, f"tensor {e.name!r} has a mask with the wrong number of kept values")
        part = out[start:stop]
        part.fill(0)
        items(part)[index] = _interleave(values, first, end)

    return count, step


def _decode(e: _Entry, payloads: list[np.ndarray], path: Path, executor: ThreadPoolExecutor) -> torch.Tensor:
    """One tensor from its stored streams. Tensors with much to decode do their streams, then their chunks, on
    worker threads (zstd, zlib and numpy's loops release the GIL), checksumming while the chunks are written."""
    n, w = math.prod(e.shape), _ITEMSIZE[e.dtype]
    parallel = _WORKERS > 1 and sum(s.size for s in e.streams) >= _PARALLEL_BYTES
    what = f"a stream of tensor {e.name!r}"
    if parallel:
        streams = list(executor.map(lambda job: _stream(*job, path, what), zip(payloads, e.streams, strict=True)))
        crcs = executor.submit(lambda: [zlib.crc32(s) for s in streams])
    else:
        streams = [
            p if s.codec == "raw" and s.symbols is None else _stream(p, s, path, what)
            for p, s in zip(payloads, e.streams, strict=True)
        ]
        crcs = [zlib.crc32(s) for s in streams]
    out = np.empty((n, w), np.uint8)
    if e.encoding == "dense":
        count, step = _dense_steps(streams, out)
    elif e.encoding == "gaps":
        count, step = _gap_steps(e, streams, out, path)
    else:
        count, step = _mask_steps(e, streams, out, path)
    list((executor.map if parallel else map)(step, range(count)))
    if _combined_crc(crcs.result() if parallel else crcs) != e.crc32:
        raise _corrupt(path, f"tensor {e.name!r} fails its checksum")
    if e.dtype == torch.bool and bool((out > 1).any()):
        raise _corrupt(path, f"tensor {e.name!r} holds bool bytes other than 0 and 1")
    if n == 0:
        return torch.empty(e.shape, dtype=e.dtype)
    return torch.frombuffer(out, dtype=e.dtype).view(e.shape)  # shares out's memory and keeps it alive


def _itemsize(dtype: torch.dtype) -> int:
    return _ITEMSIZE[dtype]


def _read_tensors(f: BinaryIO, path: Path, entries: list[_Entry], executor: ThreadPoolExecutor) -> dict:
    out: dict[str, torch.Tensor] = {}
    for group, lo, hi, used in _groups([e for e in entries if e.encoding != "alias"]):
        for e, payloads in zip(group, _payloads(f, path, group, lo, hi, used), strict=True):
            out[e.name] = _decode(e, payloads, path, executor)
    return {e.name: out[e.alias_of or e.name] for e in entries}


def _open(f: BinaryIO, path: Path, limits: Limits | None) -> tuple[list[dict], list[_Entry]]:
    limits = limits or default_limits()
    size = os.fstat(f.fileno()).st_size
    records, data_end = _read_header(f, path, size, limits)
    return records, _Validator(path, data_end, limits).entries(records)


def read_header(path: str | Path, limits: Limits | None = None) -> list[dict]:
    """The validated per-tensor records of a packed file (name, dtype, shape, encoding, streams with offsets; the
    version-1 form for either version), without decoding."""
    path = Path(path)
    with open(path, "rb") as f:
        return _open(f, path, limits)[0]


def read_packed(path: str | Path, limits: Limits | None = None) -> dict[str, torch.Tensor]:
    """Read a packed file back bit-for-bit; tied keys come back as the same tensor object."""
    path = Path(path)
    with open(path, "rb") as f, ThreadPoolExecutor(max_workers=_WORKERS) as executor:
        entries = _open(f, path, limits)[1]
        try:
            return _read_tensors(f, path, entries, executor)
        except (ValueError, RuntimeError, OverflowError, IndexError) as e:
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise _corrupt(path, f"undecodable data: {detail}") from None
