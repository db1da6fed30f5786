"""The packed format: bit-exact round trips, encoding choices, sizes, and hostile files."""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import zstandard

from pruneapp import packed
from pruneapp.entropy import reference_bound_bytes, tensor_bound_bits
from pruneapp.errors import CorruptFileError, LimitExceededError, PruneAppError, SettingsError, UnsupportedFileError
from pruneapp.limits import Limits
from pruneapp.packed import EXTENSION, MAGIC, read_header, read_packed, write_packed

FOOTER = struct.Struct("<QQQI4s")  # version 1, as documented in docs/packed-format.md
FOOTER_V2 = struct.Struct("<III4s")  # version 2

DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
    torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2,
]  # fmt: skip


def sample(dtype: torch.dtype, shape: tuple[int, ...], zeros: float, seed: int = 0) -> torch.Tensor:
    """Random values of ``dtype`` with about ``zeros`` of them exactly zero (all bits clear)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    keep = torch.rand(shape, generator=g) >= zeros
    if dtype == torch.bool:
        return keep
    if dtype.is_complex:
        return (torch.complex(x, -x) * keep).to(dtype)
    if dtype.is_floating_point:
        return torch.where(keep, x, 0.0).to(dtype)
    big = (x.abs() * 1000).to(torch.int64) + 1
    return torch.where(keep, big, 0).to(torch.int64 if dtype in (torch.uint32, torch.uint64) else dtype).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(bits(a[name].contiguous()), bits(b[name])), name


def round_trip(tmp_path: Path, weights: dict[str, torch.Tensor], **kwargs: object) -> dict[str, torch.Tensor]:
    path = tmp_path / f"w{EXTENSION}"
    write_packed(weights, path, **kwargs)
    back = read_packed(path)
    assert_same(weights, back)
    return back


def encodings(path: Path) -> dict[str, str]:
    return {r["name"]: r["encoding"] for r in read_header(path)}


def dense_zstd_bytes(weights: dict[str, torch.Tensor], level: int = 3) -> int:
    buf = io.BytesIO()
    torch.save(weights, buf)
    return len(zstandard.ZstdCompressor(level=level).compress(buf.getvalue()))


def pruned_weights(sparsity: float, shape: tuple[int, int] = (256, 512)) -> torch.Tensor:
    """Heavy-tailed values (as trained weights are) with the smallest magnitudes set to +0.0."""
    w = torch.distributions.Laplace(0.0, 0.02).sample(shape)
    threshold = w.abs().flatten().kthvalue(int(w.numel() * sparsity)).values
    return torch.where(w.abs() > threshold, w, 0.0)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---- round trips ------------------------------------------------------------------------------------------


def test_constants_identify_the_format() -> None:
    assert len(MAGIC) >= 8 and MAGIC[:1] == b"\x89"
    assert EXTENSION.startswith(".") and EXTENSION not in (".pt", ".safetensors", ".zst")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("zeros", [0.0, 0.5, 0.97, 1.0])
def test_every_dtype_round_trips_bit_for_bit(tmp_path: Path, dtype: torch.dtype, zeros: float) -> None:
    round_trip(tmp_path, {"w": sample(dtype, (37, 41), zeros)})


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (7,), (2, 3, 4, 5), (70001,)], ids=str)
def test_every_shape_round_trips(tmp_path: Path, shape: tuple[int, ...]) -> None:
    round_trip(tmp_path, {"f": sample(torch.float32, shape, 0.6), "h": sample(torch.bfloat16, shape, 0.0)})


def test_negative_zero_nan_and_inf_keep_their_bits(tmp_path: Path) -> None:
    special = torch.tensor([-0.0, 0.0, float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 0.0])
    payload_nan = torch.tensor([0x7FC00001, -0x00400001], dtype=torch.int32).view(torch.float32)
    back = round_trip(tmp_path, {"s": special, "nan": payload_nan, "negz": torch.full((500,), -0.0)})
    assert torch.signbit(back["negz"]).all()
    assert back["s"][0].item() == 0.0 and torch.signbit(back["s"][0])


def test_all_zero_and_no_zero_tensors(tmp_path: Path) -> None:
    weights = {
        "zero": torch.zeros(300, 20),
        "full": torch.randn(300, 20) + 10.0,
        "zero16": torch.zeros(9, dtype=torch.half),
    }
    round_trip(tmp_path, weights)
    found = encodings(tmp_path / f"w{EXTENSION}")
    assert found["full"] == "dense"
    assert found["zero"] in ("mask", "gaps")


def test_tied_keys_are_stored_once_and_read_back_as_one_object(tmp_path: Path) -> None:
    shared = pruned_weights(0.8)
    same_view = shared.view(shared.shape)  # another object, same storage, shape and strides
    weights = {"embed.weight": shared, "lm_head.weight": shared, "copy": same_view, "bias": torch.randn(4)}
    back = round_trip(tmp_path, weights)
    assert back["lm_head.weight"] is back["embed.weight"] and back["copy"] is back["embed.weight"]
    records = {r["name"]: r for r in read_header(tmp_path / f"w{EXTENSION}")}
    assert records["lm_head.weight"] == {"name": "lm_head.weight", "encoding": "alias", "of": "embed.weight"}
    assert records["copy"]["encoding"] == "alias"
    alone = tmp_path / "alone.pruneapp"
    write_packed({"embed.weight": shared, "bias": weights["bias"]}, alone)
    assert (tmp_path / f"w{EXTENSION}").stat().st_size < alone.stat().st_size + 200


def test_overlapping_but_different_views_are_stored_separately(tmp_path: Path) -> None:
    base = torch.randn(10, 10)
    back = round_trip(tmp_path, {"all": base, "row": base[3], "col": base[:, 2], "t": base.t()})
    assert back["row"] is not back["all"]


def test_module_parameters_and_non_contiguous_inputs(tmp_path: Path) -> None:
    layer = torch.nn.Linear(64, 32)
    weights = {"weight": layer.weight, "bias": layer.bias, "transposed": layer.weight.detach().t()}
    round_trip(tmp_path, weights)


def test_threads_levels_and_multithreaded_zstd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = {"w": pruned_weights(0.6), "b": torch.randn(100)}
    round_trip(tmp_path, weights, threads=0)
    round_trip(tmp_path, weights, level=19, threads=1)
    monkeypatch.setattr(packed, "_MT_BYTES", 1024)  # route every stream through zstd's worker threads
    round_trip(tmp_path, weights, threads=-1)


READ_PATHS = {  # module settings that route reading through each of its code paths
    "defaults": {},
    "many small chunks": {"_CHUNK": 16},
    "threads": {"_CHUNK": 16, "_PARALLEL_BYTES": 0, "_WORKERS": 2},
    "one read per tensor, shifts everywhere": {"_BATCH_BYTES": 0, "_SHIFT_BYTES": 0},
    "no shifts": {"_SHIFT_BYTES": 1 << 40},
}


@pytest.mark.parametrize("settings", READ_PATHS.values(), ids=list(READ_PATHS))
def test_every_read_path_decodes_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: dict) -> None:
    weights = {
        "mask": pruned_weights(0.5, (33, 35)),
        "gaps": pruned_weights(0.97, (33, 35)),
        "dense": torch.randn(1001),
        "wide": sample(torch.complex128, (300,), 0.5),
        "half": sample(torch.float16, (40, 40), 0.6),
        "bytes": sample(torch.int8, (500,), 0.97),
        "long": sample(torch.int64, (700,), 0.0),
    }
    path = tmp_path / f"w{EXTENSION}"
    write_packed(weights, path)
    for name, value in settings.items():
        monkeypatch.setattr(packed, name, value)
    assert_same(weights, read_packed(path))
    assert set(encodings(path).values()) == {"mask", "gaps", "dense"}


def test_streams_need_not_lie_back_to_back(good_file: Path) -> None:
    """Streams in another order with bytes between them (as another writer might lay them out) read the same."""
    head, header = split(good_file)
    body = bytearray(head[: len(MAGIC) + 4])
    offsets = []
    for r in reversed(header["tensors"]):
        for s in r.get("streams", []):
            body += b"\xee" * 7
            offsets.append(len(body))
            body += head[s["offset"] : s["offset"] + s["length"]]

    def move(h: dict) -> None:
        streams = [s for r in reversed(h["tensors"]) for s in r.get("streams", [])]
        for s, offset in zip(streams, offsets, strict=True):
            s["offset"] = offset

    assert_same(read_packed(good_file), read_packed(rewrite(good_file, move, body=lambda _: bytes(body))))


def test_progress_reports_each_tensor_and_the_end(tmp_path: Path) -> None:
    calls: list[tuple[str, float]] = []
    write_packed(
        {"a": torch.ones(3), "b": torch.zeros(3)}, tmp_path / "p.pruneapp", progress=lambda m, f: calls.append((m, f))
    )
    assert [f for _, f in calls] == [0.0, 0.5, 1.0]
    assert "a" in calls[0][0]


# ---- encoding choices and sizes ---------------------------------------------------------------------------


def test_position_encoding_follows_sparsity(tmp_path: Path) -> None:
    weights = {f"s{s}": pruned_weights(s) for s in (0.3, 0.5, 0.7, 0.95, 0.99)} | {"unpruned": torch.randn(256, 512)}
    round_trip(tmp_path, weights)
    found = encodings(tmp_path / f"w{EXTENSION}")
    assert found["s0.3"] == found["s0.5"] == "mask"
    assert found["s0.95"] == found["s0.99"] == "gaps"
    assert found["unpruned"] == "dense"


def test_gap_widths_above_one_byte(tmp_path: Path) -> None:
    sparse = torch.zeros(300_000)
    sparse[[5, 700, 70_000, 299_999]] = torch.tensor([1.0, -2.0, 3.0, 4.0])
    round_trip(tmp_path, {"w": sparse})
    (record,) = read_header(tmp_path / f"w{EXTENSION}")
    assert record["encoding"] == "gaps" and record["width"] == 4


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_packed_beats_dense_zstd_and_nears_the_bound(tmp_path: Path, sparsity: float) -> None:
    weights = {"fc.weight": pruned_weights(sparsity), "fc.bias": torch.randn(256) * 0.02}
    path = tmp_path / f"w{EXTENSION}"
    write_packed(weights, path)
    size = path.stat().st_size
    bound = reference_bound_bytes(weights, ["fc.weight"])
    assert size < 0.85 * dense_zstd_bytes(weights)
    assert size < 1.03 * bound


def test_low_entropy_planes_are_symbol_packed(tmp_path: Path) -> None:
    weights = {"small_ints": torch.randint(-3, 4, (5000,), dtype=torch.int64), "flags": torch.rand(5000) > 0.5}
    round_trip(tmp_path, weights)
    path = tmp_path / f"w{EXTENSION}"
    records = {r["name"]: r for r in read_header(path)}
    flag_values = records["flags"]["streams"][-1]  # every kept bool is 01: one symbol, nothing stored
    assert flag_values["symbols"] == [1] and flag_values["length"] == 0
    sign_planes = records["small_ints"]["streams"][-7:]  # bytes 1..7 of int64 values in [-3, 3]: 00 or FF
    assert all(
        len(s["symbols"]) == 2 and s["length"] <= math.ceil(records["small_ints"]["kept"] / 8) for s in sign_planes
    )


# ---- writing errors ---------------------------------------------------------------------------------------


def test_write_rejects_what_it_cannot_store(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFileError, match="not a tensor"):
        write_packed({"x": [1, 2]}, tmp_path / "a.pruneapp")  # type: ignore[dict-item]
    with pytest.raises(UnsupportedFileError, match="to_dense"):
        write_packed({"x": torch.eye(3).to_sparse()}, tmp_path / "b.pruneapp")
    with pytest.raises(UnsupportedFileError, match="not a string"):
        write_packed({1: torch.ones(2)}, tmp_path / "d.pruneapp")  # type: ignore[dict-item]
    with pytest.raises(UnsupportedFileError, match="meta device"):
        write_packed({"x": torch.empty(3, device="meta")}, tmp_path / "e.pruneapp")
    with pytest.raises(SettingsError, match="level"):
        write_packed({"x": torch.ones(2)}, tmp_path / "c.pruneapp", level=40)


# ---- reference bound --------------------------------------------------------------------------------------


def test_reference_bound_matches_a_hand_computation() -> None:
    # 8 elements, 3 kept -> mask 8 * H2(3/8) bits; kept 1.0, -1.0, 2.0 = 3F800000, BF800000, 40000000:
    # bytes 0 and 1 are always 00 (0 bits), byte 2 is 80, 80, 00 (H(2/3, 1/3)), byte 3 is 3F, BF, 40 (log2 3 each)
    pruned = torch.tensor([0.0, 0.0, 1.0, -1.0, 2.0, 0.0, 0.0, 0.0])
    h2 = -(3 / 8 * math.log2(3 / 8) + 5 / 8 * math.log2(5 / 8))
    h_byte2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expected_bits = 8 * h2 + 3 * h_byte2 + 3 * math.log2(3)
    assert tensor_bound_bits(pruned, pruned=True) == pytest.approx(expected_bits)
    unpruned = torch.zeros(40, dtype=torch.float16)  # raw: 80 bytes, zeros or not
    weights = {"p": pruned, "tied": pruned, "u": unpruned}
    assert reference_bound_bytes(weights, ["p", "tied"]) == round(expected_bits / 8 + 80)


def test_reference_bound_counts_negative_zero_as_kept() -> None:
    t = torch.tensor([-0.0, 0.0, -0.0, 0.0])  # 2 kept, all planes constant: mask only, 4 bits
    assert tensor_bound_bits(t, pruned=True) == pytest.approx(4.0)


# ---- hostile files ----------------------------------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / f"good{EXTENSION}"
    weights = {"mask": pruned_weights(0.6, (64, 64)), "gaps": pruned_weights(0.97, (64, 64)), "dense": torch.randn(300)}
    write_packed(weights | {"tied": weights["mask"]}, path)
    return path


def split(path: Path) -> tuple[bytes, dict]:
    """The bytes before the header, as a version-1 file, and the header in its documented version-1 form."""
    data = path.read_bytes()
    assert struct.unpack_from("<I", data, len(MAGIC))[0] == packed.FORMAT_VERSION == 2
    length = FOOTER_V2.unpack(data[-FOOTER_V2.size :])[0]
    head = data[: len(MAGIC)] + struct.pack("<I", 1) + data[len(MAGIC) + 4 : -FOOTER_V2.size - length]
    return head, {"format": "pruneapp-packed", "version": 1, "tensors": read_header(path)}


def rewrite(path: Path, change: Callable[[dict], object], body: Callable[[bytes], bytes] = lambda b: b) -> Path:
    """Write a copy of ``path`` whose header was edited by ``change`` (with a valid footer and header checksum)."""
    head, header = split(path)
    change(header)
    raw = json.dumps(header).encode()
    blob = zstandard.ZstdCompressor().compress(raw)
    head = body(head)
    out = path.with_name("crafted" + EXTENSION)
    out.write_bytes(head + blob + FOOTER.pack(len(head), len(blob), len(raw), zlib.crc32(blob), b"PKND"))
    return out


def tensor(header: dict, name: str) -> dict:
    return next(r for r in header["tensors"] if r["name"] == name)


def assert_one_line(error: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(error.value) and str(error.value)


def test_the_crafting_helper_writes_readable_files(good_file: Path) -> None:
    assert_same(read_packed(good_file), read_packed(rewrite(good_file, lambda h: None)))


def v2_records(path: Path) -> list:
    """The compact version-2 header of a file this writer made, as JSON."""
    data = path.read_bytes()
    length = FOOTER_V2.unpack(data[-FOOTER_V2.size :])[0]
    return json.loads(zstandard.ZstdDecompressor().decompress(data[-FOOTER_V2.size - length : -FOOTER_V2.size]))


def rewrite_v2(path: Path, change: Callable[[list], object]) -> Path:
    """A copy of ``path`` whose version-2 header was edited, or replaced, by ``change`` (with a valid footer and
    checksum)."""
    data = path.read_bytes()
    records = v2_records(path)
    replaced = change(records)
    raw = json.dumps(records if replaced is None else replaced).encode()
    blob = zstandard.ZstdCompressor().compress(raw)
    body = data[: -FOOTER_V2.size - FOOTER_V2.unpack(data[-FOOTER_V2.size :])[0]]
    out = path.with_name("crafted2" + EXTENSION)
    out.write_bytes(body + blob + FOOTER_V2.pack(len(blob), len(raw), zlib.crc32(blob), b"PKND"))
    return out


def test_version_1_and_2_files_read_the_same_and_2_is_smaller(good_file: Path) -> None:
    v1 = rewrite(good_file, lambda h: None)
    assert v1.read_bytes()[len(MAGIC)] == 1 and good_file.read_bytes()[len(MAGIC)] == 2
    assert_same(read_packed(good_file), read_packed(v1))
    assert read_header(good_file) == read_header(v1)
    assert good_file.stat().st_size < v1.stat().st_size
    assert_same(read_packed(good_file), read_packed(rewrite_v2(good_file, lambda r: None)))


def record(records: list, name: str) -> list:
    return next(r for r in records if r[0] == name)


V2_CORRUPTIONS: dict[str, Callable[[list], object]] = {
    "not a list": lambda r: {"tensors": r},
    "record not a list": lambda r: r.append({"name": "x"}),
    "unknown encoding": lambda r: record(r, "mask").__setitem__(1, "rle"),
    "encoding not a string": lambda r: record(r, "mask").__setitem__(1, ["mask"]),
    "name not a string": lambda r: record(r, "dense").__setitem__(0, 7),
    "missing field": lambda r: record(r, "gaps").pop(),
    "extra field": lambda r: record(r, "dense").append(1),
    "alias to nothing": lambda r: record(r, "tied").__setitem__(2, "nope"),
    "streams not a list": lambda r: record(r, "dense").__setitem__(5, 3),
    "stream not a list": lambda r: record(r, "dense")[5].__setitem__(0, 4),
    "negative stream length": lambda r: record(r, "dense")[5][0].__setitem__(0, -1),
    "bool stream length": lambda r: record(r, "dense")[5][0].__setitem__(0, True),
    "stream past the data": lambda r: record(r, "dense")[5][0].__setitem__(0, 10**9),
    "stream without codec": lambda r: record(r, "dense")[5][0].pop(),
    "bad codec": lambda r: record(r, "dense")[5][0].__setitem__(1, "lz4"),
    "bad checksum": lambda r: record(r, "dense").__setitem__(4, -1),
    "kept beyond the tensor": lambda r: record(r, "mask").__setitem__(6, 10**9),
    "bad gap width": lambda r: record(r, "gaps").__setitem__(7, 3),
    "bad shape": lambda r: record(r, "dense").__setitem__(3, [-300]),
}


@pytest.mark.parametrize("change", V2_CORRUPTIONS.values(), ids=V2_CORRUPTIONS.keys())
def test_crafted_version_2_headers_are_refused(good_file: Path, change: Callable[[list], object]) -> None:
    with pytest.raises(CorruptFileError) as error:
        read_packed(rewrite_v2(good_file, change))
    assert_one_line(error)


def test_version_2_footer_must_frame_the_header(good_file: Path, tmp_path: Path) -> None:
    data = good_file.read_bytes()
    length, raw, crc, mark = FOOTER_V2.unpack(data[-FOOTER_V2.size :])
    for footer in (FOOTER_V2.pack(len(data), raw, crc, mark), FOOTER_V2.pack(length, raw, crc ^ 1, mark)):
        crafted = tmp_path / "f.pruneapp"
        crafted.write_bytes(data[: -FOOTER_V2.size] + footer)
        with pytest.raises(CorruptFileError):
            read_packed(crafted)


@pytest.mark.parametrize("data", [b"", b"\x89PRUNE", b"PK\x03\x04" + bytes(100), bytes(4096), MAGIC[:-1] + b"x" * 64])
def test_not_a_packed_file(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.pruneapp"
    path.write_bytes(data)
    with pytest.raises(UnsupportedFileError, match="not a pruneapp packed file") as error:
        read_packed(path)
    assert_one_line(error)


def test_newer_version_is_refused(good_file: Path) -> None:
    data = bytearray(good_file.read_bytes())
    data[len(MAGIC)] = 3
    good_file.write_bytes(bytes(data))
    with pytest.raises(UnsupportedFileError, match="version 3"):
        read_packed(good_file)


def test_truncated_anywhere(good_file: Path) -> None:
    data = good_file.read_bytes()
    for cut in sorted({13, 16, 40, len(data) // 3, len(data) // 2, len(data) - FOOTER.size - 5, len(data) - 1}):
        good_file.write_bytes(data[:cut])
        with pytest.raises(PruneAppError) as error:
            read_packed(good_file)
        assert_one_line(error)


def test_flipped_byte_in_a_raw_stream_fails_the_checksum(good_file: Path) -> None:
    _, header = split(good_file)
    stream = tensor(header, "dense")["streams"][0]  # byte 0 of random floats: stored raw
    assert stream["codec"] == "raw" and "symbols" not in stream
    data = bytearray(good_file.read_bytes())
    data[stream["offset"] + stream["length"] // 2] ^= 0x10
    good_file.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="checksum") as error:
        read_packed(good_file)
    assert_one_line(error)


def test_flipped_bytes_anywhere_never_pass_silently(good_file: Path) -> None:
    data = good_file.read_bytes()
    reference = read_packed(good_file)
    for at in range(len(MAGIC) + 4, len(data), max(1, len(data) // 97)):
        corrupt = bytearray(data)
        corrupt[at] ^= 0xFF
        good_file.write_bytes(bytes(corrupt))
        try:
            back = read_packed(good_file)
        except PruneAppError as error:
            assert "\n" not in str(error)
            continue
        assert_same(reference, back)  # a flip that goes unnoticed must have changed no value


def test_flipped_header_byte_fails_the_header_checksum(good_file: Path) -> None:
    data = bytearray(good_file.read_bytes())
    data[-FOOTER.size - 3] ^= 1
    good_file.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="header checksum"):
        read_packed(good_file)


LIES: dict[str, Callable[[dict], object]] = {
    "offset past the data": lambda h: tensor(h, "dense")["streams"][0].update(offset=10**9),
    "negative offset": lambda h: tensor(h, "dense")["streams"][0].update(offset=-5),
    "offset inside the prefix": lambda h: tensor(h, "dense")["streams"][0].update(offset=2),
    "overlapping streams": lambda h: tensor(h, "dense")["streams"][1].update(
        offset=tensor(h, "dense")["streams"][0]["offset"]
    ),
    "raw length mismatch": lambda h: tensor(h, "dense")["streams"][0].update(length=5),
    "too many streams": lambda h: tensor(h, "mask")["streams"].append(tensor(h, "mask")["streams"][0]),
    "no streams": lambda h: tensor(h, "mask").pop("streams"),
    "unknown codec": lambda h: tensor(h, "mask")["streams"][0].update(codec="lz4"),
    "unknown encoding": lambda h: tensor(h, "mask").update(encoding="rle"),
    "kept above numel": lambda h: tensor(h, "mask").update(kept=10**7),
    "kept is a bool": lambda h: tensor(h, "mask").update(kept=True),
    "kept is a float": lambda h: tensor(h, "mask").update(kept=12.5),
    "wrong kept count": lambda h: tensor(h, "mask").update(kept=tensor(h, "mask")["kept"] - 1),
    "wrong gap kept count": lambda h: tensor(h, "gaps").update(kept=tensor(h, "gaps")["kept"] - 1),
    "bad gap width": lambda h: tensor(h, "gaps").update(width=3),
    "shape of strings": lambda h: tensor(h, "dense").update(shape=["300"]),
    "negative dim": lambda h: tensor(h, "dense").update(shape=[-300]),
    "too many dims": lambda h: tensor(h, "dense").update(shape=[1] * 65),
    "shape disagrees with streams": lambda h: tensor(h, "dense").update(shape=[301]),
    "bad checksum field": lambda h: tensor(h, "dense").update(crc32="abc"),
    "no checksum": lambda h: tensor(h, "dense").pop("crc32"),
    "checksum too big": lambda h: tensor(h, "dense").update(crc32=2**32),
    "wrong checksum": lambda h: tensor(h, "dense").update(crc32=tensor(h, "dense")["crc32"] ^ 1),
    "streams swapped": lambda h: tensor(h, "dense")["streams"].reverse(),
    "duplicate name": lambda h: tensor(h, "gaps").update(name="mask"),
    "alias to nothing": lambda h: tensor(h, "tied").update(of="missing"),
    "alias to a later tensor": lambda h: h["tensors"].insert(0, h["tensors"].pop()),
    "bad symbols": lambda h: next(s for r in h["tensors"] for s in r.get("streams", []) if "symbols" in s).update(
        symbols=[1, 1]
    ),
    "symbol out of range": lambda h: next(
        s for r in h["tensors"] for s in r.get("streams", []) if "symbols" in s
    ).update(symbols=[300]),
    "name not a string": lambda h: tensor(h, "dense").update(name=7),
    "record not an object": lambda h: h["tensors"].append([1, 2]),
    "tensors not a list": lambda h: h.update(tensors={"a": 1}),
    "no version": lambda h: h.pop("version"),
}


@pytest.mark.parametrize("lie", LIES, ids=list(LIES))
def test_lying_headers_are_caught(good_file: Path, lie: str) -> None:
    with pytest.raises(PruneAppError) as error:
        read_packed(rewrite(good_file, LIES[lie]))
    assert isinstance(error.value, CorruptFileError | UnsupportedFileError)
    assert_one_line(error)


def test_unknown_dtype_is_unsupported(good_file: Path) -> None:
    with pytest.raises(UnsupportedFileError, match="unknown dtype 'float128'"):
        read_packed(rewrite(good_file, lambda h: tensor(h, "dense").update(dtype="float128")))


@pytest.mark.parametrize(
    ("change", "limits", "match"),
    [
        (lambda h: tensor(h, "dense").update(shape=[2**40]), Limits(), "max_tensor_elements"),
        (lambda h: tensor(h, "dense").update(shape=[2**64, 2**64]), Limits(), "max_tensor_elements"),
        (lambda h: None, Limits(max_total_elements=5000), "max_total_elements"),
        (lambda h: None, Limits(max_tensors=3), "max_tensors"),
        (lambda h: None, Limits(max_pickle_bytes=100), "max_pickle_bytes"),
        (lambda h: None, Limits(max_file_bytes=1000), "max_file_bytes"),
        (lambda h: None, Limits(max_decompressed_bytes=10_000), "max_decompressed_bytes"),
    ],
)
def test_limits_are_enforced(good_file: Path, change: Callable[[dict], object], limits: Limits, match: str) -> None:
    with pytest.raises(PruneAppError, match=match) as error:
        read_packed(rewrite(good_file, change), limits)
    assert isinstance(error.value, LimitExceededError | CorruptFileError)
    assert_one_line(error)


def test_header_that_is_not_json_or_too_deep(good_file: Path, tmp_path: Path) -> None:
    head, _ = split(good_file)
    for raw in (b"\xff\xfe not json", b"[" * 100_000 + b"]" * 100_000, b"null"):
        blob = zstandard.ZstdCompressor().compress(raw)
        crafted = tmp_path / "h.pruneapp"
        crafted.write_bytes(head + blob + FOOTER.pack(len(head), len(blob), len(raw), zlib.crc32(blob), b"PKND"))
        with pytest.raises(CorruptFileError):
            read_packed(crafted)


def test_zstd_frame_declaring_a_huge_size_is_refused_before_allocating(good_file: Path, tmp_path: Path) -> None:
    head, header = split(good_file)
    huge = zstandard.ZstdCompressor().compressobj(size=2**40)
    claim = huge.compress(b"\0" * 1000) + huge.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    assert zstandard.frame_content_size(claim) == 2**40
    stream = tensor(header, "dense")["streams"][-1]
    stream.update(codec="zstd", length=len(claim), offset=len(head))
    stream.pop("symbols", None)
    raw = json.dumps(header).encode()
    blob = zstandard.ZstdCompressor().compress(raw)
    body = head + claim
    crafted = tmp_path / "bomb.pruneapp"
    crafted.write_bytes(body + blob + FOOTER.pack(len(body), len(blob), len(raw), zlib.crc32(blob), b"PKND"))
    with pytest.raises(CorruptFileError, match="declares"):
        read_packed(crafted)


def test_zstd_stream_of_the_wrong_size_is_refused(good_file: Path, tmp_path: Path) -> None:
    head, header = split(good_file)
    for size in (10, 10**6):
        frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"\1" * size)
        stream = tensor(header, "dense")["streams"][0]
        stream.update(codec="zstd", length=len(frame), offset=len(head))
        raw = json.dumps(header).encode()
        blob = zstandard.ZstdCompressor().compress(raw)
        crafted = tmp_path / "size.pruneapp"
        body = head + frame
        crafted.write_bytes(body + blob + FOOTER.pack(len(body), len(blob), len(raw), zlib.crc32(blob), b"PKND"))
        with pytest.raises(CorruptFileError, match="expected"):
            read_packed(crafted)


def mask_stream_crcs(t: torch.Tensor, mask_bytes: bytes) -> int:
    """The documented tensor checksum of a mask-encoded float32 tensor whose mask stream is ``mask_bytes``."""
    rows = t.reshape(-1).view(torch.uint8).view(-1, 4)
    kept = rows[t.reshape(-1).view(torch.int32) != 0]
    crcs = [zlib.crc32(mask_bytes)] + [zlib.crc32(kept[:, i].contiguous().numpy()) for i in range(4)]
    return zlib.crc32(struct.pack(f"<{len(crcs)}I", *crcs))


def replace_mask(path: Path, name: str, t: torch.Tensor, payload: bytes) -> Path:
    """A copy of ``path`` whose mask stream of tensor ``name`` (holding ``t``) is ``payload``, stored raw."""
    head, _ = split(path)

    def change(h: dict) -> None:
        tensor(h, name)["streams"][0] = {"offset": len(head), "length": len(payload), "codec": "raw"}
        tensor(h, name)["crc32"] = mask_stream_crcs(t, payload)

    return rewrite(path, change, body=lambda b: b + payload)


def test_the_documented_checksum_is_the_one_written(tmp_path: Path) -> None:
    t = torch.tensor([0.0, 1.0] * 500)
    path = tmp_path / "m.pruneapp"
    write_packed({"w": t}, path)
    (record,) = read_header(path)
    assert record["encoding"] == "mask"
    assert record["crc32"] == mask_stream_crcs(t, bytes([0xAA]) * 125)


@pytest.mark.parametrize("chunk", [packed._CHUNK, 64], ids=["one chunk", "many chunks"])
def test_mask_with_the_wrong_population_is_refused(
    good_file: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    crafted = replace_mask(good_file, "mask", read_packed(good_file)["mask"], b"\xff" * (64 * 64 // 8))
    monkeypatch.setattr(packed, "_CHUNK", chunk)
    with pytest.raises(CorruptFileError, match="wrong number of kept values"):
        read_packed(crafted)


def test_mask_padding_bits_must_be_clear(tmp_path: Path) -> None:
    path = tmp_path / "m.pruneapp"
    write_packed({"w": torch.tensor([0.0, 1.0] * 6)}, path)  # 12 elements, 6 kept: the last 4 mask bits are padding
    (record,) = read_header(path)
    assert record["encoding"] == "mask"
    t = torch.tensor([0.0, 1.0] * 6)
    assert_same(read_packed(replace_mask(path, "w", t, bytes([0xAA, 0x0A]))), {"w": t})
    with pytest.raises(CorruptFileError, match="wrong number of kept values"):
        read_packed(replace_mask(path, "w", t, bytes([0xAA, 0x12])))


def test_positions_past_the_end_are_refused(tmp_path: Path) -> None:
    sparse = torch.zeros(1000)
    sparse[[3, 900]] = 1.0
    path = tmp_path / "g.pruneapp"
    write_packed({"w": sparse}, path)
    assert read_header(path)[0]["encoding"] == "gaps"
    with pytest.raises(CorruptFileError, match="beyond its end"):
        read_packed(rewrite(path, lambda h: tensor(h, "w").update(shape=[500])))


def test_bool_bytes_other_than_zero_and_one_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "b.pruneapp"
    write_packed({"flags": torch.ones(10, dtype=torch.uint8)}, path)
    crafted = rewrite(path, lambda h: tensor(h, "flags").update(dtype="bool"))
    assert read_packed(crafted)["flags"].all()
    write_packed({"flags": torch.full((10,), 2, dtype=torch.uint8)}, path)
    with pytest.raises(CorruptFileError, match="bool"):
        read_packed(rewrite(path, lambda h: tensor(h, "flags").update(dtype="bool")))
