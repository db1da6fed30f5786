"""Output formats: names, atomic writes, exact round trips for every format, plain-torch readability, hostile reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import zstandard
from safetensors import safe_open
from safetensors.torch import save_file

from pruneapp import formats, packed
from pruneapp.errors import (
    CorruptFileError,
    LimitExceededError,
    OutputExistsError,
    SettingsError,
    UnsupportedFileError,
)
from pruneapp.formats import FORMATS, load_snippet, output_name, parse_formats, read_weights, write_outputs
from pruneapp.limits import Limits
from pruneapp.loading import LoadedModel, load_model

PRUNED = ["fc.weight", "conv.weight", "half.weight", "brain.weight", "embed.weight", "vec", "busy.weight", "view"]


def _sparse(shape: tuple[int, ...], dtype: torch.dtype, keep: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    return torch.where(torch.rand(shape, generator=g) < keep, t, torch.zeros(())).to(dtype)


def pruned_weights() -> dict[str, torch.Tensor]:
    """A pruned state_dict with every case a format must keep: dtypes, ranks, ties, views, -0.0, empties."""
    fc = _sparse((8, 16), torch.float32, 0.1, 1)
    fc[0, :3] = torch.tensor([-0.0, 1.5, -2.0])  # a surviving -0.0 must stay -0.0
    embed = _sparse((50, 16), torch.float32, 0.1, 2)
    big = _sparse((64, 32), torch.float32, 0.1, 3)
    return {
        "fc.weight": fc,
        "fc.bias": torch.randn(8),
        "conv.weight": _sparse((4, 3, 3, 3), torch.float32, 0.1, 4),
        "half.weight": _sparse((16, 8), torch.float16, 0.1, 5),
        "brain.weight": _sparse((16, 8), torch.bfloat16, 0.1, 6),
        "embed.weight": embed,
        "head.weight": embed,  # tied: the very same tensor object
        "vec": _sparse((40,), torch.float32, 0.05, 7),
        "busy.weight": _sparse((8, 8), torch.float32, 0.9, 8),  # CSR would be larger than dense
        "view": big[2:4],  # a view into a 64x larger storage
        "bn.num_batches_tracked": torch.tensor(7),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }


def saved(weights: dict[str, torch.Tensor], path: Path, structure: str = "state_dict", **extras: object) -> LoadedModel:
    """``weights`` written to a real file in ``structure`` and loaded back the way uploads are."""
    if structure == "safetensors":
        plain = {k: t.clone() for k, t in weights.items() if k != "head.weight"}  # safetensors cannot tie
        save_file(plain, str(path), metadata={"format": "pt", "author": "me"})
    else:
        torch.save({"model_state_dict": weights, **extras} if structure == "checkpoint" else weights, path)
    model = load_model(path)
    if "head.weight" in weights:
        model.weights["head.weight"] = model.weights["embed.weight"]  # as pruning a tied model gives it back
    return model


def make_model(path: Path, structure: str = "state_dict", **extras: object) -> LoadedModel:
    return saved(pruned_weights(), path, structure, **extras)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view for bit-exact comparison (-0.0 differs from 0.0, NaN payloads count)."""
    if t.is_floating_point():
        return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want) or set(got) == set(want)
    for key, t in want.items():
        assert got[key].dtype == t.dtype, key
        assert got[key].shape == t.shape, key
        assert got[key].layout == torch.strided, key
        assert torch.equal(bits(got[key]), bits(t)), key
    assert got["head.weight"].data_ptr() == got["embed.weight"].data_ptr()


def write(tmp_path: Path, model: LoadedModel, fmts: tuple[str, ...] = FORMATS, **kw: object) -> list:
    return write_outputs(model, model.weights, PRUNED, tmp_path / "out", "m", fmts, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Names and options


def test_output_names_follow_the_documented_pattern() -> None:
    names = [output_name("m", f) for f in FORMATS]
    assert names == ["m.pruned.pt", "m.csr.pt", "m.pruned.pt.zst", "m.csr.pt.zst"]
    assert output_name("m", "dense", safetensors=True) == "m.pruned.safetensors"
    assert output_name("m", "dense.zst", safetensors=True) == "m.pruned.safetensors.zst"
    assert output_name("m", "csr", safetensors=True) == "m.csr.pt"
    assert output_name("m", "packed").startswith("m.")


def test_parse_formats_expands_the_zstd_alias_and_keeps_a_fixed_order() -> None:
    assert parse_formats("dense,csr,dense.zst,csr.zst") == FORMATS
    assert parse_formats(" csr , zstd ") == ("csr", "dense.zst", "csr.zst")
    assert parse_formats("csr.zst,dense") == ("dense", "csr.zst")
    assert "packed" in formats.ALL_FORMATS and "packed" not in FORMATS


@pytest.mark.parametrize("text", ["dense,jpeg", "", " , "])
def test_parse_formats_refuses_unknown_or_empty(text: str) -> None:
    with pytest.raises(SettingsError, match="format"):
        parse_formats(text)


def test_unknown_format_and_bad_zstd_level_are_refused(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m.pt")
    with pytest.raises(SettingsError, match="jpeg"):
        write(tmp_path, model, ("jpeg",))
    with pytest.raises(SettingsError, match="zstd level 99"):
        write(tmp_path, model, ("dense.zst",), zstd_level=99)


# ---------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_back_bit_for_bit(tmp_path: Path, fmt: str) -> None:
    model = make_model(tmp_path / "m.pt")
    [out] = write(tmp_path, model, (fmt,))
    assert out.format == fmt and out.path.name == output_name("m", fmt)
    assert out.bytes == os.path.getsize(out.path) and out.encode_seconds > 0
    assert_same_weights(read_weights(out.path), model.weights)


@pytest.mark.parametrize("fmt", ["dense", "dense.zst", "csr"])
def test_safetensors_input_round_trips_with_ties_and_metadata(tmp_path: Path, fmt: str) -> None:
    model = make_model(tmp_path / "m.safetensors", "safetensors")
    [out] = write(tmp_path, model, (fmt,))
    assert out.path.name == output_name("m", fmt, safetensors=True)
    assert_same_weights(read_weights(out.path), model.weights)
    if fmt == "dense":
        with safe_open(str(out.path), "pt") as f:
            meta, keys = f.metadata(), set(f.keys())
        assert meta["author"] == "me"
        assert json.loads(meta[formats.ALIASES_METADATA_KEY]) == {"head.weight": "embed.weight"}
        assert "head.weight" not in keys  # stored once


def test_damaged_safetensors_aliases_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.pruned.safetensors"
    for aliases in ('{"b": "missing"}', "not json", '{"a": "a"}'):
        save_file({"a": torch.ones(2)}, str(path), metadata={formats.ALIASES_METADATA_KEY: aliases})
        with pytest.raises(CorruptFileError, match="pruneapp.aliases"):
            read_weights(path)


def test_csr_file_is_plain_torch_with_int32_csr_for_pruned_tensors(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m.pt")
    [out] = write(tmp_path, model, ("csr",))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        with torch.sparse.check_sparse_tensor_invariants():
            obj = torch.load(out.path, weights_only=True)
    assert obj["format"] == "pruneapp-csr" and obj["version"] == 1
    tensors = obj["tensors"]
    assert tensors["conv.weight"].layout == torch.sparse_csr and tensors["conv.weight"].shape == (4, 27)
    assert tensors["vec"].shape == (1, 40)
    assert tensors["fc.weight"].crow_indices().dtype == torch.int32
    assert tensors["fc.weight"].col_indices().dtype == torch.int32
    assert tensors["brain.weight"].values().dtype == torch.bfloat16
    assert tensors["busy.weight"].layout == torch.strided and tensors["fc.bias"].layout == torch.strided
    assert "head.weight" not in tensors and obj["aliases"] == {"head.weight": "embed.weight"}
    assert obj["shapes"]["conv.weight"] == [4, 3, 3, 3] and list(obj["shapes"]) == list(model.weights)
    assert any("busy.weight" in n and "CSR would be larger" in n for n in out.notes)


def test_csr_is_smaller_than_dense_at_high_sparsity(tmp_path: Path) -> None:
    weights = {"w": _sparse((256, 256), torch.float32, 0.1, 9)}
    model = saved(weights, tmp_path / "w.pt")
    dense, csr = write_outputs(model, weights, ["w"], tmp_path / "out", "w", ("dense", "csr"))
    assert csr.bytes < 0.7 * dense.bytes


def test_views_into_larger_storages_are_saved_compactly(tmp_path: Path) -> None:
    big = torch.randn(1000, 100)
    weights = {"part": big[10:12], "alias": big[10:12]}
    model = saved(weights, tmp_path / "v.pt")
    assert model.weights["part"].untyped_storage().nbytes() == 400_000  # loaded as a view, as saved
    dense, csr = write_outputs(model, weights, [], tmp_path / "out", "v", ("dense", "csr"))
    assert dense.bytes < 20_000 and csr.bytes < 20_000  # the whole storage is 400 kB
    got = read_weights(dense.path)
    assert torch.equal(got["part"], big[10:12]) and got["alias"].data_ptr() == got["part"].data_ptr()


def test_extras_are_kept_or_dropped(tmp_path: Path) -> None:
    extras = {"epoch": 3, "optimizer": {"state": {0: {"exp_avg": torch.ones(4)}}, "param_groups": []}}
    model = make_model(tmp_path / "ckpt.pth", "checkpoint", **extras)
    kept = write(tmp_path, model, ("dense", "csr"))
    dense = torch.load(kept[0].path, weights_only=True)
    csr = torch.load(kept[1].path, weights_only=True)
    assert dense["epoch"] == 3 and csr["extras"]["epoch"] == 3
    assert torch.equal(csr["extras"]["optimizer"]["state"][0]["exp_avg"], torch.ones(4))
    dropped = write(tmp_path, model, ("dense", "csr"), drop_extras=True, force=True)
    assert "epoch" not in torch.load(dropped[0].path, weights_only=True)
    assert torch.load(dropped[1].path, weights_only=True)["extras"] == {}


def test_negative_zero_nan_and_inf_survive_every_format(tmp_path: Path) -> None:
    w = torch.zeros(4, 64)
    w[0, :4] = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf")])
    w[1, 5] = -0.0
    weights = {"w": w, "h": w.to(torch.float16), "b": w.to(torch.bfloat16)}
    model = saved(weights, tmp_path / "z.pt")
    for out in write_outputs(model, weights, list(weights), tmp_path / "out", "z"):
        got = read_weights(out.path)
        for key, t in weights.items():
            assert torch.equal(bits(got[key]), bits(t)), (out.format, key)


# ---------------------------------------------------------------------------------------------------------------
# Writing safely


def test_writes_create_the_folder_and_leave_no_temporary_files(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m.pt")
    seen = []
    written = write(tmp_path, model, progress=lambda msg, frac: seen.append((msg, frac)))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(o.path.name for o in written)
    assert [m for m, _ in seen[:-1]] == [f"writing {o.path.name}" for o in written]
    assert seen[-1][1] == 1.0 and [f for _, f in seen] == sorted(f for _, f in seen)


def test_outputs_get_ordinary_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    for out in write(tmp_path, make_model(tmp_path / "m.pt")):
        assert out.path.stat().st_mode & 0o777 == 0o666 & ~umask, out.path.name


def test_zst_reuses_the_base_file_written_in_the_same_call(tmp_path: Path) -> None:
    dense, csr, dense_zst, csr_zst = write(tmp_path, make_model(tmp_path / "m.pt"))
    with open(dense_zst.path, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as r:
        assert r.read() == dense.path.read_bytes()
    assert dense_zst.encode_seconds > dense.encode_seconds and csr_zst.encode_seconds > csr.encode_seconds
    assert csr_zst.notes == csr.notes != []


def test_existing_outputs_need_force_and_nothing_is_written_on_refusal(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m.pt")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "m.csr.pt").write_bytes(b"old")
    with pytest.raises(OutputExistsError, match=r"m\.csr\.pt.*--force"):
        write(tmp_path, model)
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.csr.pt"]
    write(tmp_path, model, force=True)
    assert read_weights(out_dir / "m.csr.pt")["fc.weight"].shape == (8, 16)


def test_the_input_is_never_overwritten(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    source = out_dir / "m.pruned.pt"
    model = make_model(source)
    before = source.read_bytes()
    for force in (False, True):
        with pytest.raises(SettingsError, match="overwrite the input"):
            write(tmp_path, model, force=force)
    assert source.read_bytes() == before


def test_output_folder_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    with pytest.raises(SettingsError, match="is a file"):
        write(tmp_path, make_model(tmp_path / "m.pt"))


def test_a_failed_write_leaves_neither_output_nor_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save(obj: object, f: object, *a: object, **kw: object) -> None:
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    model = make_model(tmp_path / "m.pt")
    monkeypatch.setattr(formats.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write(tmp_path, model, ("dense.zst",))
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# zstd frames


def test_zstd_outputs_are_single_standard_frames_with_their_size(tmp_path: Path) -> None:
    src = tmp_path / "data.bin"
    src.write_bytes(bytes(range(256)) * 4000)
    formats.compress_file(src, tmp_path / "data.bin.zst", level=3)
    frame = (tmp_path / "data.bin.zst").read_bytes()
    assert zstandard.frame_content_size(frame) == src.stat().st_size
    assert zstandard.ZstdDecompressor().decompress(frame) == src.read_bytes()
    assert formats.decompress_file(tmp_path / "data.bin.zst", tmp_path / "back", 10**7) == src.stat().st_size
    assert (tmp_path / "back").read_bytes() == src.read_bytes()


@pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd command is not installed")
def test_the_zstd_command_decompresses_our_files(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m.pt")
    for out in write(tmp_path, model, ("dense.zst", "csr.zst")):
        plain = out.path.with_suffix("")
        subprocess.run(["zstd", "-q", "-d", str(out.path), "-o", str(plain)], check=True)
        assert_same_weights(read_weights(plain), model.weights)


def _frame(tmp_path: Path, data: bytes, **kw: object) -> Path:
    path = tmp_path / "x.pt.zst"
    path.write_bytes(zstandard.ZstdCompressor(**kw).compress(data))
    return path


@pytest.mark.parametrize(
    ("tail", "match"), [(b"garbage", "bytes after"), (b"\0\0\0\0", "bytes after"), ("second frame", "bytes after")]
)
def test_zstd_trailing_data_or_a_second_frame_is_refused(tmp_path: Path, tail: object, match: str) -> None:
    path = _frame(tmp_path, b"x" * 1000)
    extra = zstandard.ZstdCompressor().compress(b"more") if tail == "second frame" else tail
    path.write_bytes(path.read_bytes() + extra)
    with pytest.raises(CorruptFileError, match=match):
        read_weights(path)


def test_truncated_zstd_is_refused(tmp_path: Path) -> None:
    path = _frame(tmp_path, os.urandom(50_000))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CorruptFileError, match="truncated"):
        read_weights(path)


def test_zstd_bomb_declaring_its_size_is_refused_before_decompressing(tmp_path: Path) -> None:
    path = _frame(tmp_path, bytes(5_000_000))
    with pytest.raises(LimitExceededError, match="PRUNEAPP_MAX_DECOMPRESSED_BYTES"):
        read_weights(path, Limits(max_decompressed_bytes=1_000_000))


def test_zstd_bomb_without_declared_size_is_stopped_by_the_byte_counter(tmp_path: Path) -> None:
    path = tmp_path / "bomb.zst"
    with open(path, "wb") as f, zstandard.ZstdCompressor(write_content_size=False).stream_writer(f) as w:
        for _ in range(40):
            w.write(bytes(1 << 20))
    assert zstandard.frame_content_size(path.read_bytes()[:18]) == -1
    with pytest.raises(LimitExceededError, match="decompresses to more than"):
        read_weights(path, Limits(max_decompressed_bytes=3_000_000))


def test_zstd_with_a_lying_declared_size_is_refused(tmp_path: Path) -> None:
    path = _frame(tmp_path, bytes(300_000), write_checksum=False)
    data = bytearray(path.read_bytes())
    assert zstandard.get_frame_parameters(bytes(data)).content_size == 300_000
    header = zstandard.frame_header_size(bytes(data))
    data[header - 4 : header] = (1000).to_bytes(4, "little")  # 4-byte content size field
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError):
        read_weights(path)


def test_zstd_inside_zstd_is_refused(tmp_path: Path) -> None:
    inner = zstandard.ZstdCompressor().compress(b"x" * 100)
    with pytest.raises(UnsupportedFileError, match="zstd frame inside"):
        read_weights(_frame(tmp_path, inner, write_content_size=True))


# ---------------------------------------------------------------------------------------------------------------
# Crafted CSR files


def _save_csr(path: Path, tensors: dict, shapes: dict, aliases: dict | None = None, version: int = 1) -> Path:
    obj = {"format": "pruneapp-csr", "version": version, "tensors": tensors, "shapes": shapes}
    obj |= {"aliases": aliases or {}, "extras": {}, "metadata": {}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse")
        torch.save(obj, path)
    return path


def _raw_csr(
    crow: list[int], col: list[int], values: list[float], shape: tuple[int, int], index: torch.dtype = torch.int32
) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse")
        return torch.sparse_csr_tensor(
            torch.tensor(crow, dtype=index),
            torch.tensor(col, dtype=index),
            torch.tensor(values),
            shape,
            check_invariants=False,
        )


@pytest.mark.parametrize(
    ("crow", "col"),
    [([0, 1, 2], [0, 99]), ([0, 2, 1], [0, 1]), ([0, 1, 5], [0, 1]), ([0, 2, 2], [1, 1]), ([0, 1, 2], [-3, 0])],
    ids=["col-out-of-range", "crow-decreasing", "crow-past-nnz", "duplicate-col", "negative-col"],
)
def test_crafted_sparse_indices_give_a_clear_error(tmp_path: Path, crow: list[int], col: list[int]) -> None:
    path = _save_csr(tmp_path / "bad.csr.pt", {"w": _raw_csr(crow, col, [1.0, 2.0], (2, 4))}, {"w": [2, 4]})
    with pytest.raises(CorruptFileError):
        read_weights(path)


@pytest.mark.parametrize(
    ("tensors", "shapes", "aliases", "error"),
    [
        ({"w": torch.ones(2, 4)}, {"w": [4, 2]}, {}, CorruptFileError),
        ({"w": torch.ones(2)}, {"w": [2], "x": [2]}, {}, CorruptFileError),
        ({"w": torch.ones(2)}, {"w": [2], "x": [2]}, {"x": "nope"}, CorruptFileError),
        ({"w": torch.ones(2)}, {"w": [2, -1]}, {}, CorruptFileError),
        ({"w": torch.ones(2).to_sparse()}, {"w": [2]}, {}, CorruptFileError),
        ({"w": _raw_csr([0, 0, 0], [], [], (2, 4))}, {"w": [2, 4, 10**6]}, {}, CorruptFileError),
        ({"w": _raw_csr([0, 0], [], [], (1, 2**40), torch.int64)}, {"w": [2**40]}, {}, LimitExceededError),
    ],
    ids=["shape-mismatch", "missing-tensor", "alias-to-nothing", "negative-dim", "coo-layout", "csr-shape", "huge"],
)
def test_inconsistent_csr_files_are_refused(
    tmp_path: Path, tensors: dict, shapes: dict, aliases: dict, error: type
) -> None:
    with pytest.raises(error):
        read_weights(_save_csr(tmp_path / "bad.csr.pt", tensors, shapes, aliases))


def test_newer_csr_version_asks_for_an_upgrade(tmp_path: Path) -> None:
    path = _save_csr(tmp_path / "new.csr.pt", {"w": torch.ones(2)}, {"w": [2]}, version=2)
    with pytest.raises(UnsupportedFileError, match="upgrade pruneapp"):
        read_weights(path)


def test_too_many_tensors_in_a_csr_file_hit_the_limit(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.ones(1) for i in range(20)}
    path = _save_csr(tmp_path / "many.csr.pt", tensors, {k: [1] for k in tensors})
    with pytest.raises(LimitExceededError, match="PRUNEAPP_MAX_TENSORS"):
        read_weights(path, Limits(max_tensors=10))


def test_missing_and_oversized_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFileError, match="not a file"):
        read_weights(tmp_path / "missing.pt")
    [out] = write(tmp_path, make_model(tmp_path / "m.pt"), ("csr",))
    with pytest.raises(LimitExceededError, match="PRUNEAPP_MAX_FILE_BYTES"):
        read_weights(out.path, Limits(max_file_bytes=100))


# ---------------------------------------------------------------------------------------------------------------
# Snippets shown next to downloads, and packed dispatch


@pytest.mark.parametrize("structure", ["state_dict", "safetensors"])
def test_each_load_snippet_reads_its_file(tmp_path: Path, structure: str) -> None:
    model = make_model(tmp_path / "m.bin", structure)
    for out in write(tmp_path, model):
        scope: dict = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            exec(compile(load_snippet(out.format, str(out.path)), out.path.name, "exec"), scope)
        got = scope["state_dict"]
        assert set(got) == set(model.weights), out.format
        for key, t in model.weights.items():
            assert got[key].dtype == t.dtype and torch.equal(got[key], t), (out.format, key)
        assert got["head.weight"].data_ptr() == got["embed.weight"].data_ptr()


def test_csr_snippet_is_documented_plain_torch() -> None:
    assert "torch.load" in formats.CSR_LOAD_SNIPPET and "weights_only=True" in formats.CSR_LOAD_SNIPPET
    assert "pruneapp" not in formats.CSR_LOAD_SNIPPET.split("#")[0]
    with pytest.raises(SettingsError):
        load_snippet("jpeg", "x")


def test_packed_round_trip_through_the_real_module(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m.pt")
    [out] = write(tmp_path, model, ("packed",))
    assert out.path.name == "m" + packed.EXTENSION and out.path.read_bytes().startswith(packed.MAGIC)
    assert_same_weights(read_weights(out.path), model.weights)
    assert "pruneapp.read_weights" in load_snippet("packed", out.path.name)


@pytest.mark.parametrize("keep", [200, 600, -30])
def test_truncated_csr_file_gives_a_clear_error(tmp_path: Path, keep: int) -> None:
    [out] = write(tmp_path, make_model(tmp_path / "m.pt"), ("csr",))
    out.path.write_bytes(out.path.read_bytes()[:keep])
    with pytest.raises(CorruptFileError, match="write it again"):
        read_weights(out.path)
