"""Structural checks: torch zip layout and storage sizes, legacy data area, safetensors headers, loaded trees."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from pruneapp import checks
from pruneapp.errors import CorruptFileError, LimitExceededError, UnsafeFileError, UnsupportedFileError
from pruneapp.limits import Limits
from pruneapp.loading import load_model

LIMITS = Limits()


# ---------------------------------------------------------------------------------------------------------------
# Crafting torch zips: a pickler that writes tensors the way torch.save does, with any sizes we like


class FakeStorage:
    def __init__(self, key: str, numel: int, storage_type: type = torch.FloatStorage) -> None:
        self.key, self.numel, self.storage_type = key, numel, storage_type


class FakeTensor:
    def __init__(self, storage: FakeStorage, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> None:
        self.storage, self.size, self.stride, self.offset = storage, size, stride, offset

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        args = (self.storage, self.offset, self.size, self.stride, False, OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, FakeStorage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def write_zip(
    path: Path, obj: object, records: dict[str, bytes], compressed: tuple[str, ...] = (), extra: tuple[str, ...] = ()
) -> Path:
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(obj)
    entries = {"archive/data.pkl": buf.getvalue(), **{f"archive/data/{k}": v for k, v in records.items()}}
    entries.update({"archive/version": b"3\n", **{name: b"x" for name in extra}})
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            method = zipfile.ZIP_DEFLATED if name.removeprefix("archive/") in compressed else zipfile.ZIP_STORED
            zf.writestr(name, data, compress_type=method)
    return path


def floats(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def layout_of(path: Path, limits: Limits = LIMITS) -> checks.ZipLayout:
    with zipfile.ZipFile(path) as zf:
        return checks.check_zip(zf, path.stat().st_size, limits, path.name)


def test_crafted_zip_is_what_torch_load_reads(tmp_path: Path) -> None:
    path = write_zip(
        tmp_path / "ok.pt", {"w": FakeTensor(FakeStorage("0", 4), (2, 2), (2, 1))}, {"0": floats(1, 2, 3, 4)}
    )
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.tensor([[1.0, 2], [3, 4]]))
    assert torch.equal(load_model(path).weights["w"], torch.tensor([[1.0, 2], [3, 4]]))


# ---------------------------------------------------------------------------------------------------------------
# Zip structure


def test_real_torch_save_passes(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "m.pt")
    layout = layout_of(tmp_path / "m.pt")
    assert layout.prefix == "m" and not layout.torchscript and layout.pickle_name == "m/data.pkl"


@pytest.mark.parametrize("entry", ["data/0", "data.pkl"])
def test_compressed_data_entries_are_refused(tmp_path: Path, entry: str) -> None:
    # 1 MB of zeros deflates to ~1 kB: the shape of a zip bomb
    path = write_zip(tmp_path / "bomb.pt", {"w": FakeTensor(FakeStorage("0", 1 << 18), (1 << 18,), (1,))},
                     {"0": bytes(1 << 20)}, compressed=(entry,))  # fmt: skip
    assert entry == "data.pkl" or path.stat().st_size < 100_000
    with pytest.raises(UnsafeFileError, match="compressed"):
        layout_of(path)
    with pytest.raises(UnsafeFileError, match="bomb.pt: .*compressed"):
        load_model(path)


def test_compressed_torchscript_code_is_allowed(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "s.pt", {}, {}, extra=("archive/constants.pkl",))
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("archive/code/__torch__.py", "class M(Module):\n" * 100, compress_type=zipfile.ZIP_DEFLATED)
    assert layout_of(path).torchscript


def test_entries_outside_the_top_folder_are_refused(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "two.pt", {}, {}, extra=("other/data.pkl",))
    with pytest.raises(UnsafeFileError, match="outside its top folder"):
        layout_of(path)


def test_duplicate_entries_are_refused(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "dup.pt", {}, {"0": b"1234"})
    with zipfile.ZipFile(path, "a") as zf, pytest.warns(UserWarning, match="Duplicate name"):
        zf.writestr("archive/data/0", b"5678")
    with pytest.raises(UnsafeFileError, match="twice"):
        layout_of(path)


def test_zip_without_data_pkl_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "arrays.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.npy", b"\x93NUMPY")
    with pytest.raises(UnsupportedFileError, match="no data.pkl"):
        load_model(path)


def test_entry_count_and_pickle_size_are_capped(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "m.pt", {"w": FakeTensor(FakeStorage("0", 1), (1,), (1,))}, {"0": floats(1)})
    with pytest.raises(LimitExceededError, match="PRUNEAPP_MAX_ZIP_ENTRIES"):
        layout_of(path, Limits(max_zip_entries=1))
    with pytest.raises(LimitExceededError, match="PRUNEAPP_MAX_PICKLE_BYTES"):
        layout_of(path, Limits(max_pickle_bytes=10))


def test_entry_count_is_read_from_the_end_record_first(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "m.pt", {}, {}, extra=tuple(f"archive/x{i}" for i in range(10)))
    with open(path, "rb") as fh:
        checks.check_zip_directory(fh, LIMITS, "m.pt")
        with pytest.raises(LimitExceededError, match="too many zip entries"):
            checks.check_zip_directory(fh, Limits(max_zip_entries=5), "m.pt")
    path.write_bytes(path.read_bytes()[:-10])
    with open(path, "rb") as fh, pytest.raises(CorruptFileError, match="no end record"):
        checks.check_zip_directory(fh, LIMITS, "m.pt")


def test_big_endian_files_are_only_read_by_torch(tmp_path: Path) -> None:
    plain = write_zip(tmp_path / "be.pt", {"w": FakeTensor(FakeStorage("0", 1), (1,), (1,))}, {"0": floats(1)})
    with zipfile.ZipFile(plain, "a") as zf:
        zf.writestr("archive/byteorder", b"big")
    assert layout_of(plain).big_endian
    swapped = torch.frombuffer(bytearray(floats(1)[::-1]), dtype=torch.float32)
    assert torch.equal(load_model(plain).weights["w"], swapped)  # torch.load swaps the bytes
    args = FakeStorage("1", 1)
    foreign = write_zip(tmp_path / "be2.pt", {"w": FakeTensor(args, (1,), (1,)), "cfg": frozenset()}, {"1": floats(1)})
    with zipfile.ZipFile(foreign, "a") as zf:
        zf.writestr("archive/byteorder", b"big")
    with pytest.raises(UnsupportedFileError, match="big-endian"):
        load_model(foreign)


def test_entry_sizes_that_add_up_past_the_file_are_refused(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "m.pt", {"w": FakeTensor(FakeStorage("0", 1), (1,), (1,))}, {"0": floats(1)})
    with zipfile.ZipFile(path) as zf:
        with pytest.raises(UnsafeFileError, match="more bytes than the file holds"):
            checks.check_zip(zf, 50, LIMITS, "m.pt")


# ---------------------------------------------------------------------------------------------------------------
# Storage sizes against records


def test_storage_claiming_more_than_its_record_is_refused(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "liar.pt", {"w": FakeTensor(FakeStorage("0", 10**9), (2,), (1,))}, {"0": floats(1, 2)})
    with pytest.raises(CorruptFileError, match="declares 4000000000 bytes but its record holds 8"):
        load_model(path)


def test_storage_without_a_record_is_refused(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "gone.pt", {"w": FakeTensor(FakeStorage("7", 2), (2,), (1,))}, {"0": floats(1, 2)})
    with pytest.raises(CorruptFileError, match="missing"):
        load_model(path)


def test_view_past_its_storage_is_refused(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "big.pt", {"w": FakeTensor(FakeStorage("0", 2), (1000,), (1,))}, {"0": floats(1, 2)})
    with pytest.raises(CorruptFileError, match="reaches past the end of its storage"):
        load_model(path)


def test_out_of_bound_offset_is_refused(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "off.pt", {"w": FakeTensor(FakeStorage("0", 2), (2,), (1,), 5)}, {"0": floats(1, 2)})
    with pytest.raises(CorruptFileError, match="reaches past the end of its storage"):
        load_model(path)


def test_stride_zero_expansion_to_a_huge_size_is_refused(tmp_path: Path) -> None:
    path = write_zip(
        tmp_path / "s0.pt", {"w": FakeTensor(FakeStorage("0", 1), (10**5, 10**4), (0, 0))}, {"0": floats(1)}
    )
    with pytest.raises(UnsafeFileError, match="stride-0 expansion"):
        load_model(path)


def test_small_broadcast_view_loads(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "b.pt", {"w": FakeTensor(FakeStorage("0", 2), (3, 2), (0, 1))}, {"0": floats(1, 2)})
    assert torch.equal(load_model(path).weights["w"], torch.tensor([[1.0, 2]] * 3))


def test_flipped_byte_in_tensor_data_is_caught_by_the_crc(tmp_path: Path) -> None:
    path = tmp_path / "flip.pt"
    torch.save({"w": torch.randn(64, 64)}, path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("flip/data/0")
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="Bad CRC-32"):
        load_model(path)


# ---------------------------------------------------------------------------------------------------------------
# Legacy data area


def legacy(path: Path, obj: object) -> bytes:
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path.read_bytes()


def check_legacy_bytes(data: bytes) -> checks.LegacyLayout:
    return checks.check_legacy(io.BytesIO(data), len(data), LIMITS, "old.pt")


def test_legacy_layout_finds_each_storage(tmp_path: Path) -> None:
    data = legacy(tmp_path / "old.pt", {"a": torch.arange(5.0), "b": torch.ones(2, dtype=torch.int64)})
    layout = check_legacy_bytes(data)
    refs = layout.dry_run.refs
    stored = {data[start : start + refs[key].nbytes] for key, start in layout.offsets.items()}
    assert stored == {floats(0, 1, 2, 3, 4), struct.pack("<2q", 1, 1)}


def test_legacy_count_mismatch_and_trailing_bytes_are_refused(tmp_path: Path) -> None:
    data = legacy(tmp_path / "old.pt", {"a": torch.arange(5.0)})
    count = data.rindex(struct.pack("<q", 5))
    with pytest.raises(CorruptFileError, match="declares 5 elements but its data holds 6"):
        check_legacy_bytes(data[:count] + struct.pack("<q", 6) + data[count + 8 :])
    with pytest.raises(CorruptFileError, match="bytes after its last tensor"):
        check_legacy_bytes(data + b"\0")


@pytest.mark.parametrize("cut", [0.2, 0.5, 0.9, -1])
def test_truncated_legacy_files_are_refused(tmp_path: Path, cut: float) -> None:
    data = legacy(tmp_path / "old.pt", {"a": torch.arange(50.0), "b": torch.ones(3)})
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * cut)] if cut > 0 else data[:-1])
    with pytest.raises(CorruptFileError):
        load_model(path)


# ---------------------------------------------------------------------------------------------------------------
# safetensors headers


def safetensors_bytes(header: dict[str, object], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def check_st(blob: bytes, limits: Limits = LIMITS) -> checks.SafetensorsHeader:
    return checks.check_safetensors(io.BytesIO(blob), len(blob), limits, "m.safetensors")


def entry(offsets: list[int], shape: list[int] | None = None, dtype: str = "F32") -> dict[str, object]:
    return {"dtype": dtype, "shape": shape or [(offsets[1] - offsets[0]) // 4], "data_offsets": offsets}


def test_valid_safetensors_header_parses() -> None:
    header = {"__metadata__": {"format": "pt"}, "b": entry([8, 16]), "a": entry([0, 8]), "e": entry([16, 16], [0])}
    parsed = check_st(safetensors_bytes(header, bytes(16)))
    assert parsed.metadata == {"format": "pt"}
    assert parsed.entries["a"] == checks.SafetensorsEntry(torch.float32, (2,), 0, 8)


@pytest.mark.parametrize(
    "header, data, error, match",
    [
        ({"a": entry([0, 8])}, bytes(4), CorruptFileError, "covers 8 bytes of data but the file holds 4"),
        ({"a": entry([0, 8]), "b": entry([4, 12])}, bytes(12), CorruptFileError, "overlap"),
        ({"a": entry([0, 8]), "b": entry([12, 16])}, bytes(16), CorruptFileError, "gap"),
        ({"a": entry([0, 8], [3])}, bytes(8), CorruptFileError, "do not match its shape"),
        ({"a": entry([0, 8], dtype="F4")}, bytes(8), UnsupportedFileError, "dtype 'F4'"),
        ({"a": entry([0, 8], [-2])}, bytes(8), CorruptFileError, "malformed shape"),
        ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), CorruptFileError, "malformed"),
        ({"__metadata__": {"n": 1}, "a": entry([0, 8])}, bytes(8), CorruptFileError, "strings to strings"),
    ],
    ids=["past-end", "overlap", "gap", "shape", "dtype", "negative", "no-offsets", "metadata"],
)
def test_lying_safetensors_headers_are_refused(
    header: dict[str, object], data: bytes, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        check_st(safetensors_bytes(header, data))


def test_duplicate_safetensors_names_are_refused() -> None:
    one = '{"dtype": "F32", "shape": [1], "data_offsets": [%d, %d]}'
    raw = ('{"a": ' + one % (0, 4) + ', "a": ' + one % (4, 8) + "}").encode()
    with pytest.raises(CorruptFileError, match="twice"):
        check_st(struct.pack("<Q", len(raw)) + raw + bytes(8))


def test_safetensors_header_size_is_capped_before_reading() -> None:
    blob = struct.pack("<Q", 1 << 40) + b"{}"
    with pytest.raises(LimitExceededError, match="header size"):
        check_st(blob)
    with pytest.raises(CorruptFileError, match="claims 64 bytes"):
        check_st(struct.pack("<Q", 64) + b"{}")


def test_many_zero_size_entries_are_counted_before_parsing() -> None:
    header = {f"t{i}": entry([0, 0], [0]) for i in range(200)}
    with pytest.raises(LimitExceededError, match="PRUNEAPP_MAX_TENSORS"):
        check_st(safetensors_bytes(header, b""), Limits(max_tensors=100))


def test_safetensors_element_limits() -> None:
    header = {"a": entry([0, 40])}
    with pytest.raises(LimitExceededError, match="PRUNEAPP_MAX_TENSOR_ELEMENTS"):
        check_st(safetensors_bytes(header, bytes(40)), Limits(max_tensor_elements=5))
    with pytest.raises(LimitExceededError, match="PRUNEAPP_MAX_TOTAL_ELEMENTS"):
        check_st(safetensors_bytes(header, bytes(40)), Limits(max_total_elements=5))


# ---------------------------------------------------------------------------------------------------------------
# Loaded trees


def nested(depth: int) -> dict[str, object]:
    tree: dict[str, object] = {"w": torch.ones(1)}
    for _ in range(depth - 1):
        tree = {"n": tree}
    return tree


def test_depth_31_is_allowed_and_32_refused() -> None:
    assert checks.validate_tree(nested(31), LIMITS).depth == 31
    with pytest.raises(UnsafeFileError, match="more than 31 levels"):
        checks.validate_tree(nested(32), LIMITS)


def test_shared_reference_explosion_is_walked_once() -> None:
    node: list[object] = [torch.ones(1)]
    for _ in range(200):
        node = [node, node]  # 2**200 paths, 200 levels
    stats = checks.validate_tree(node, Limits(max_depth=1000))
    assert stats.depth == 201 and stats.tensors == 1
    with pytest.raises(UnsafeFileError, match="levels deep"):
        checks.validate_tree(node, LIMITS)


def test_reference_cycles_are_refused() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(UnsafeFileError, match="cycle"):
        checks.validate_tree({"a": loop}, LIMITS)


@pytest.mark.parametrize("value", [print, torch.FloatStorage, torch.ones(2).untyped_storage(), object()])
def test_objects_other_than_plain_values_are_refused(value: object) -> None:
    with pytest.raises((UnsafeFileError, UnsupportedFileError)):
        checks.validate_tree({"w": torch.ones(1), "x": value}, LIMITS)


def test_plain_values_pass() -> None:
    tree = {"w": torch.ones(2), "cfg": [1, 2.5, "x", None, True, b"b", (3, 4j)], "dt": torch.float16, "s": {1, 2}}
    stats = checks.validate_tree(tree, LIMITS)
    assert (stats.tensors, stats.elements, stats.depth) == (1, 2, 3)


def test_tensor_and_element_counts_are_limited() -> None:
    tree = {str(i): torch.ones(10) for i in range(5)}
    with pytest.raises(LimitExceededError, match="PRUNEAPP_MAX_TENSORS"):
        checks.validate_tree(tree, Limits(max_tensors=4))
    with pytest.raises(LimitExceededError, match="PRUNEAPP_MAX_TOTAL_ELEMENTS"):
        checks.validate_tree(tree, Limits(max_total_elements=49))
    with pytest.raises(LimitExceededError, match="PRUNEAPP_MAX_TENSOR_ELEMENTS"):
        checks.validate_tree(tree, Limits(max_tensor_elements=9))


def test_in_bounds_views_and_transposes_pass() -> None:
    base = torch.arange(100.0)
    tree = {"view": base[10:20], "t": base.view(10, 10).T, "step": base[::7], "expand": torch.ones(1).expand(1000)}
    assert checks.validate_tree(tree, LIMITS).tensors == 4


def test_meta_tensors_pass_only_in_a_dry_run() -> None:
    tree = {"w": torch.empty(3, device="meta")}
    assert checks.validate_tree(tree, LIMITS, meta=True).tensors == 1
    with pytest.raises(UnsupportedFileError, match="device meta"):
        checks.validate_tree(tree, LIMITS)
