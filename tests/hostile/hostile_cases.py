"""The hostile-input cases: how to build each file and what loading it must give (for the tests and measure.py)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hostile_craft as craft
import pytest
import torch

from pruneapp.errors import (
    CorruptFileError,
    LimitExceededError,
    PruneAppError,
    UnsafeFileError,
    UnsupportedFileError,
)
from pruneapp.limits import GiB, Limits, MiB
from pruneapp.loading import LoadedModel

# Lowered so that every case stays small and fast; max_tensors and max_depth keep their defaults on purpose.
TEST_LIMITS = Limits(
    max_file_bytes=256 * MiB,
    max_total_elements=64 * 1024**2,
    max_tensor_elements=16 * 1024**2,
    max_decompressed_bytes=64 * MiB,
    worker_memory_bytes=1 * GiB,
    worker_cpu_seconds=20,
    worker_wall_seconds=30,
)

Check = Callable[[LoadedModel, Path], None]


@dataclass(frozen=True)
class Case:
    """One hostile file: ``error`` is the PruneAppError it must raise (None: it must load and pass ``check``)."""

    name: str
    build: Callable[[Path], Path]
    error: type[PruneAppError] | None
    match: str = ""  # regex the error message must contain
    limit: str = ""  # the limit whose name the message must give (PRUNEAPP_...), where a limit must fire
    check: Check | None = None
    gap: str = ""  # a known gap in the loader: the case is expected to fail until it is fixed
    tags: tuple[str, ...] = field(default=())
    limits: Limits = TEST_LIMITS
    worker_limit: str | None = None  # the worker limit that must stop the load, where the loader's own cannot


def same_weights(expected: dict[str, torch.Tensor]) -> Check:
    def check(model: LoadedModel, tmp: Path) -> None:
        assert list(model.weights) == list(expected)
        for key, t in expected.items():
            assert model.weights[key].dtype == t.dtype and torch.equal(model.weights[key], t), key

    return check


def reference_loaded(model: LoadedModel, tmp: Path) -> None:
    same_weights(craft.reference_weights())(model, tmp)


def left_out(entry: str) -> Check:
    def check(model: LoadedModel, tmp: Path) -> None:
        reference_loaded(model, tmp)
        assert entry not in model.extras
        assert any(f"Left out checkpoint entry {entry!r}" in note for note in model.notes), model.notes

    return check


def tinynet_loaded(model: LoadedModel, tmp: Path) -> None:
    assert model.structure == "pickled-module"
    same_weights(craft.TinyNet().state_dict())(model, tmp)


def script_loaded(model: LoadedModel, tmp: Path) -> None:
    assert model.structure == "torchscript"
    assert list(model.weights) == ["weight"]
    torch.manual_seed(0)
    assert torch.equal(model.weights["weight"], torch.randn(3, 3))


def _payload_case(kind: str, container: str, protocol: int = 2) -> Case:
    name = f"payload {kind} in {container}" + (f" (protocol {protocol})" if protocol != 2 else "")

    def build(tmp: Path) -> Path:
        return craft.payload_file(kind, container, tmp, protocol)

    if container == "pickle":
        return Case(name, build, UnsupportedFileError, "plain pickle", tags=("payload",))
    if kind == "torch.load":  # not on torch's allowlist: read as an inert stand-in, never called
        if container == "zip":
            return Case(name, build, UnsupportedFileError, "not a model", tags=("payload",))
        return Case(name, build, None, check=left_out("hparams"), tags=("payload",))
    return Case(name, build, UnsafeFileError, "never runs code", tags=("payload",))


PAYLOAD_CASES = [
    *(_payload_case(k, c) for k in craft.PAYLOADS for c in ("zip", "checkpoint", "legacy", "pickle")),
    _payload_case("os.system", "zip", protocol=4),
    _payload_case("getattr", "checkpoint", protocol=4),
    _payload_case("runpy", "pickle", protocol=4),
]


def _script_writes(tmp: Path) -> Path:
    return craft.script_file(tmp, craft.ScriptWrites(str(craft.marker(tmp))))


def _script_loops(tmp: Path) -> Path:
    return craft.script_file(tmp, craft.ScriptLoops())


def _script_forward_writes(tmp: Path) -> Path:
    return craft.script_file(tmp, craft.ScriptForwardWrites(str(craft.marker(tmp))))


CODE_CASES = [
    Case("TorchScript whose forward writes a file", _script_forward_writes, None, check=script_loaded),
    Case(
        "TorchScript whose __setstate__ writes a file",
        _script_writes,
        UnsupportedFileError,
        "__setstate__",
    ),
    Case(
        "TorchScript whose __setstate__ loops forever",
        _script_loops,
        UnsupportedFileError,
        "__setstate__",
    ),
    Case("full pickled model", craft.pickled_model_file, None, check=tinynet_loaded),
    Case("checkpoint holding argparse.Namespace", craft.namespace_checkpoint, None, check=left_out("args")),
    Case("checkpoint holding numpy arrays", craft.numpy_checkpoint, None, check=left_out("rng")),
    Case("legacy .tar archive (torch < 0.4)", craft.legacy_tar_file, UnsupportedFileError, r"\.tar.*re-save"),
]


def _bytes_file(name: str, data: bytes) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return build


def _non_torch_zip(tmp: Path) -> Path:
    return craft.write_zip(tmp / "notes.zip", [craft.stored("notes/readme.txt", b"not a model\n")])


def _truncated(fraction: float) -> Callable[[Path], Path]:
    return lambda tmp: craft.truncated_file(tmp, fraction)


NOT_A_MODEL_CASES = [
    Case("empty file", _bytes_file("empty.pt", b""), UnsupportedFileError, "empty"),
    Case("text file", _bytes_file("notes.pt", b"just some notes\n" * 64), UnsupportedFileError, "text file"),
    Case(
        "PNG image", _bytes_file("img.pt", b"\x89PNG\r\n\x1a\n" + craft.random_bytes(2000)), UnsupportedFileError, "PNG"
    ),
    Case("random bytes", _bytes_file("random.pt", craft.random_bytes(4096)), UnsupportedFileError, "not a model file"),
    Case("zip that is not a torch file", _non_torch_zip, UnsupportedFileError, "not a PyTorch file"),
    *(
        Case(f"zip truncated at {f:.1%}", _truncated(f), CorruptFileError, "damaged|truncated")
        for f in (0.1, 0.5, 0.9, 0.999)
    ),
]


def _view(size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> Callable[[Path], Path]:
    return lambda tmp: craft.crafted_tensor_file(tmp, size, stride, offset)


def _nested(value: object) -> Callable[[Path], Path]:
    return lambda tmp: craft.nested_checkpoint_file(tmp, value)


def _wide_dag_loaded(model: LoadedModel, tmp: Path) -> None:
    reference_loaded(model, tmp)
    node = model.extras["extra"]
    for _ in range(20):  # the shared references survive as shared objects
        assert len(node) == 10 and all(child is node[0] for child in node)
        node = node[0]
    assert node == [0]


TORCH_FILE_CASES = [
    Case("byte flipped inside tensor data", craft.flipped_byte_file, CorruptFileError, "CRC|damaged"),
    Case("storage claims 4 GB, record holds 64 bytes", craft.lying_storage_file, CorruptFileError, "declares"),
    Case("compressed tensor record (1 MB inflating to 1 GB)", craft.zip_bomb_file, UnsafeFileError, "compress"),
    Case("compressed data.pkl", craft.compressed_pickle_file, UnsafeFileError, "compress"),
    Case("zip entry claiming 2 GB in a tiny file", craft.oversized_entry_file, UnsafeFileError, "more bytes than"),
    Case("the same zip entry twice (a second data.pkl)", craft.duplicate_entry_file, UnsafeFileError, "twice"),
    Case("zip entry named ../../evil.py", craft.escaping_entry_file, UnsafeFileError, "outside its top folder"),
    Case("storage key ../../etc/passwd", craft.escaping_storage_key_file, CorruptFileError, "not a valid record key"),
    Case(
        "pickle asking for bytearray(2**40)",
        _nested(craft.Call(bytearray, 2**40)),
        UnsafeFileError,
        "memory bomb",
    ),
    Case("100,000 tiny tensors", craft.many_tensors_file, LimitExceededError, limit="PRUNEAPP_MAX_TENSORS"),
    Case("list nested 40 deep", _nested(craft.laughs(40, 1)), UnsafeFileError, "deep", limit="PRUNEAPP_MAX_DEPTH"),
    Case("list nested 100,000 deep (raw pickle)", lambda tmp: craft.deep_pickle_file(tmp, 100_000), UnsafeFileError),
    Case("billion laughs: 2**64 paths through the memo", _nested(craft.laughs(64, 2)), UnsafeFileError, "deep"),
    Case(
        "10**20 paths through shared references, depth 20", _nested(craft.laughs(20, 10)), None, check=_wide_dag_loaded
    ),
    Case(
        "stride-0 view of 10**12 elements",
        _view((10**12,), (0,)),
        LimitExceededError,
        limit="PRUNEAPP_MAX_TENSOR_ELEMENTS",
    ),
    Case("stride-0 view inflating 16 elements to 2**24", _view((2**24,), (0,)), UnsafeFileError, "stride-0"),
    Case("view larger than its storage", _view((1000,), (1,)), CorruptFileError, "past the end"),
    Case("view at an out-of-bound offset", _view((4,), (1,), offset=10**12), CorruptFileError, "past the end"),
    Case("view with a negative stride", _view((4,), (-1,), offset=3), CorruptFileError, "stride"),
    Case("shape whose element count overflows int64", _view((2**40, 2**40), (0, 0)), CorruptFileError, "overflow"),
    Case("sparse COO tensor with out-of-range indices", craft.sparse_coo_file, UnsupportedFileError, "sparse"),
    Case("pruneapp CSR file with out-of-range indices", craft.sparse_csr_output, CorruptFileError, "col_indices"),
]


def _safetensors(header: dict | bytes, data: bytes, declared: int | None = None) -> Callable[[Path], Path]:
    return lambda tmp: craft.safetensors_file(tmp, header, data, declared)


F32 = craft.f32
SAFETENSORS_CASES = [
    Case("safetensors offsets past the end", _safetensors({"w": F32((0, 4096), [1024])}, bytes(64)), CorruptFileError),
    Case(
        "safetensors overlapping entries",
        _safetensors({"a": F32((0, 32), [8]), "b": F32((16, 48), [8])}, bytes(48)),
        CorruptFileError,
        "offsets",
    ),
    Case(
        "safetensors header size 2**39 in a tiny file",
        _safetensors({"w": F32((0, 16), [4])}, bytes(16), declared=2**39),
        LimitExceededError,
        limit="PRUNEAPP_MAX_PICKLE_BYTES",
    ),
    Case(
        "safetensors header size past the end of the file",
        _safetensors({"w": F32((0, 16), [4])}, bytes(16), declared=10_000),
        CorruptFileError,
    ),
    Case(
        "safetensors with a million zero-size entries",
        _safetensors(craft.zero_size_entries_header(1_000_000), b""),
        LimitExceededError,
        limit="PRUNEAPP_MAX_TENSORS",
    ),
    Case(
        "safetensors offsets that do not match the shape",
        _safetensors({"w": F32((0, 16), [400])}, bytes(16)),
        CorruptFileError,
    ),
    Case(
        "safetensors unknown dtype",
        _safetensors({"w": {"dtype": "X9", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)),
        UnsupportedFileError,
        "dtype",
    ),
]


def _zst(make: Callable[[Path], bytes]) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        (tmp / "model.pt.zst").write_bytes(make(tmp))
        return tmp / "model.pt.zst"

    return build


def _zst_of_file(make: Callable[[Path], Path]) -> Callable[[Path], bytes]:
    return lambda tmp: craft.zstd_of(make(tmp).read_bytes())


def _reference_pt(tmp: Path) -> Path:
    torch.save(craft.reference_weights(), tmp / "inner.pt")
    return tmp / "inner.pt"


def _two_frames(tmp: Path) -> bytes:
    data = _reference_pt(tmp).read_bytes()
    return craft.zstd_of(data[:1000]) + craft.zstd_of(data[1000:])


def _zip_payload(tmp: Path) -> Path:
    return craft.payload_file("os.system", "zip", tmp)


# The decompressed file passes every check of the loader, but its tensor needs 384 MB: only the worker's memory
# limit stands between it and the machine's memory.
_ROOMY = dataclasses.replace(
    TEST_LIMITS,
    max_decompressed_bytes=512 * MiB,
    max_tensor_elements=128 * 1024**2,
    max_total_elements=128 * 1024**2,
    worker_memory_bytes=128 * MiB,
)
ZSTD_CASES = [
    Case(
        "zstd of a valid file whose tensor needs 384 MB",
        lambda tmp: craft.zstd_zero_tensor_file(tmp, 384 * MiB),
        LimitExceededError,
        "needed more than 134 MB of memory",
        limit="PRUNEAPP_WORKER_MEMORY_BYTES",
        limits=_ROOMY,
        worker_limit="memory",
    ),
    Case("zstd of a valid state_dict", _zst(_zst_of_file(_reference_pt)), None, check=reference_loaded),
    Case(
        "zstd bomb: declares and holds 1 GB",
        _zst(lambda tmp: craft.zstd_rle_frame(GiB, declared=GiB)),
        LimitExceededError,
        limit="PRUNEAPP_MAX_DECOMPRESSED_BYTES",
    ),
    Case(
        "zstd bomb: header declares 4 KB, frame holds 1 GB",
        _zst(lambda tmp: craft.zstd_rle_frame(GiB, declared=4096)),
        CorruptFileError,
    ),
    Case(
        "zstd bomb: no declared size, frame holds 1 GB",
        _zst(lambda tmp: craft.zstd_rle_frame(GiB, declared=None)),
        LimitExceededError,
        limit="PRUNEAPP_MAX_DECOMPRESSED_BYTES",
    ),
    Case("zstd in two frames", _zst(_two_frames), CorruptFileError, "second frame"),
    Case(
        "zstd with trailing garbage",
        _zst(lambda tmp: craft.zstd_of(_reference_pt(tmp).read_bytes()) + b"garbage"),
        CorruptFileError,
        "after its zstd frame",
    ),
    Case(
        "zstd truncated",
        _zst(lambda tmp: craft.zstd_of(_reference_pt(tmp).read_bytes())[:-20]),
        CorruptFileError,
        "truncated",
    ),
    Case("zstd around a malicious pickle", _zst(_zst_of_file(_zip_payload)), UnsafeFileError, "never runs code"),
]

CASES = [*PAYLOAD_CASES, *CODE_CASES, *NOT_A_MODEL_CASES, *TORCH_FILE_CASES, *SAFETENSORS_CASES, *ZSTD_CASES]


def assert_outcome(case: Case, result: LoadedModel | PruneAppError, tmp: Path, path: Path) -> None:
    """``result``: what loading ``path`` gave, the model or the error; no payload may have run either way."""
    assert not craft.marker(tmp).exists(), "the payload ran"
    if case.error is None:
        assert isinstance(result, LoadedModel), f"expected a load, got {result!r}"
        assert case.check is not None
        case.check(result, tmp)
        return
    assert isinstance(result, case.error), f"expected {case.error.__name__}, got {result!r}"
    message = str(result)
    assert re.search(case.match, message), message
    assert case.limit in message, f"the message should name {case.limit}: {message}"
    assert path.name in message and "\n" not in message


def params(cases: list[Case]) -> list[Any]:
    """One pytest param per case; a known loader gap is a strict xfail until it is fixed."""
    return [pytest.param(c, id=c.name, marks=_gap_marks(c)) for c in cases]


def _gap_marks(case: Case) -> list[Any]:
    return [pytest.mark.xfail(strict=True, reason=case.gap)] if case.gap else []
