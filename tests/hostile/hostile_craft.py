"""Builders of hostile (and legitimate) model files, generated at test time: no binary is ever committed.

Code-execution payloads only ever touch a marker file, so a test proves that a payload ran or did not by whether
the marker exists.
"""

from __future__ import annotations

import argparse
import builtins
import functools
import io
import json
import os
import pickle
import pydoc
import random
import runpy
import struct
import subprocess
import tarfile
import warnings
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

MARKER = "PWNED"  # every payload creates <case dir>/PWNED
PAYLOADS = ("os.system", "eval", "exec", "getattr", "subprocess", "runpy", "pydoc", "torch.load")
GiB = 1024**3


def marker(tmp: Path) -> Path:
    return tmp / MARKER


def reference_weights() -> dict[str, torch.Tensor]:
    """A small state_dict that the loading cases expect back, bit for bit."""
    g = torch.Generator().manual_seed(0)
    return {
        "fc1.weight": torch.randn(8, 4, generator=g),
        "fc1.bias": torch.randn(8, generator=g),
        "fc2.weight": torch.randn(2, 8, generator=g),
    }


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


# ---------------------------------------------------------------------------------------------------------------
# Pickle payloads


class Call:
    """Pickles as ``func(*args)``, the way a pickle runs code; ``func`` may itself be a Call (a gadget chain)."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args

    def __call__(self, *args: Any) -> Any:  # pickle wants reduce functions to be callable; this one never runs
        raise AssertionError("a payload is only ever pickled")


def payload(kind: str, tmp: Path) -> Call:
    """A pickle payload that creates the marker file of ``tmp`` when unpickled."""
    m = str(marker(tmp))
    touch = f"open({m!r}, 'w').close()"
    if kind == "os.system":
        return Call(os.system, f"touch '{m}'")
    if kind == "eval":
        return Call(builtins.eval, touch)
    if kind == "exec":
        return Call(builtins.exec, touch)
    if kind == "getattr":  # getattr(__import__("os"), "system")("touch ..."): no dangerous name appears as a global
        return Call(Call(getattr, Call(builtins.__import__, "os"), "system"), f"touch '{m}'")
    if kind == "subprocess":
        return Call(subprocess.call, ["touch", m])
    if kind == "runpy":  # runpy._run_code execs a string: stdlib, rarely on scanners' lists
        return Call(runpy._run_code, touch, {})
    if kind == "pydoc":  # pydoc.pipepager runs a shell command
        return Call(pydoc.pipepager, "", f"touch '{m}'")
    if kind == "torch.load":  # a nested load: runs the inner payload where TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
        inner = tmp / "inner.pt"
        torch.save({"x": Call(os.system, f"touch '{m}'")}, inner)
        return Call(torch.load, str(inner))
    raise ValueError(kind)


def payload_file(kind: str, container: str, tmp: Path, protocol: int = 2) -> Path:
    """``payload(kind)`` in a container: "zip" (data.pkl replaced), "checkpoint" (nested in a valid checkpoint),
    "legacy" (non-zip torch.save) or "pickle" (a plain pickle file)."""
    evil = payload(kind, tmp)
    path = tmp / f"{container}.pt"
    if container == "pickle":
        path.write_bytes(pickle.dumps({"model": evil}, protocol=protocol))
    elif container == "zip":
        torch.save(reference_weights(), path)
        replace_record(path, "data.pkl", pickle.dumps(evil, protocol=protocol))
    elif container == "checkpoint":
        torch.save(checkpoint(hparams=evil), path, pickle_protocol=protocol)
    elif container == "legacy":
        torch.save(checkpoint(hparams=evil), path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    else:
        raise ValueError(container)
    return path


def checkpoint(**extra: Any) -> dict[str, Any]:
    return {"model": reference_weights(), "epoch": 3, **extra}


# ---------------------------------------------------------------------------------------------------------------
# torch.save files with a pickle of our own making


class Storage:
    """A storage as a torch pickle declares it: record key, dtype, element count (which may lie)."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.numel = key, numel
        self.type = getattr(torch, torch.storage._dtype_to_storage_type_map()[dtype])


class View:
    """Pickles as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``, exactly as torch.save."""

    def __init__(self, storage: Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return torch._utils._rebuild_tensor_v2, self.args


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is Storage:
            return ("storage", obj.type, obj.key, "cpu", obj.numel)
        return None


def torch_pickle(obj: Any, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def write_torch_zip(path: Path, pickle_bytes: bytes, records: dict[str, bytes]) -> Path:
    """A zip laid out by torch's own writer (aligned, stored): data.pkl plus ``data/<key>`` records."""
    writer = torch._C.PyTorchFileWriter(str(path), True, 64)
    writer.write_record("data.pkl", pickle_bytes, len(pickle_bytes))
    writer.write_record("byteorder", b"little", 6)
    for key, data in records.items():
        writer.write_record(f"data/{key}", data, len(data))
    writer.write_end_of_file()
    return path


def crafted_tensor_file(tmp: Path, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> Path:
    """A state_dict with one float32 tensor of the given view over a 16-element storage."""
    s = Storage("0", torch.float32, 16)
    obj = {"w": View(s, offset, size, stride), "b": View(s, 0, (4,), (1,))}
    return write_torch_zip(tmp / "view.pt", torch_pickle(obj), {"0": bytes(64)})


def lying_storage_file(tmp: Path) -> Path:
    """A storage that declares 10^9 elements (4 GB) while its record holds 64 bytes."""
    s = Storage("0", torch.float32, 10**9)
    return write_torch_zip(tmp / "lying.pt", torch_pickle({"w": View(s, 0, (16,), (1,))}), {"0": bytes(64)})


def many_tensors_file(tmp: Path, n: int = 100_000) -> Path:
    """``n`` one-element tensors, all views of one small storage (a small file, a huge tensor count)."""
    s = Storage("0", torch.float32, n)
    obj = {f"t{i}": View(s, i, (1,), (1,)) for i in range(n)}
    return write_torch_zip(tmp / "many.pt", torch_pickle(obj), {"0": bytes(4 * n)})


def deep_pickle_file(tmp: Path, depth: int) -> Path:
    """data.pkl is a list nested ``depth`` deep, written with raw opcodes (no recursion needed)."""
    body = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    return write_torch_zip(tmp / "deep.pt", body, {})


def nested_checkpoint_file(tmp: Path, value: Any) -> Path:
    path = tmp / "nested.pt"
    torch.save(checkpoint(extra=value), path)
    return path


def laughs(levels: int, width: int) -> list[Any]:
    """``levels`` of lists, each holding ``width`` references to the one below: width**levels paths, tiny pickle."""
    node: list[Any] = [0]
    for _ in range(levels):
        node = [node] * width
    return node


def sparse_coo_file(tmp: Path) -> Path:
    i = torch.tensor([[0, 5_000_000], [0, 1]])
    bad = torch.sparse_coo_tensor(i, torch.ones(2), (4, 4), check_invariants=False)
    path = tmp / "sparse.pt"
    torch.save({"w": bad}, path)
    return path


def sparse_csr_output(tmp: Path) -> Path:
    """A pruneapp CSR output whose column indices point far outside the matrix."""
    from pruneapp.formats import CSR_FORMAT, CSR_VERSION

    crow = torch.tensor([0, 1, 2], dtype=torch.int32)
    col = torch.tensor([0, 1_000_000], dtype=torch.int32)
    with warnings.catch_warnings():  # torch's one-time "sparse CSR is in beta" notice
        warnings.simplefilter("ignore", UserWarning)
        bad = torch.sparse_csr_tensor(crow, col, torch.ones(2), (2, 4), check_invariants=False)
    obj = {"format": CSR_FORMAT, "version": CSR_VERSION, "tensors": {"w": bad}, "shapes": {"w": [2, 4]}}
    path = tmp / "bad.csr.pt"
    torch.save({**obj, "aliases": {}, "extras": {}, "metadata": {}}, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Zip surgery


def replace_record(path: Path, suffix: str, data: bytes) -> None:
    """Rewrite a zip with the entry ending in ``suffix`` replaced (entries stay stored, i.e. uncompressed)."""
    with zipfile.ZipFile(path) as zf:
        entries = [(i.filename, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, old in entries:
            zf.writestr(name, data if name.endswith(suffix) else old)


def write_zip(path: Path, entries: list[tuple[str, bytes | int, int, int, int]]) -> Path:
    """A zip from raw entries ``(name, stored bytes, method, uncompressed size, crc)``: sizes may lie.

    Stored bytes given as an int are that many zeros, written as a hole in a sparse file.
    """
    central = bytearray()
    with open(path, "wb") as fh:
        for name, data, method, size, crc in entries:
            offset, raw = fh.tell(), name.encode()
            length = data if isinstance(data, int) else len(data)
            fh.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, length, size, len(raw), 0))
            fh.write(raw)
            if isinstance(data, int):
                fh.seek(data, os.SEEK_CUR)
            else:
                fh.write(data)
            central += struct.pack("<IHHHHHHIII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, length, size)
            central += struct.pack("<HHHHHII", len(raw), 0, 0, 0, 0, 0, offset) + raw
        start = fh.tell()
        fh.write(central)
        fh.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), start, 0))
    return path


@functools.cache
def zeros_crc(nbytes: int) -> int:
    """CRC-32 of ``nbytes`` zero bytes (a multiple of 1 MiB), without holding them all."""
    chunk, crc = bytes(1 << 20), 0
    for _ in range(nbytes >> 20):
        crc = zlib.crc32(chunk, crc)
    return crc


@functools.cache
def zero_deflate(nbytes: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``nbytes`` zeros (about 1000:1) and its CRC, built from one repeating block."""
    chunk = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first, steady = (c.compress(chunk) + c.flush(zlib.Z_SYNC_FLUSH) for _ in range(2))
    return first + steady * ((nbytes >> 20) - 1) + c.flush(zlib.Z_FINISH), zeros_crc(nbytes)


def zstd_zero_tensor_file(tmp: Path, nbytes: int) -> Path:
    """A .zst of a valid torch file with one all-zero tensor of ``nbytes``: a few KB on disk, ``nbytes`` once loaded.

    The torch file is written sparse (its zeros are a hole) and compressed as a stream; neither is ever in memory.
    """
    import zstandard

    s = Storage("0", torch.float32, nbytes // 4)
    pkl = torch_pickle({"w": View(s, 0, (nbytes // 4,), (1,))})
    entries = [stored("archive/data.pkl", pkl), stored("archive/byteorder", b"little")]
    plain = write_zip(
        tmp / "zeros.pt", [*entries, ("archive/data/0", nbytes, zipfile.ZIP_STORED, nbytes, zeros_crc(nbytes))]
    )
    with open(plain, "rb") as fin, open(tmp / "zeros.pt.zst", "wb") as fout:
        zstandard.ZstdCompressor(level=1).copy_stream(fin, fout, size=plain.stat().st_size)
    plain.unlink()
    return tmp / "zeros.pt.zst"


def stored(name: str, data: bytes) -> tuple[str, bytes, int, int, int]:
    return name, data, zipfile.ZIP_STORED, len(data), zlib.crc32(data)


def zip_bomb_file(tmp: Path, inflated: int = GiB) -> Path:
    """A torch zip whose tensor record is deflated: about 1 MB on disk that inflates to ``inflated`` bytes."""
    s = Storage("0", torch.float32, inflated // 4)
    pkl = torch_pickle({"w": View(s, 0, (inflated // 4,), (1,))})
    bomb, crc = zero_deflate(inflated)
    entries = [stored("archive/data.pkl", pkl), stored("archive/byteorder", b"little")]
    entries.append(("archive/data/0", bomb, zipfile.ZIP_DEFLATED, inflated, crc))
    return write_zip(tmp / "bomb.pt", entries)


def oversized_entry_file(tmp: Path) -> Path:
    """A stored entry whose sizes claim 2 GB in a file of a few hundred bytes."""
    s = Storage("0", torch.float32, 16)
    pkl = torch_pickle({"w": View(s, 0, (16,), (1,))})
    entries = [stored("archive/data.pkl", pkl), stored("archive/data/0", bytes(64))]
    path = write_zip(tmp / "oversized.pt", entries)
    data = bytearray(path.read_bytes())
    central = data.rindex(b"PK\x01\x02")  # the last central directory record: archive/data/0
    data[central + 20 : central + 28] = struct.pack("<II", 2**31, 2**31)
    path.write_bytes(bytes(data))
    return path


def duplicate_entry_file(tmp: Path) -> Path:
    """Two data.pkl entries: a zip reader and a scanner may each see a different one."""
    s = Storage("0", torch.float32, 4)
    good, evil = torch_pickle({"w": View(s, 0, (4,), (1,))}), pickle.dumps(payload("os.system", tmp))
    entries = [stored("archive/data.pkl", good), stored("archive/data/0", bytes(16)), stored("archive/data.pkl", evil)]
    return write_zip(tmp / "twice.pt", entries)


def escaping_entry_file(tmp: Path) -> Path:
    """A zip entry whose name climbs out of the archive folder."""
    s = Storage("0", torch.float32, 4)
    pkl = torch_pickle({"w": View(s, 0, (4,), (1,))})
    entries = [stored("archive/data.pkl", pkl), stored("archive/data/0", bytes(16)), stored("../../evil.py", b"x")]
    return write_zip(tmp / "escape.pt", entries)


def escaping_storage_key_file(tmp: Path) -> Path:
    """A storage whose record key points outside the archive's data folder."""
    s = Storage("../../etc/passwd", torch.float32, 4)
    return write_torch_zip(tmp / "key.pt", torch_pickle({"w": View(s, 0, (4,), (1,))}), {"0": bytes(16)})


def compressed_pickle_file(tmp: Path) -> Path:
    """torch.save layout, but data.pkl is deflated (torch.save never compresses)."""
    s = Storage("0", torch.float32, 4)
    pkl = torch_pickle({"w": View(s, 0, (4,), (1,))})
    packed = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = packed.compress(pkl) + packed.flush()
    entries = [("archive/data.pkl", data, zipfile.ZIP_DEFLATED, len(pkl), zlib.crc32(pkl))]
    return write_zip(tmp / "deflated.pt", [*entries, stored("archive/data/0", bytes(16))])


def record_offset(path: Path, suffix: str) -> int:
    """Where the bytes of the zip entry ending in ``suffix`` start in the file."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as fh:
        fh.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", fh.read(4))
    return info.header_offset + 30 + name_len + extra_len


def flipped_byte_file(tmp: Path) -> Path:
    path = tmp / "flipped.pt"
    torch.save(reference_weights(), path)
    data = bytearray(path.read_bytes())
    data[record_offset(path, "data/0") + 5] ^= 0x40
    path.write_bytes(bytes(data))
    return path


def truncated_file(tmp: Path, fraction: float) -> Path:
    path = tmp / "truncated.pt"
    torch.save(reference_weights(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def legacy_tar_file(tmp: Path) -> Path:
    """The layout of torch.save before 0.4: a tar with sys_info, pickle, storages, tensors."""
    path = tmp / "old.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            info = tarfile.TarInfo(name)
            data = pickle.dumps({"little_endian": True} if name == "sys_info" else [])
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------------------------------------------------------
# safetensors with lying headers


def safetensors_file(tmp: Path, header: dict[str, Any] | bytes, data: bytes, declared: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp / "lying.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw + data)
    return path


def f32(offsets: tuple[int, int], shape: list[int]) -> dict[str, Any]:
    return {"dtype": "F32", "shape": shape, "data_offsets": list(offsets)}


def zero_size_entries_header(n: int) -> bytes:
    entry = '"t{}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    return ("{" + ",".join(entry.format(i) for i in range(n)) + "}").encode()


# ---------------------------------------------------------------------------------------------------------------
# zstd frames, written by hand so that headers can lie


def zstd_rle_frame(nbytes: int, declared: int | None) -> bytes:
    """One frame of ``nbytes`` zeros as RLE blocks (4 bytes per 128 KiB); ``declared`` goes in the header (or none)."""
    block = 128 * 1024
    if declared is None:
        head = bytes([0x00, 0x68])  # no content size; window 8 MiB
    else:
        head = bytes([0xC0, 0x68]) + struct.pack("<Q", declared)  # 8-byte content size; window 8 MiB
    blocks = bytearray()
    left = nbytes
    while left:
        n = min(block, left)
        left -= n
        blocks += ((n << 3) | (1 << 1) | int(left == 0)).to_bytes(3, "little") + b"\x00"
    return b"\x28\xb5\x2f\xfd" + head + bytes(blocks)


def zstd_of(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)


# ---------------------------------------------------------------------------------------------------------------
# TorchScript archives whose code acts when torch.jit.load runs it


class ScriptWrites(nn.Module):
    """Its __setstate__, which torch.jit.load runs, creates the marker file (torch.from_file with shared=True)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(3, 3))
        self.path = path
        self.flag = torch.zeros(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, torch.Tensor, bool]:
        return (self.weight, self.path, self.flag, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, torch.Tensor, bool]) -> None:
        self.weight = state[0]
        self.path = state[1]
        self.training = state[3]
        self.flag = torch.from_file(self.path, True, 2).fill_(1.0)


class ScriptForwardWrites(nn.Module):
    """Its forward creates the marker file; nothing at load time runs it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(3, 3))
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + torch.from_file(self.path, True, 2).fill_(1.0).sum()


class ScriptLoops(nn.Module):
    """Its __setstate__ never returns."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(3, 3))
        self.count = torch.zeros(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        return (self.weight, self.count, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, torch.Tensor, bool]) -> None:
        self.weight = state[0]
        self.training = state[2]
        self.count = state[1]
        while bool(self.count.sum() >= 0):
            self.count += 1


def jit_load(path: str, limits: object) -> object:
    """What pruneapp never does with an upload; a worker loader for a positive control."""
    return torch.jit.load(path)


def script_file(tmp: Path, module: nn.Module) -> Path:
    path = tmp / "script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated; users still have archives
        torch.jit.save(torch.jit.script(module), path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Other checkpoints


def namespace_checkpoint(tmp: Path) -> Path:
    path = tmp / "args.pt"
    torch.save(checkpoint(args=argparse.Namespace(lr=0.1, layers=[4, 8])), path)
    return path


def numpy_checkpoint(tmp: Path) -> Path:
    path = tmp / "numpy.pt"
    torch.save(checkpoint(rng=np.random.default_rng(0).random(3), mean=np.float64(0.5)), path)
    return path


def pickled_model_file(tmp: Path) -> Path:
    path = tmp / "full.pt"
    torch.save(TinyNet(), path)
    return path


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)
