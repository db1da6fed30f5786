"""Loading every kind of model file users have, and refusing everything else with one clear error."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import random
import tarfile
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import zstandard
from torch import nn

from pruneapp import formats, loading
from pruneapp.errors import (
    CorruptFileError,
    LimitExceededError,
    PruneAppError,
    UnsafeFileError,
    UnsupportedFileError,
)
from pruneapp.formats import read_weights
from pruneapp.limits import Limits
from pruneapp.loading import LoadedModel, detect_kind, load_model, tensor_bytes
from pruneapp.pipeline import inspect_file, prune_file
from pruneapp.pruning import PruneSettings
from tests.payloads import Payload, touch


def save(obj: object, path: Path, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def script(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated; users still have archives
        torch.jit.save(torch.jit.script(model), str(path))
    return path


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key, t in want.items():
        assert got[key].dtype == t.dtype and torch.equal(got[key], t), key


def assert_same_tree(got: object, want: object) -> None:
    assert type(got) is type(want)
    if isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            assert_same_tree(got[key], want[key])
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
    else:
        assert got == want


def roundtrip(model: LoadedModel, tmp_path: Path, drop_extras: bool = False) -> object:
    """What a dense output holds: rebuild() saved with torch.save and read back."""
    path = tmp_path / "out.pt"
    torch.save(model.rebuild(model.weights, drop_extras), path)
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# state_dicts


def test_state_dict_loads_exactly(mlp_file: Path, mlp: nn.Module, tmp_path: Path) -> None:
    model = load_model(mlp_file)
    assert (model.kind, model.structure, model.file_bytes) == ("torch-zip", "state_dict", mlp_file.stat().st_size)
    assert_same(model.weights, mlp.state_dict())
    assert model.extras == {} and model.notes == []
    assert_same_tree(roundtrip(model, tmp_path), torch.load(mlp_file, weights_only=True))


def test_nested_dicts_flatten_to_dotted_keys_and_rebuild_exactly(tmp_path: Path) -> None:
    tree = {
        "encoder": OrderedDict([("layer", {"0": {"weight": torch.randn(3, 3)}}), ("norm", torch.ones(3))]),
        "head": {"w": torch.randn(2, 3), "empty": {}},
        7: torch.arange(4),
    }
    model = load_model(save(tree, tmp_path / "nested.pt"))
    assert model.structure == "state_dict"
    assert list(model.weights) == ["encoder.layer.0.weight", "encoder.norm", "head.w", "7"]
    assert torch.equal(model.weights["encoder.layer.0.weight"], tree["encoder"]["layer"]["0"]["weight"])
    assert_same_tree(roundtrip(model, tmp_path), tree)


def test_state_dict_metadata_is_kept(cnn: nn.Module, tmp_path: Path) -> None:
    model = load_model(save(cnn.state_dict(), tmp_path / "cnn.pt"))
    rebuilt = roundtrip(model, tmp_path)
    assert rebuilt._metadata == cnn.state_dict()._metadata


def test_colliding_flat_keys_are_refused(tmp_path: Path) -> None:
    path = save({"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}}, tmp_path / "clash.pt")
    with pytest.raises(UnsupportedFileError, match="same key 'a.b'"):
        load_model(path)


def test_tied_weights_are_one_tensor_and_counted_once(tied_file: Path, tied: nn.Module) -> None:
    model = load_model(tied_file)
    assert model.weights["embed.weight"] is model.weights["lm_head.weight"]
    assert model.weights["proj.weight"] is not model.weights["embed.weight"]
    assert tensor_bytes(model.weights) == sum(p.nbytes for p in tied.parameters())


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.bool]
)
def test_every_dtype_loads_bit_for_bit(tmp_path: Path, dtype: torch.dtype) -> None:
    values = (torch.randn(8, 5) * 100).to(dtype)
    weights = {"w": values, "scalar": values[0, 0].clone(), "empty": values[:0], "vector": values[1].clone()}
    model = load_model(save(weights, tmp_path / "t.pt"))
    assert_same(model.weights, weights)


def test_conjugate_views_are_resolved(tmp_path: Path) -> None:
    z = torch.tensor([1 + 2j, 3 - 4j])
    got = load_model(save({"z": z.conj()}, tmp_path / "c.pt")).weights["z"]
    assert not got.is_conj() and torch.equal(got, z.conj())


def test_tensors_with_python_attributes_load(tmp_path: Path) -> None:
    t = torch.ones(3)
    t.note = "calibrated"
    for legacy in (False, True):
        assert torch.equal(load_model(save({"w": t}, tmp_path / f"a{legacy}.pt", legacy)).weights["w"], t)


def test_nan_inf_and_negative_zero_survive(tmp_path: Path) -> None:
    w = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1.0])
    got = load_model(save({"w": w}, tmp_path / "t.pt")).weights["w"]
    assert torch.equal(got.view(torch.int32), w.view(torch.int32))


def test_non_contiguous_tensors_and_views_are_kept_as_they_are(tmp_path: Path) -> None:
    base = torch.randn(10, 10)
    weights = {"t": base.T, "rows": base[2:4], "step": base[:, ::3]}
    model = load_model(save(weights, tmp_path / "v.pt"))
    assert_same(model.weights, weights)
    assert not model.weights["t"].is_contiguous()
    assert model.weights["rows"].untyped_storage().nbytes() == base.nbytes  # a view of the whole storage


def test_views_of_one_storage_with_different_shapes_stay_distinct(tmp_path: Path) -> None:
    base = torch.randn(6)
    model = load_model(save({"a": base, "b": base.view(2, 3), "c": base}, tmp_path / "v.pt"))
    assert model.weights["a"] is model.weights["c"] and model.weights["b"] is not model.weights["a"]


# ---------------------------------------------------------------------------------------------------------------
# Training checkpoints


def test_checkpoint_with_adam_state(checkpoint_file: Path, cnn: nn.Module, tmp_path: Path) -> None:
    model = load_model(checkpoint_file)
    saved = torch.load(checkpoint_file, weights_only=True)
    assert (model.structure, model.weights_key) == ("checkpoint", "model_state_dict")
    assert list(model.weights) == list(cnn.state_dict())
    assert list(model.extras) == ["optimizer", "epoch"] and model.extras["epoch"] == 3
    adam = saved["optimizer"]["state"].values()
    assert model.extra_bytes == {"optimizer": sum(t.nbytes for s in adam for t in s.values()), "epoch": 0}
    assert_same_tree(roundtrip(model, tmp_path), saved)
    assert_same_tree(roundtrip(model, tmp_path, drop_extras=True), saved["model_state_dict"])


@pytest.mark.parametrize("key", ["model", "state_dict", "net", "module", "model_state"])
def test_weights_found_under_common_checkpoint_keys(tmp_path: Path, mlp: nn.Module, key: str) -> None:
    path = save({"epoch": 1, key: mlp.state_dict(), "best": 0.5}, tmp_path / "c.pt")
    model = load_model(path)
    assert model.weights_key == key and list(model.extras) == ["epoch", "best"]
    assert_same(model.weights, mlp.state_dict())
    assert list(roundtrip(model, tmp_path)) == ["epoch", key, "best"]


def test_tensors_among_other_top_level_entries(tmp_path: Path) -> None:
    obj = {"w": torch.ones(2, 2), "step": 3, "block": {"b": torch.zeros(2)}, "log": [1.0, 2.0]}
    model = load_model(save(obj, tmp_path / "mixed.pt"))
    assert (model.structure, model.weights_key) == ("checkpoint", None)
    assert list(model.weights) == ["w", "block.b"] and list(model.extras) == ["step", "log"]
    assert_same_tree(roundtrip(model, tmp_path), obj)
    assert_same_tree(roundtrip(model, tmp_path, drop_extras=True), {"w": obj["w"], "block": obj["block"]})


def test_rebuild_puts_new_weights_in_place(checkpoint_file: Path) -> None:
    model = load_model(checkpoint_file)
    zeros = {k: torch.zeros_like(t) for k, t in model.weights.items()}
    rebuilt = model.rebuild(zeros)
    assert all(rebuilt["model_state_dict"][k] is zeros[k] for k in zeros)
    assert rebuilt["optimizer"] is model.extras["optimizer"]


def test_objects_that_need_code_are_left_out_of_checkpoints(tmp_path: Path, mlp: nn.Module) -> None:
    obj = {"model": mlp.state_dict(), "args": argparse.Namespace(lr=0.1), "rng": np.arange(3), "epoch": 2}
    model = load_model(save(obj, tmp_path / "c.pt"))
    assert list(model.extras) == ["epoch"]
    assert any("'args'" in n and "argparse.Namespace" in n for n in model.notes)
    assert any("'rng'" in n for n in model.notes)
    assert list(roundtrip(model, tmp_path)) == ["model", "epoch"]


@pytest.mark.parametrize("key", ["model", "state_dict", "model_state_dict"])
def test_a_lone_weights_entry_is_a_checkpoint(tmp_path: Path, mlp: nn.Module, key: str) -> None:
    model = load_model(save({key: mlp.state_dict()}, tmp_path / "c.pt"))
    assert (model.structure, model.weights_key, model.extras) == ("checkpoint", key, {})
    assert_same(model.weights, mlp.state_dict())
    assert_same_tree(roundtrip(model, tmp_path), {key: mlp.state_dict()})
    assert_same_tree(roundtrip(model, tmp_path, drop_extras=True), mlp.state_dict())


def test_a_weights_entry_beside_other_state_dicts_is_the_checkpoint(tmp_path: Path, mlp: nn.Module) -> None:
    obj = {"ema": mlp.state_dict(), "model": mlp.state_dict()}
    model = load_model(save(obj, tmp_path / "c.pt"))
    assert (model.structure, model.weights_key, list(model.extras)) == ("checkpoint", "model", ["ema"])
    assert list(model.weights) == list(mlp.state_dict())
    assert_same_tree(roundtrip(model, tmp_path), obj)


UNLOADABLE = {"namespace": argparse.Namespace(lr=1), "numpy": np.arange(3), "path": Path("runs/exp1")}


@pytest.mark.parametrize("extra", [*UNLOADABLE, None], ids=[*UNLOADABLE, "lone-model"])
def test_checkpoints_that_shrink_to_their_weights_prune_and_read_back(
    tmp_path: Path, mlp: nn.Module, extra: str | None
) -> None:
    obj = {"model": mlp.state_dict(), **({"args": UNLOADABLE[extra]} if extra else {})}
    report, out = prune_file(save(obj, tmp_path / "ckpt.pt"), PruneSettings(sparsity=0.5), out_dir=tmp_path / "o")
    assert report.input.structure == "checkpoint"
    assert any("'args'" in n for n in report.input.notes) == (extra is not None)
    for output in report.outputs:
        assert list(read_weights(out / output.path)) == list(mlp.state_dict()), output.path
    assert list(torch.load(out / "ckpt.pruned.pt", weights_only=True)) == ["model"]


# ---------------------------------------------------------------------------------------------------------------
# Full pickled modules and TorchScript archives: weights without running code


@pytest.mark.parametrize("name", ["mlp", "cnn", "tied"])
def test_full_pickled_model(tmp_path: Path, request: pytest.FixtureRequest, name: str) -> None:
    module = request.getfixturevalue(name)
    model = load_model(save(module, tmp_path / "full.pt"))
    assert (model.kind, model.structure) == ("torch-zip", "pickled-module")
    assert model.notes == [loading.PICKLED_NOTE]
    assert_same(model.weights, module.state_dict())
    assert all(type(t) is torch.Tensor and not t.requires_grad for t in model.weights.values())
    assert_same_tree(roundtrip(model, tmp_path), dict(module.state_dict()))


def test_full_pickled_tied_model_keeps_the_tie(tmp_path: Path, tied: nn.Module) -> None:
    model = load_model(save(tied, tmp_path / "full.pt"))
    assert model.weights["embed.weight"] is model.weights["lm_head.weight"]


@pytest.mark.parametrize("name", ["mlp", "cnn", "tied"])
def test_torchscript_archive(tmp_path: Path, request: pytest.FixtureRequest, name: str) -> None:
    module = request.getfixturevalue(name)
    path = script(module, tmp_path / "script.pt")
    assert detect_kind(path) == "torchscript"
    model = load_model(path)
    assert (model.kind, model.structure, model.notes) == ("torchscript", "torchscript", [loading.SCRIPT_NOTE])
    assert_same(model.weights, module.state_dict())


def test_legacy_full_pickled_model(tmp_path: Path, cnn: nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that it could not find the source of the test's classes
        path = save(cnn, tmp_path / "old_full.pt", legacy=True)
    model = load_model(path)
    assert (model.kind, model.structure) == ("torch-legacy", "pickled-module")
    assert_same(model.weights, cnn.state_dict())


def test_checkpoint_holding_a_full_model(tmp_path: Path, mlp: nn.Module) -> None:
    model = load_model(save({"model": mlp, "epoch": 4}, tmp_path / "c.pt"))
    assert (model.structure, model.weights_key) == ("checkpoint", "model")
    assert_same(model.weights, mlp.state_dict())
    assert model.notes == [loading.PICKLED_NOTE]
    rebuilt = roundtrip(model, tmp_path)
    assert rebuilt["epoch"] == 4 and list(rebuilt["model"]) == list(mlp.state_dict())


def test_torchscript_code_is_only_read(tmp_path: Path, mlp: nn.Module) -> None:
    marker = tmp_path / "marker"
    original = script(mlp, tmp_path / "script.pt")
    path = tmp_path / "hostile.pt"
    with zipfile.ZipFile(original) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("code/__torch__/conftest.py"):
                data += f"\nopen({str(marker)!r}, 'w').close()\nwhile True:\n  pass\n".encode()
            dst.writestr(info, data)
    assert_same(load_model(path).weights, mlp.state_dict())
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# Other kinds


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_protocol_4_files(tmp_path: Path, legacy: bool, tied: nn.Module) -> None:
    path = tmp_path / "p4.pt"
    torch.save(tied.state_dict(), path, pickle_protocol=4, _use_new_zipfile_serialization=not legacy)
    model = load_model(path)
    assert model.kind == ("torch-legacy" if legacy else "torch-zip")
    assert_same(model.weights, tied.state_dict())
    assert model.weights["embed.weight"] is model.weights["lm_head.weight"]


def test_legacy_state_dict(tmp_path: Path, cnn: nn.Module) -> None:
    path = save(cnn.state_dict(), tmp_path / "old.pt", legacy=True)
    assert detect_kind(path) == "torch-legacy"
    model = load_model(path)
    assert (model.kind, model.structure) == ("torch-legacy", "state_dict")
    assert_same(model.weights, cnn.state_dict())


def test_legacy_tied_weights(tmp_path: Path, tied: nn.Module) -> None:
    model = load_model(save(tied.state_dict(), tmp_path / "old.pt", legacy=True))
    assert model.weights["embed.weight"] is model.weights["lm_head.weight"]


def test_safetensors_with_metadata(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(mlp.state_dict(), str(path), metadata={"format": "pt", "note": "hi"})
    model = load_model(path)
    assert (model.kind, model.structure, model.metadata) == (
        "safetensors",
        "safetensors",
        {"format": "pt", "note": "hi"},
    )
    assert sorted(model.weights) == sorted(mlp.state_dict())
    assert all(torch.equal(model.weights[k], t) for k, t in mlp.state_dict().items())
    assert model.rebuild(model.weights) == model.weights


def test_zstd_around_a_state_dict(tmp_path: Path, mlp_file: Path, mlp: nn.Module) -> None:
    path = tmp_path / "mlp.pt.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(mlp_file.read_bytes()))
    assert detect_kind(path) == "zstd"
    model = load_model(path)
    assert (model.kind, model.structure, model.path, model.file_bytes) == (
        "zstd",
        "state_dict",
        path,
        path.stat().st_size,
    )
    assert model.notes[0].startswith("Decompressed from zstd")
    assert_same(model.weights, mlp.state_dict())


def test_zstd_bomb_is_stopped_by_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "bomb.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(bytes(1 << 22)))
    with pytest.raises(LimitExceededError):
        load_model(path, Limits(max_decompressed_bytes=1 << 20))


def test_zstd_around_a_payload_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    inner = save({"w": torch.ones(2), "x": Payload(os.system, f"touch {marker}")}, tmp_path / "evil.pt")
    path = tmp_path / "evil.pt.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(inner.read_bytes()))
    with pytest.raises(UnsafeFileError, match=r"^evil\.pt\.zst: the file asks to run posix\.system"):
        load_model(path)
    assert not marker.exists()


def test_packed_files_load_as_state_dicts(tmp_path: Path, mlp: nn.Module) -> None:
    packed = pytest.importorskip("pruneapp.packed")
    path = tmp_path / "m.pruneapp"
    packed.write_packed(mlp.state_dict(), path)
    assert detect_kind(path) == "pruneapp-packed"
    model = load_model(path)
    assert (model.kind, model.structure) == ("pruneapp-packed", "state_dict")
    assert_same(model.weights, mlp.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# pruneapp's own CSR outputs: accepted, densified under sparse invariant checks


def csr_file(tmp_path: Path, weights: dict[str, torch.Tensor], extras: dict | None = None) -> Path:
    path = tmp_path / "m.csr.pt"
    formats.write_csr(weights, set(weights), path, extras)
    return path


def test_csr_output_loads_densified_with_ties(tmp_path: Path, tied: nn.Module) -> None:
    weights = {k: t * (t.abs() > 0.5) for k, t in tied.state_dict().items()}  # mostly zeros: stored as CSR
    weights["lm_head.weight"] = weights["embed.weight"]
    path = csr_file(tmp_path, weights)
    model = load_model(path)
    assert (model.kind, model.structure, model.extras) == ("torch-zip", "state_dict", {})
    assert model.notes == [loading.CSR_NOTE]
    assert_same(model.weights, weights)
    assert model.weights["lm_head.weight"] is model.weights["embed.weight"]
    assert_same(roundtrip(model, tmp_path), weights)


def test_csr_output_of_a_checkpoint_keeps_its_extras(tmp_path: Path, checkpoint_file: Path) -> None:
    saved = torch.load(checkpoint_file, weights_only=True)
    weights = saved["model_state_dict"]
    extras = {"optimizer": saved["optimizer"], "epoch": 3}
    model = load_model(csr_file(tmp_path, weights, extras))
    assert (model.structure, model.weights_key, list(model.extras)) == (
        "checkpoint",
        "state_dict",
        ["optimizer", "epoch"],
    )
    assert model.extra_bytes["optimizer"] == tensor_bytes(saved["optimizer"])
    assert_same(model.weights, dict(weights))
    assert_same_tree(roundtrip(model, tmp_path), {"state_dict": dict(weights), **extras})
    assert_same(roundtrip(model, tmp_path, drop_extras=True), dict(weights))


def test_csr_extras_that_take_the_weights_key_move_it(tmp_path: Path, mlp: nn.Module) -> None:
    model = load_model(csr_file(tmp_path, mlp.state_dict(), {"state_dict": "v2", "ema": mlp.state_dict()}))
    assert model.weights_key == "model_state_dict"
    rebuilt = roundtrip(model, tmp_path)
    assert list(rebuilt) == ["model_state_dict", "state_dict", "ema"]
    assert list(load_model(save(rebuilt, tmp_path / "again.pt")).weights) == list(mlp.state_dict())


def test_csr_extras_that_would_read_back_as_the_weights_are_left_out(tmp_path: Path, mlp: nn.Module) -> None:
    model = load_model(csr_file(tmp_path, mlp.state_dict(), {"state_dict": {"w": torch.ones(2)}}))
    assert (model.structure, model.extras) == ("state_dict", {})
    assert "Left out the CSR file's extras ('state_dict')" in model.notes[-1]
    assert_same(roundtrip(model, tmp_path), mlp.state_dict())


def test_csr_output_through_zstd(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "m.csr.pt.zst"
    formats.compress_file(csr_file(tmp_path, mlp.state_dict()), path)
    model = load_model(path)
    assert (model.kind, model.structure, model.path) == ("zstd", "state_dict", path)
    assert model.notes[1:] == [loading.CSR_NOTE]
    assert_same(model.weights, mlp.state_dict())


def test_csr_file_with_invalid_indices_is_refused(tmp_path: Path) -> None:
    crow, col = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 1_000_000], dtype=torch.int32)
    with warnings.catch_warnings():  # torch's one-time "sparse CSR is in beta" notice
        warnings.simplefilter("ignore", UserWarning)
        bad = torch.sparse_csr_tensor(crow, col, torch.ones(2), (2, 4), check_invariants=False)
    path = save(csr_dict({"w": bad}, {"w": [2, 4]}), tmp_path / "bad.csr.pt")
    with pytest.raises(CorruptFileError, match="bad.csr.pt is not a readable CSR file.*col_indices"):
        load_model(path)


def csr_dict(tensors: dict[str, torch.Tensor], shapes: dict[str, list[int]], extras: object = None) -> dict:
    header = {"format": formats.CSR_FORMAT, "version": formats.CSR_VERSION}
    return {**header, "tensors": tensors, "shapes": shapes, "aliases": {}, "extras": extras or {}, "metadata": {}}


@pytest.mark.parametrize(
    "tensors, extras, error, match",
    [
        ({"w": torch.eye(2).to_sparse()}, None, UnsupportedFileError, "sparse"),
        ({"w": torch.eye(2)}, {"args": argparse.Namespace(lr=1)}, UnsafeFileError, "never writes"),
        ({"w": torch.eye(2)}, [1, 2], CorruptFileError, "extras or metadata are malformed"),
    ],
    ids=["coo-tensor", "code-in-extras", "extras-not-a-dict"],
)
def test_crafted_csr_files_are_refused(
    tmp_path: Path, tensors: dict, extras: object, error: type[Exception], match: str
) -> None:
    path = save(csr_dict(tensors, {"w": [2, 2]}, extras), tmp_path / "x.csr.pt")
    with pytest.raises(error, match=match):
        load_model(path)


def test_csr_outputs_prune_again_and_inspect(tmp_path: Path, checkpoint_file: Path) -> None:
    keys = list(torch.load(checkpoint_file, weights_only=True)["model_state_dict"])
    first, out = prune_file(checkpoint_file, PruneSettings(sparsity=0.5), tmp_path / "o", formats=["csr", "csr.zst"])
    for output in first.outputs:
        path = out / output.path
        info = inspect_file(path)
        assert (info.structure, info.notes[-2]) == ("checkpoint", loading.CSR_NOTE)
        assert set(info.extra_bytes) == {"optimizer", "epoch"}
        report, again = prune_file(path, PruneSettings(sparsity=0.8), tmp_path / f"again-{output.format}")
        assert report.sparsity_achieved > first.sparsity_achieved
        for o in report.outputs:
            assert list(read_weights(again / o.path)) == keys, o.path


# ---------------------------------------------------------------------------------------------------------------
# Payloads never run


def payload_file(tmp_path: Path, marker: Path, legacy: bool = False) -> Path:
    obj = {"model": {"w": torch.ones(2)}, "optimizer": {"state": Payload(os.system, f"touch {marker}")}}
    return save(obj, tmp_path / "evil.pt", legacy)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_payload_inside_a_valid_checkpoint_never_runs(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "marker"
    with pytest.raises(UnsafeFileError, match="evil.pt: .*posix.system"):
        load_model(payload_file(tmp_path, marker, legacy))
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_force_no_weights_only_variable_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, legacy: bool, mlp: nn.Module
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "marker"
    with pytest.raises(UnsafeFileError):
        load_model(payload_file(tmp_path, marker, legacy))
    assert not marker.exists()
    assert_same(load_model(save(mlp.state_dict(), tmp_path / "ok.pt", legacy)).weights, mlp.state_dict())
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"


def test_torch_load_never_sees_the_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")  # both set: torch itself would raise
    seen = []
    real_load = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        seen.append((os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"), kwargs.get("weights_only")))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_model(save({"w": torch.ones(2)}, tmp_path / "ok.pt"))
    assert seen == [(None, True)]


def test_gadget_from_an_importable_module_is_inert(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = save({"model": {"w": torch.ones(2)}, "hook": Payload(touch, str(marker))}, tmp_path / "g.pt")
    model = load_model(path)
    assert not marker.exists() and list(model.extras) == []
    assert any("'hook'" in note for note in model.notes)


# ---------------------------------------------------------------------------------------------------------------
# Everything else: one clear error, never a raw exception


@pytest.mark.parametrize(
    "content, error, match",
    [
        (b"", UnsupportedFileError, "empty"),
        (b"hello, this is a README\nnot a model\n", UnsupportedFileError, "text file"),
        (b"\x89PNG\r\n\x1a\n" + bytes(100), UnsupportedFileError, "PNG image"),
        (pickle.dumps({"w": [1.0, 2.0]}, protocol=4), UnsupportedFileError, "plain pickle.*state_dict"),
        (bytes(random.Random(0).randrange(256) for _ in range(300)), UnsupportedFileError, "not a model file"),
    ],
    ids=["empty", "text", "png", "plain-pickle", "random"],
)
def test_not_a_model(tmp_path: Path, content: bytes, error: type[Exception], match: str) -> None:
    path = tmp_path / "upload.pt"
    path.write_bytes(content)
    with pytest.raises(error, match=match):
        load_model(path)


def test_legacy_tar_archive_says_how_to_resave(tmp_path: Path) -> None:
    path = tmp_path / "ancient.pt"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("pickle")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\x80\x02N."))
    with pytest.raises(UnsupportedFileError, match=r"legacy \.tar.*re-save"):
        load_model(path)


@pytest.mark.parametrize("cut", [0.1, 0.4, 0.7, 0.95, -22, -1])
def test_truncated_zip_files(tmp_path: Path, mlp_file: Path, cut: float) -> None:
    data = mlp_file.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * cut)] if cut > 0 else data[:cut])
    with pytest.raises(PruneAppError) as info:
        load_model(path)
    assert isinstance(info.value, CorruptFileError | UnsupportedFileError) and "\n" not in str(info.value)


@pytest.mark.parametrize("cut", [0.3, 0.99])
def test_truncated_safetensors(tmp_path: Path, mlp: nn.Module, cut: float) -> None:
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(mlp.state_dict(), str(path))
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * cut)])
    with pytest.raises(CorruptFileError):
        load_model(path)


def test_damaged_pickles_give_one_line_errors(tmp_path: Path, checkpoint_file: Path) -> None:
    """Random damage inside data.pkl, patched so the zip still opens: always a PruneAppError, never a crash."""
    with zipfile.ZipFile(checkpoint_file) as zf:
        entries = {info: zf.read(info) for info in zf.infolist()}
    rng = random.Random(1)
    for trial in range(40):
        path = tmp_path / f"damaged{trial}.pt"
        with zipfile.ZipFile(path, "w") as zf:
            for info, data in entries.items():
                if info.filename.endswith("data.pkl"):
                    data = bytearray(data)
                    for _ in range(3):
                        data[rng.randrange(len(data))] = rng.randrange(256)
                zf.writestr(info, bytes(data))
        try:
            load_model(path)
        except PruneAppError as e:
            assert "\n" not in str(e) and "damaged" in str(e) or isinstance(e, UnsafeFileError | UnsupportedFileError)


def test_sparse_tensors_are_refused_with_the_fix(tmp_path: Path) -> None:
    path = save({"w": torch.eye(4).to_sparse()}, tmp_path / "s.pt")
    with pytest.raises(UnsupportedFileError, match=r"sparse tensors, .* own CSR files; .*t\.to_dense\(\)"):
        load_model(path)


@pytest.mark.parametrize(
    "obj, match",
    [(torch.ones(3), "single tensor"), ([torch.ones(3)], "holds a list"), ({"epoch": 3}, "without model weights")],
    ids=["tensor", "list", "no-tensors"],
)
def test_files_without_a_state_dict(tmp_path: Path, obj: object, match: str) -> None:
    with pytest.raises(UnsupportedFileError, match=match):
        load_model(save(obj, tmp_path / "x.pt"))


def test_pickled_object_that_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFileError, match="argparse.Namespace, not a model"):
        load_model(save(argparse.Namespace(a=1), tmp_path / "x.pt"))


def test_limits_apply(tmp_path: Path, mlp_file: Path) -> None:
    with pytest.raises(LimitExceededError, match="PRUNEAPP_MAX_FILE_BYTES"):
        load_model(mlp_file, Limits(max_file_bytes=100))
    with pytest.raises(LimitExceededError, match="PRUNEAPP_MAX_TENSORS"):
        load_model(mlp_file, Limits(max_tensors=3))
    many = save({str(i): torch.zeros(1) for i in range(50)}, tmp_path / "many.pt")
    with pytest.raises(LimitExceededError, match="tensors"):
        load_model(many, Limits(max_tensors=20))


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    tree: object = torch.ones(1)
    for _ in range(40):
        tree = {"n": tree}
    with pytest.raises(UnsafeFileError, match="levels deep"):
        load_model(save(tree, tmp_path / "deep.pt"))


def test_missing_path_and_folders(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFileError, match="not a file"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(UnsupportedFileError, match="not a file"):
        load_model(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# tensor_bytes


def test_tensor_bytes_counts_each_storage_once() -> None:
    base = torch.zeros(100)
    obj = {"a": base, "b": base[10:20], "c": [base.view(10, 10), torch.ones(3, dtype=torch.float16)], "d": "x"}
    assert tensor_bytes(obj) == 400 + 6
    assert tensor_bytes({}) == 0


def test_tensor_bytes_of_sparse_tensors_counts_their_parts() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch calls sparse CSR "beta"
        csr = torch.eye(4).to_sparse_csr()
    parts = (csr.crow_indices(), csr.col_indices(), csr.values())
    assert tensor_bytes(csr) == sum(p.untyped_storage().nbytes() for p in parts) > 0
