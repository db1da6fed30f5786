"""Pruning methods against torch.nn.utils.prune and against reference implementations of the documented tie rules."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from pruneapp import pruning
from pruneapp.errors import SettingsError
from pruneapp.pruning import (
    METHOD_HELP,
    METHODS,
    PruneSettings,
    available_devices,
    global_threshold,
    parse_nm,
    prune,
    resolve_device,
)
from tests.conftest import make_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _prunable(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(module, "weight", state_dict key) for each weight with dim >= 2, tied weights listed once."""
    out, seen = [], set()
    for mod_name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() >= 2 and id(w) not in seen:
            seen.add(id(w))
            out.append((mod, "weight", f"{mod_name}.weight"))
    return out


def _torch_masks(model: nn.Module, apply) -> dict[str, torch.Tensor]:
    """Prune a copy of ``model`` with ``apply(list of (module, name))``; return key -> bool mask (True = kept)."""
    clone = copy.deepcopy(model)
    params = _prunable(clone)
    apply([(m, n) for m, n, _ in params])
    return {key: getattr(m, n + "_mask").bool() for m, n, key in params}


def _holders(tensors: list[torch.Tensor]) -> nn.Module:
    model = nn.Module()
    for i, t in enumerate(tensors):
        child = nn.Module()
        child.weight = nn.Parameter(t.clone())
        model.add_module(f"t{i}", child)
    return model


def _weights(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"t{i}.weight": t for i, t in enumerate(tensors)}


def _reference_global_mask(tensors: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """The documented rule: the k smallest magnitudes, ties broken by tensor order then flat index (True = pruned)."""
    mags = torch.cat([t.reshape(-1) for t in tensors]).abs()
    pruned = torch.zeros(mags.numel(), dtype=torch.bool)
    pruned[torch.sort(mags, stable=True).indices[:k]] = True
    return [part.view(t.shape) for part, t in zip(pruned.split([t.numel() for t in tensors]), tensors, strict=True)]


def _reference_nm_keep(t: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Plain-Python N:M: in each group of m along the flattened input dim, keep the n largest, first on ties."""
    rows = t.reshape(t.shape[0], -1).abs().tolist()
    keep = []
    for row in rows:
        for g in range(0, len(row), m):
            order = sorted(range(m), key=lambda i, g=g: (-row[g + i], i))
            keep.extend(i in order[:n] for i in range(m))
    return torch.tensor(keep).view(t.shape)


def _sign_bits(t: torch.Tensor) -> torch.Tensor:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(ints) < 0


def _ties_tensors() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(-3, 4, (40, 30), generator=gen).float() / 2
    b = torch.randint(-3, 4, (17, 5, 3), generator=gen).half()
    c = torch.randint(-3, 4, (9, 11), generator=gen).bfloat16() * 0.5
    return [a, b, c]


# ---------------------------------------------------------------------------------------------------------------
# global-l1


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "tied"])
@pytest.mark.parametrize("sparsity", [0.3, 0.9])
def test_global_l1_mask_equals_torch_global_unstructured(model_name: str, sparsity: float) -> None:
    model = make_model(model_name)
    expected = _torch_masks(
        model, lambda ps: torch_prune.global_unstructured(ps, torch_prune.L1Unstructured, amount=sparsity)
    )
    result = prune(model.state_dict(), PruneSettings(sparsity=sparsity))
    for key, mask in expected.items():
        assert torch.equal(result.weights[key] != 0, mask), key
    pruned = {s.name for s in result.stats if s.pruned and s.tied_to is None}
    assert pruned == set(expected)


def test_global_l1_matches_torch_on_mixed_dtypes_up_to_ties() -> None:
    torch.manual_seed(3)
    tensors = [torch.randn(60, 40).half(), torch.randn(10, 7, 3), torch.randn(50, 8).bfloat16(), torch.randn(9, 9)]
    expected = _torch_masks(
        _holders(tensors), lambda ps: torch_prune.global_unstructured(ps, torch_prune.L1Unstructured, amount=0.6)
    )
    result = prune(_weights(tensors), PruneSettings(sparsity=0.6))
    assert sum(int((result.weights[k] == 0).sum()) for k in expected) == sum(int((~m).sum()) for m in expected.values())
    for (key, mask), t in zip(expected.items(), tensors, strict=True):
        off_threshold = t.double().abs() != result.threshold  # torch picks any subset of the ties
        assert torch.equal((result.weights[key] != 0)[off_threshold], mask[off_threshold]), key


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.77, 0.999])
def test_global_l1_prunes_exactly_k_with_ties_in_tensor_then_index_order(sparsity: float) -> None:
    tensors = _ties_tensors()
    k = round(sparsity * sum(t.numel() for t in tensors))
    result = prune(_weights(tensors), PruneSettings(sparsity=sparsity))
    for i, expected in enumerate(_reference_global_mask(tensors, k)):
        assert torch.equal(result.weights[f"t{i}.weight"] == 0, expected | (tensors[i] == 0))
    assert sum(int(m.sum()) for m in _reference_global_mask(tensors, k)) == k


@pytest.mark.parametrize(
    "dtypes",
    [[torch.float32], [torch.float16], [torch.bfloat16], [torch.float64], [torch.float16, torch.bfloat16]],
    ids=["fp32", "fp16", "bf16", "fp64", "fp16+bf16"],
)
def test_global_threshold_is_the_kth_smallest_magnitude(dtypes: list[torch.dtype]) -> None:
    gen = torch.Generator().manual_seed(5)
    tensors = [torch.randn(64, 33, generator=gen).to(dtypes[i % len(dtypes)]) * 10.0**i for i in range(4)]
    for sparsity in (0.25, 0.5, 0.9):
        threshold, k = global_threshold(tensors, sparsity)
        mags = torch.cat([t.reshape(-1) for t in tensors]).abs()  # torch.cat promotes like the selection does
        assert k == round(sparsity * mags.numel())
        assert threshold == torch.sort(mags).values[k - 1].item()


def test_global_threshold_of_nothing_pruned_is_zero() -> None:
    assert global_threshold([torch.randn(3, 3)], 0.0) == (0.0, 0)


def test_global_l1_keeps_nan_and_inf_as_the_largest_magnitudes() -> None:
    t = torch.randn(20, 10)
    t[0, :5] = float("nan")
    t[1, :3] = float("-inf")
    result = prune({"w": t}, PruneSettings(sparsity=0.9))
    out = result.weights["w"]
    assert out[0, :5].isnan().all() and torch.equal(out[1, :3], t[1, :3])
    assert int((out == 0).sum()) == 180 and math.isfinite(result.threshold)


def test_global_l1_never_concatenates(monkeypatch: pytest.MonkeyPatch) -> None:
    weights = make_model("cnn").state_dict()

    def refuse(*args, **kwargs):
        raise AssertionError("concatenated the weights")

    for name in ("cat", "concat", "concatenate", "stack", "hstack"):
        monkeypatch.setattr(torch, name, refuse)
    assert prune(weights, PruneSettings(sparsity=0.5)).achieved_sparsity > 0.49


@pytest.mark.parametrize("method", ["global-l1", "layer-l1", "random", "ln-structured", "n:m"])
def test_small_chunks_give_the_same_result(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    weights = _weights(_ties_tensors()[:1] + [torch.randn(12, 8, dtype=torch.float64)])
    settings = PruneSettings(method=method, sparsity=0.6)
    whole = prune(weights, settings).weights
    monkeypatch.setattr(pruning, "_CHUNK", 7)
    chunked = prune(weights, settings).weights
    assert all(torch.equal(_sign_bits(whole[k]), _sign_bits(chunked[k])) for k in weights)
    assert all(torch.equal(whole[k], chunked[k]) for k in weights)


# ---------------------------------------------------------------------------------------------------------------
# the other methods


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "tied"])
def test_layer_l1_mask_equals_torch_l1_unstructured(model_name: str) -> None:
    model = make_model(model_name)

    def apply(params):
        for module, name in params:
            torch_prune.l1_unstructured(module, name, amount=0.4)

    expected = _torch_masks(model, apply)
    result = prune(model.state_dict(), PruneSettings(method="layer-l1", sparsity=0.4))
    for key, mask in expected.items():
        assert torch.equal(result.weights[key] != 0, mask), key


def test_layer_l1_ties_follow_flat_index_order() -> None:
    tensors = _ties_tensors()
    result = prune(_weights(tensors), PruneSettings(method="layer-l1", sparsity=0.45))
    for i, t in enumerate(tensors):
        (expected,) = _reference_global_mask([t], round(0.45 * t.numel()))
        assert torch.equal(result.weights[f"t{i}.weight"] == 0, expected | (t == 0))


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "tied"])
@pytest.mark.parametrize("norm", [1, 2])
def test_ln_structured_mask_equals_torch_ln_structured(model_name: str, norm: int) -> None:
    model = make_model(model_name)

    def apply(params):
        for module, name in params:
            torch_prune.ln_structured(module, name, amount=0.5, n=norm, dim=0)

    expected = _torch_masks(model, apply)
    result = prune(model.state_dict(), PruneSettings(method="ln-structured", sparsity=0.5, norm=norm))
    for key, mask in expected.items():
        assert torch.equal(result.weights[key] != 0, mask), key


def test_ln_structured_ties_prune_the_first_rows() -> None:
    t = torch.tensor([[1.0, -1.0], [2.0, 0.0], [-1.0, 1.0], [0.5, 0.5], [3.0, 3.0]])
    out = prune({"w": t}, PruneSettings(method="ln-structured", sparsity=0.6, norm=1)).weights["w"]
    # L1 norms 2, 2, 2, 1, 6: prune 3 rows -> row 3 (smallest), then rows 0 and 1 among the ties
    assert (out[[0, 1, 3]] == 0).all() and torch.equal(out[[2, 4]], t[[2, 4]])


def test_random_prunes_exactly_k_per_tensor_and_is_reproducible() -> None:
    weights = make_model("mlp").state_dict()
    first = prune(weights, PruneSettings(method="random", sparsity=0.3, seed=7))
    again = prune(weights, PruneSettings(method="random", sparsity=0.3, seed=7))
    other = prune(weights, PruneSettings(method="random", sparsity=0.3, seed=8))
    only_fc2 = prune(weights, PruneSettings(method="random", sparsity=0.3, seed=7, include=["fc2.weight"]))
    for key in ("fc1.weight", "fc2.weight"):
        assert int((first.weights[key] == 0).sum()) == round(0.3 * weights[key].numel())
        assert torch.equal(first.weights[key], again.weights[key])
        assert not torch.equal(first.weights[key], other.weights[key])
    assert torch.equal(only_fc2.weights["fc2.weight"], first.weights["fc2.weight"])


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 8)])
def test_nm_keeps_the_n_largest_of_every_group(nm: tuple[int, int]) -> None:
    weights = make_model("mlp").state_dict()
    result = prune(weights, PruneSettings(method="n:m", nm=nm))
    assert result.target_sparsity == pytest.approx(1 - nm[0] / nm[1])
    for key in ("fc1.weight", "fc2.weight"):
        assert torch.equal(result.weights[key] != 0, _reference_nm_keep(weights[key], *nm))
    assert result.achieved_sparsity == pytest.approx(1 - nm[0] / nm[1])


def test_nm_groups_conv_kernels_along_flattened_input_and_breaks_ties_by_position() -> None:
    gen = torch.Generator().manual_seed(2)
    conv = torch.randint(-2, 3, (6, 4, 3, 3), generator=gen).float()  # in*kh*kw = 36: nine groups of 4
    result = prune({"conv.weight": conv}, PruneSettings(method="n:m"))
    expected = _reference_nm_keep(conv, 2, 4) & (conv != 0)
    assert torch.equal(result.weights["conv.weight"] != 0, expected)


def test_nm_leaves_indivisible_tensors_dense_with_a_warning() -> None:
    weights = make_model("cnn").state_dict()  # conv.weight: in*kh*kw = 27; head.weight: 8
    result = prune(weights, PruneSettings(method="n:m", nm=(2, 4)))
    assert result.weights["conv.weight"] is weights["conv.weight"]
    assert any("conv.weight" in w and "27" in w for w in result.warnings)
    assert [s.name for s in result.stats if s.pruned] == ["head.weight"]


# ---------------------------------------------------------------------------------------------------------------
# permanence, zeros, the caller's tensors


@pytest.mark.parametrize("method", ["global-l1", "layer-l1", "random", "ln-structured", "n:m"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_zeros_are_positive_and_shapes_dtypes_kept(method: str, dtype: torch.dtype) -> None:
    torch.manual_seed(4)
    w = -(torch.rand(16, 12) + 0.1).to(dtype)  # all negative: every pruned weight would become -0.0 with w * mask
    w[0, 0] = -0.0  # an existing negative zero is written as +0.0 too
    t = torch.randn(8, 3, 2, 2).to(dtype).transpose(0, 1)  # not contiguous
    weights = {"neg": w, "t": t, "bias": torch.randn(8).to(dtype)}
    result = prune(weights, PruneSettings(method=method, sparsity=0.5))
    for key, out in result.weights.items():
        assert out.shape == weights[key].shape and out.dtype == dtype and out.device.type == "cpu"
        assert not _sign_bits(out[out == 0]).any(), key
    assert int((result.weights["neg"] == 0).sum()) >= 96
    assert result.weights["bias"] is weights["bias"]


@pytest.mark.parametrize("method", ["global-l1", "layer-l1", "random", "ln-structured", "n:m"])
def test_callers_tensors_are_not_modified(method: str) -> None:
    weights = make_model("tied").state_dict()
    before = {k: v.clone() for k, v in weights.items()}
    result = prune(weights, PruneSettings(method=method, sparsity=0.5))
    assert all(torch.equal(weights[k], before[k]) for k in weights)
    assert all(result.weights[k] is not weights[k] for k in ("embed.weight", "proj.weight"))


def test_inplace_prunes_owned_tensors_and_copies_views() -> None:
    base = torch.randn(10, 20)
    weights = {"owned": torch.randn(20, 10), "half": base[:5], "other": base[5:]}
    expected = prune({k: v.clone() for k, v in weights.items()}, PruneSettings(sparsity=0.5)).weights
    owned = weights["owned"]
    base_before = base.clone()
    result = prune(weights, PruneSettings(sparsity=0.5), inplace=True)
    assert result.weights["owned"] is owned and torch.equal(owned, expected["owned"])
    assert torch.equal(base, base_before)  # views into a shared storage are copied, never written
    assert all(torch.equal(result.weights[k], expected[k]) for k in weights)


def test_tensor_pruned_to_100_percent_is_named_in_a_warning() -> None:
    weights = {"tiny": torch.randn(1, 10), "big": torch.randn(30, 10), "empty": torch.zeros(4, 4)}
    result = prune(weights, PruneSettings(method="ln-structured", sparsity=0.6))
    assert len(result.warnings) == 1 and "'tiny'" in result.warnings[0] and "100%" in result.warnings[0]


def test_tied_weights_are_pruned_once_and_stay_tied(tied_file: Path) -> None:
    weights = torch.load(tied_file, weights_only=True)
    assert weights["embed.weight"].data_ptr() == weights["lm_head.weight"].data_ptr()
    result = prune(weights, PruneSettings(sparsity=0.5))
    assert result.weights["embed.weight"] is result.weights["lm_head.weight"]
    stats = {s.name: s for s in result.stats}
    assert stats["lm_head.weight"].tied_to == "embed.weight" and stats["embed.weight"].tied_to is None
    unique = weights["embed.weight"].numel() + weights["proj.weight"].numel()
    assert int((result.weights["embed.weight"] == 0).sum() + (result.weights["proj.weight"] == 0).sum()) == round(
        0.5 * unique
    )
    assert result.achieved_sparsity == pytest.approx(round(0.5 * unique) / unique)


def test_stats_cover_every_tensor_with_zero_counts() -> None:
    weights = make_model("cnn").state_dict()
    weights["conv.weight"][0, 0, 0, :2] = 0.0
    result = prune(weights, PruneSettings(sparsity=0.5))
    assert [s.name for s in result.stats] == list(weights)
    for s in result.stats:
        assert s.shape == tuple(weights[s.name].shape) and s.numel == weights[s.name].numel()
        assert s.dtype == str(weights[s.name].dtype).removeprefix("torch.")
        assert s.zeros_before == int((weights[s.name] == 0).sum())
        assert s.zeros_after == int((result.weights[s.name] == 0).sum())
        assert s.pruned == (s.name in ("conv.weight", "head.weight"))


def test_progress_reports_each_tensor_up_to_one() -> None:
    calls: list[tuple[str, float]] = []
    prune(make_model("mlp").state_dict(), PruneSettings(), progress=lambda m, f: calls.append((m, f)))
    fractions = [f for _, f in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("fc1.weight" in m for m, _ in calls) and any("fc2.weight" in m for m, _ in calls)


# ---------------------------------------------------------------------------------------------------------------
# selection


def test_include_selects_by_glob_including_one_dimensional_tensors() -> None:
    weights = make_model("mlp").state_dict()
    result = prune(weights, PruneSettings(sparsity=0.5, include=["fc1.*"]))
    assert [s.name for s in result.stats if s.pruned] == ["fc1.weight", "fc1.bias"]


def test_exclude_removes_matching_tensors_and_protects_tied_storage() -> None:
    weights = make_model("tied").state_dict()
    result = prune(weights, PruneSettings(sparsity=0.5, exclude=["lm_head.*"]))
    assert [s.name for s in result.stats if s.pruned] == ["proj.weight"]
    assert result.weights["embed.weight"] is weights["embed.weight"]


def test_integer_and_bool_tensors_are_never_pruned() -> None:
    weights = make_model("cnn").state_dict()
    weights["flags"] = torch.ones(4, 4, dtype=torch.bool)
    weights["ids"] = torch.arange(16).view(4, 4)
    result = prune(weights, PruneSettings(sparsity=0.5, include=["*"]))
    pruned = {s.name for s in result.stats if s.pruned}
    assert {"flags", "ids", "bn.num_batches_tracked"}.isdisjoint(pruned) and "bn.weight" in pruned


def test_nothing_selected_is_an_error() -> None:
    with pytest.raises(SettingsError, match="No tensor to prune"):
        prune(make_model("mlp").state_dict(), PruneSettings(include=["nope.*"]))


# ---------------------------------------------------------------------------------------------------------------
# settings and devices


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (PruneSettings(sparsity=1.0), "Sparsity 1.0 would set every weight to zero"),
        (PruneSettings(sparsity=-0.1), "Bad sparsity"),
        (PruneSettings(sparsity=float("nan")), "Bad sparsity"),
        (PruneSettings(sparsity="0.5"), "Bad sparsity"),
        (PruneSettings(method="magnitude"), "Unknown pruning method 'magnitude'"),
        (PruneSettings(method="n:m", nm=(4, 2)), "Bad N:M pattern"),
        (PruneSettings(method="n:m", nm=(0, 4)), "Bad N:M pattern"),
        (PruneSettings(method="n:m", nm=(2, 2)), "Bad N:M pattern"),
        (PruneSettings(method="ln-structured", norm=3), "Bad norm 3"),
        (PruneSettings(device="tpu"), "Unknown device 'tpu'"),
        (PruneSettings(device="cpu:1"), "Unknown device"),
    ],
)
def test_bad_settings_raise_one_line_errors(settings: PruneSettings, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as info:
        prune(make_model("mlp").state_dict(), settings)
    assert "\n" not in str(info.value)


def test_parse_nm() -> None:
    assert parse_nm("2:4") == (2, 4) and parse_nm(" 1 : 8 ") == (1, 8)
    for bad in ("2-4", "4:2", "a:b", "0:4"):
        with pytest.raises(SettingsError, match="N:M"):
            parse_nm(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_missing_cuda_is_a_clear_error(device: str) -> None:
    with pytest.raises(SettingsError, match=f"Device '{device}' is not available: this machine has no CUDA GPU"):
        resolve_device(device)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an Apple GPU")
def test_missing_mps_is_a_clear_error() -> None:
    with pytest.raises(SettingsError, match="Device 'mps' is not available"):
        resolve_device("mps")


# ---------------------------------------------------------------------------------------------------------------
# GPU (run by scripts/gpu_check.py on a CUDA machine)


def _gpu_weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    weights = {
        "a": torch.randn(256, 128, generator=gen),
        "b": torch.randn(64, 32, 3, 3, generator=gen).half(),
        "c": torch.randn(96, 64, generator=gen).bfloat16(),
        "d": torch.randn(32, 64, generator=gen, dtype=torch.float64),
    }
    weights.update({f"ties{i}": t for i, t in enumerate(_ties_tensors())})
    return weights


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("method", ["global-l1", "layer-l1", "random", "ln-structured", "n:m"])
def test_gpu_result_equals_cpu_bit_for_bit(method: str) -> None:
    weights = _gpu_weights()
    cpu = prune(weights, PruneSettings(method=method, sparsity=0.7))
    gpu = prune(weights, PruneSettings(method=method, sparsity=0.7, device="cuda"))
    assert cpu.threshold == gpu.threshold and cpu.warnings == gpu.warnings
    for key, out in gpu.weights.items():
        assert out.device.type == "cpu"
        assert torch.equal(_sign_bits(out), _sign_bits(cpu.weights[key])) and torch.equal(out, cpu.weights[key]), key


@pytest.mark.gpu
@cuda
def test_gpu_global_threshold_equals_cpu() -> None:
    tensors = list(_gpu_weights().values())
    assert global_threshold([t.cuda() for t in tensors], 0.8) == global_threshold(tensors, 0.8)


@pytest.mark.gpu
@cuda
def test_gpu_inplace_writes_back_into_callers_tensors() -> None:
    weights = _gpu_weights()
    expected = prune(weights, PruneSettings(sparsity=0.6)).weights
    result = prune(weights, PruneSettings(sparsity=0.6, device="cuda"), inplace=True)
    assert all(result.weights[k] is weights[k] and torch.equal(weights[k], expected[k]) for k in weights)


@pytest.mark.gpu
@cuda
def test_absent_cuda_index_is_a_clear_error() -> None:
    with pytest.raises(SettingsError, match="'cuda:99' is not available"):
        resolve_device("cuda:99")


def test_available_devices_lists_cpu_first_and_every_cuda_gpu() -> None:
    devices = available_devices()
    assert devices[0] == "cpu"
    assert [d for d in devices if d.startswith("cuda")] == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for device in devices:
        resolve_device(device)


def test_every_method_has_one_plain_sentence() -> None:
    assert set(METHOD_HELP) == set(METHODS)
    assert all(text.endswith(".") and text.count(". ") == 0 for text in METHOD_HELP.values())
