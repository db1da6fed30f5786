from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from torch.nn.utils import prune

from pruneapp import formats
from pruneapp.errors import LimitExceededError, OutputExistsError, PruneAppError, SettingsError
from pruneapp.limits import Limits
from pruneapp.loading import load_model
from pruneapp.pipeline import (
    inspect_file,
    magnitude_histogram,
    output_stem,
    prune_file,
    saved_size,
    sweep,
    torch_prune_bytes,
)
from pruneapp.pruning import PruneSettings
from pruneapp.report import Report


def test_prune_file_writes_every_format_and_a_matching_report(tmp_path: Path, checkpoint_file: Path) -> None:
    out = tmp_path / "out"
    report, out_dir = prune_file(checkpoint_file, PruneSettings(sparsity=0.8), out_dir=out)
    assert out_dir == out
    assert sorted(o.format for o in report.outputs) == sorted(formats.ALL_FORMATS)
    for o in report.outputs:
        assert (out / o.path).stat().st_size == o.bytes
        assert o.ratio == pytest.approx(o.bytes / checkpoint_file.stat().st_size)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["input"]["bytes"] == checkpoint_file.stat().st_size
    assert {o["path"] for o in on_disk["outputs"]} == {p.name for p in out.iterdir()} - {"report.json"}
    assert Report.from_dict(on_disk).to_dict() == report.to_dict()
    assert 0.79 <= report.sparsity_achieved <= 0.81


def test_trap_file_is_larger_than_the_input_and_dense_does_not_shrink(tmp_path: Path, mlp_file: Path) -> None:
    report, _ = prune_file(
        mlp_file, PruneSettings(sparsity=0.9), out_dir=tmp_path / "o", formats=["dense", "dense.zst"]
    )
    sizes = {o.format: o.bytes for o in report.outputs}
    assert report.torch_prune_bytes > 1.5 * report.input.bytes
    assert sizes["dense"] >= 0.95 * report.input.bytes
    assert sizes["dense.zst"] < 0.5 * sizes["dense"]


def test_outputs_read_back_equal_the_pruned_weights(tmp_path: Path, tied_file: Path) -> None:
    report, out = prune_file(tied_file, PruneSettings(sparsity=0.5), out_dir=tmp_path / "o")
    dense = formats.read_weights(out / next(o.path for o in report.outputs if o.format == "dense"))
    for o in report.outputs:
        got = formats.read_weights(out / o.path)
        assert got.keys() == dense.keys()
        assert all(torch.equal(got[k], dense[k]) for k in dense)
    assert torch.equal(dense["embed.weight"], dense["lm_head.weight"])


def test_existing_outputs_are_kept_without_force(tmp_path: Path, mlp_file: Path) -> None:
    out = tmp_path / "o"
    prune_file(mlp_file, PruneSettings(sparsity=0.5), out_dir=out, formats=["dense"])
    before = (out / "mlp.pruned.pt").read_bytes()
    with pytest.raises(OutputExistsError, match="--force"):
        prune_file(mlp_file, PruneSettings(sparsity=0.9), out_dir=out, formats=["dense"])
    assert (out / "mlp.pruned.pt").read_bytes() == before
    prune_file(mlp_file, PruneSettings(sparsity=0.9), out_dir=out, formats=["dense"], force=True)
    assert (out / "mlp.pruned.pt").read_bytes() != before


def test_progress_names_each_stage_in_order(tmp_path: Path, mlp_file: Path) -> None:
    seen: list[tuple[str, float]] = []
    prune_file(mlp_file, PruneSettings(), out_dir=tmp_path / "o", progress=lambda m, f: seen.append((m, f)))
    stages = [m.split(":")[0] for m, _ in seen]
    firsts = [s for i, s in enumerate(stages) if s not in stages[:i]]
    assert firsts == ["load", "prune", "encode", "measure"]
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_histogram_counts_every_pruned_weight(tmp_path: Path, mlp: torch.nn.Module) -> None:
    weights = mlp.state_dict()
    weights["fc1.weight"][0, :4] = 0.0
    h = magnitude_histogram(weights, ["fc1.weight", "fc2.weight"], threshold=0.05)
    assert sum(h.counts) + h.zeros == weights["fc1.weight"].numel() + weights["fc2.weight"].numel()
    assert h.zeros == 4 and len(h.edges) == len(h.counts) + 1


def test_inspect_reports_weights_and_optimizer_bytes_apart(checkpoint_file: Path) -> None:
    info = inspect_file(checkpoint_file)
    assert info.structure == "checkpoint"
    assert info.n_params == sum(
        p.numel() for p in torch.load(checkpoint_file, weights_only=True)["model_state_dict"].values()
    )
    assert info.extra_bytes["optimizer"] > info.weights_bytes  # Adam keeps two moments per parameter


def test_sweep_measures_each_format_at_each_sparsity(mlp_file: Path) -> None:
    points = sweep(mlp_file, [0.0, 0.5, 0.95], PruneSettings(), formats=["dense", "csr"])
    assert [p.sparsity for p in points] == [0.0, 0.5, 0.95]
    assert points[-1].bytes["csr"] < points[0].bytes["csr"]
    assert points[-1].bytes["csr"] < points[-1].bytes["dense"]


def test_out_dir_that_is_a_file_is_refused(tmp_path: Path, mlp_file: Path) -> None:
    with pytest.raises(SettingsError, match="not a directory"):
        prune_file(mlp_file, PruneSettings(), out_dir=mlp_file)


def test_dropping_extras_writes_a_plain_state_dict(tmp_path: Path, checkpoint_file: Path) -> None:
    report, out = prune_file(checkpoint_file, PruneSettings(sparsity=0.5), out_dir=tmp_path / "o", drop_extras=True)
    dense = torch.load(out / "ckpt.pruned.pt", weights_only=True)
    original = torch.load(checkpoint_file, weights_only=True)
    assert dense.keys() == original["model_state_dict"].keys()
    kept = prune_file(checkpoint_file, PruneSettings(sparsity=0.5), out_dir=tmp_path / "k")[0]
    size = {o.format: o.bytes for o in report.outputs}
    assert all(size[o.format] < o.bytes for o in kept.outputs if o.format != "packed")
    packed = next(o for o in kept.outputs if o.format == "packed")
    assert "weights only" in " ".join(packed.notes) and size["packed"] == packed.bytes


def test_files_are_loaded_in_a_worker_under_its_limits(tmp_path: Path) -> None:
    path = tmp_path / "big.pt"
    torch.save({"w": torch.ones(4096, 2048)}, path)  # 32 MiB of weights
    tight = Limits(worker_memory_bytes=8 * 1024**2)
    with pytest.raises(LimitExceededError, match="memory"):
        prune_file(path, PruneSettings(), out_dir=tmp_path / "o", limits=tight)
    assert not (tmp_path / "o").exists()


def test_trap_size_equals_the_file_torch_nn_utils_prune_writes(tmp_path: Path, cnn: torch.nn.Module) -> None:
    opt = torch.optim.SGD(cnn.parameters(), lr=0.1, momentum=0.9)
    cnn(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    path = tmp_path / "ck.pt"
    torch.save({"model": cnn.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}, path)
    measured = torch_prune_bytes(load_model(path), ["conv.weight", "head.weight"])
    targets = [(cnn.conv, "weight"), (cnn.head, "weight")]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=0.5)
    torch.save({"model": cnn.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}, path)
    assert measured == path.stat().st_size


def test_dense_output_has_no_trace_of_its_temporary_name(tmp_path: Path, mlp_file: Path) -> None:
    report, out = prune_file(mlp_file, PruneSettings(sparsity=0.5), out_dir=tmp_path / "o", formats=["dense"])
    names = zipfile.ZipFile(out / "mlp.pruned.pt").namelist()
    assert all(n.startswith("mlp.pruned/") for n in names)
    assert report.outputs[0].bytes == saved_size(torch.load(out / "mlp.pruned.pt", weights_only=True), "mlp.pruned")


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("model.pt", "model"),
        ("model.v2.safetensors", "model.v2"),
        ("model.csr.pt.zst", "model"),
        ("model.pruned.pt", "model"),
        ("model.pruneapp", "model"),
        (".csr.pt", ".csr"),
    ],
)
def test_outputs_of_our_own_outputs_are_named_after_the_model(name: str, stem: str) -> None:
    assert output_stem(Path(name)) == stem


def test_a_csr_output_can_be_pruned_again_and_keeps_its_weights(tmp_path: Path, mlp_file: Path) -> None:
    _, first = prune_file(mlp_file, PruneSettings(sparsity=0.5), out_dir=tmp_path / "a", formats=["csr.zst"])
    report, second = prune_file(first / "mlp.csr.pt.zst", PruneSettings(sparsity=0.8), out_dir=tmp_path / "b")
    assert {o.path for o in report.outputs} >= {"mlp.pruned.pt", "mlp.csr.pt"}
    assert report.sparsity_achieved == pytest.approx(0.8, abs=0.01)


def test_an_output_that_reads_back_differently_is_caught(
    tmp_path: Path, mlp_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = formats.read_weights

    def flip_one_bit(path: Path, limits: Limits) -> dict[str, torch.Tensor]:
        weights = real(path, limits)
        weights["fc1.bias"].view(torch.int32)[0] ^= 1
        return weights

    monkeypatch.setattr(formats, "read_weights", flip_one_bit)
    with pytest.raises(PruneAppError, match="does not read back 'fc1.bias' exactly"):
        prune_file(mlp_file, PruneSettings(sparsity=0.5), out_dir=tmp_path / "o", formats=["csr"])
    assert not (tmp_path / "o").exists()
