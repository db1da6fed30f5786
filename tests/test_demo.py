"""The bundled demo model and test set: they load safely, run, and score as the training script reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pruneapp import demo
from pruneapp.errors import CorruptFileError, SettingsError
from pruneapp.pruning import PruneSettings


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return demo.load_demo_weights()


@pytest.fixture(scope="module")
def testset() -> dict[str, torch.Tensor]:
    return demo.load_testset()


def test_assets_live_beside_the_package() -> None:
    assert demo.DEMO_MODEL_PATH.parent == Path(demo.__file__).resolve().parent.parent / "assets"
    assert demo.DEMO_MODEL_PATH.is_file() and demo.DEMO_TESTSET_PATH.is_file()


def test_demo_files_stay_small() -> None:
    assert demo.DEMO_MODEL_PATH.stat().st_size + demo.DEMO_TESTSET_PATH.stat().st_size < 3_000_000


def test_weights_load_strictly_into_digits_cnn(weights: dict[str, torch.Tensor]) -> None:
    model = demo.DigitsCNN()
    model.load_state_dict(torch.load(demo.DEMO_MODEL_PATH, weights_only=True), strict=True)
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)
    assert 50_000 <= sum(t.numel() for t in weights.values()) <= 300_000


def test_testset_is_inputs_and_labels(testset: dict[str, torch.Tensor]) -> None:
    assert testset["inputs"].dtype == torch.float32 and testset["inputs"].shape[1:] == (1, 8, 8)
    assert testset["labels"].dtype == torch.int64 and len(testset["labels"]) == len(testset["inputs"])
    assert set(testset["labels"].tolist()) == set(range(10))


def test_is_demo_weights(weights: dict[str, torch.Tensor]) -> None:
    assert demo.is_demo_weights(weights)
    assert not demo.is_demo_weights({k: v for k, v in weights.items() if k != "fc2.bias"})
    assert not demo.is_demo_weights({**weights, "fc2.bias": torch.zeros(11)})
    assert not demo.is_demo_weights({**weights, "extra": torch.zeros(1)})


def test_evaluate_scores_well_on_bundled_testset(weights: dict[str, torch.Tensor]) -> None:
    assert demo.evaluate(weights) >= 0.9


def test_evaluate_counts_correct_predictions(
    weights: dict[str, torch.Tensor], testset: dict[str, torch.Tensor]
) -> None:
    predictions = demo.build_model(weights)(testset["inputs"]).argmax(dim=1)
    wrong = {"inputs": testset["inputs"], "labels": (predictions + 1) % 10}
    assert demo.evaluate(weights, wrong) == 0.0
    half = {"inputs": testset["inputs"][:10], "labels": torch.cat([predictions[:5], (predictions[5:10] + 1) % 10])}
    assert demo.evaluate(weights, half) == pytest.approx(0.5)


def test_agreement_with_itself_is_exact(weights: dict[str, torch.Tensor]) -> None:
    result = demo.agreement(weights, weights)
    assert result == {"top1_agreement": 1.0, "max_abs_logit_diff": 0.0, "mean_abs_logit_diff": 0.0}


def test_agreement_drops_when_weights_change(weights: dict[str, torch.Tensor]) -> None:
    zeroed = {**weights, "fc2.weight": torch.zeros_like(weights["fc2.weight"])}
    result = demo.agreement(weights, zeroed)
    assert result["top1_agreement"] < 0.5
    assert result["max_abs_logit_diff"] >= result["mean_abs_logit_diff"] > 0


def test_running_other_weights_names_the_problem() -> None:
    with pytest.raises(SettingsError, match="demo model"):
        demo.evaluate({"fc.weight": torch.zeros(2, 2)})


def test_wrong_file_is_reported_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "not_demo.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CorruptFileError, match="train_demo.py"):
        demo.load_demo_weights(path)
    with pytest.raises(CorruptFileError, match="test set"):
        demo.load_testset(path)


def test_accuracy_curve_at_zero_sparsity_equals_evaluate(weights: dict[str, torch.Tensor]) -> None:
    curve = demo.accuracy_curve(weights, [0.0], PruneSettings(method="global-l1"))
    assert curve == [(0.0, demo.evaluate(weights))]


def test_accuracy_curve_falls_at_extreme_sparsity(weights: dict[str, torch.Tensor]) -> None:
    curve = demo.accuracy_curve(weights, [0.5, 0.999], PruneSettings(method="global-l1"))
    assert [s for s, _ in curve] == [0.5, 0.999]
    assert curve[0][1] >= 0.9 > curve[1][1]


def test_demo_shapes_are_recognised_from_names_and_shapes_alone() -> None:
    weights = demo.load_demo_weights()
    shapes = {k: tuple(t.shape) for k, t in weights.items()}
    assert demo.has_demo_shapes(shapes)
    first = next(iter(shapes))
    assert not demo.has_demo_shapes({**shapes, first: (1, *shapes[first])})
    assert not demo.has_demo_shapes({k: v for k, v in shapes.items() if k != first})
