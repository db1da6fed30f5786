"""Isolated loading: legitimate files come back exactly as load_model gives them, and the worker's limits hold.

Loaders other than load_model (``loader="isolation_loaders:..."``) let the tests drive the worker directly: a model
with every kind of content, memory and CPU hogs, crashes.
"""

from __future__ import annotations

import dataclasses
import io
import tempfile
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import zstandard
from isolation_loaders import DTYPES, rich_model, sample
from torch import nn

from pruneapp import isolation
from pruneapp.errors import CorruptFileError, LimitExceededError, PruneAppError, UnsafeFileError
from pruneapp.isolation import IsolatedLoad, load_isolated, run_isolated
from pruneapp.limits import Limits, default_limits
from pruneapp.loading import LoadedModel, load_model
from pruneapp.unpickling import StandIn

ME = "isolation_loaders"  # a light module: each worker imports it
MiB = 1024**2


# ---------------------------------------------------------------------------------------------------------------
# Comparing a model from the worker with the in-process one


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_same(a: Any, b: Any, seen: dict[Any, int] | None = None, where: str = "model") -> None:
    """``b`` is ``a`` rebuilt: same types and values (tensors bit for bit, with their strides and offsets) and the
    same sharing (what is one object, or one storage, in ``a`` is one in ``b``)."""
    seen = {} if seen is None else seen
    if type(a) in (type(None), bool, int, float, str, bytes, complex):
        assert type(a) is type(b) and (a == b or (a != a and b != b)), f"{where}: {a!r} != {b!r}"
        return
    if id(a) in seen:
        assert seen[id(a)] == id(b), f"{where}: shared in one model, not in the other"
        return
    seen[id(a)] = id(b)
    if isinstance(a, StandIn) or (isinstance(a, type) and issubclass(a, StandIn)):
        _assert_same_standin(a, b, seen, where)
        return
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        _assert_same_tensor(a, b, seen, where)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, seen, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], seen, f"{where}[{k!r}]")
    elif isinstance(
        a, set | frozenset | bytearray | range | slice | Path | torch.dtype | torch.layout | torch.device | type
    ):
        assert a == b, f"{where}: {a!r} != {b!r}"
    else:
        assert_same(vars(a), vars(b), seen, f"{where}.__dict__")
        return
    if isinstance(a, dict) and getattr(a, "__dict__", None) is not None:  # e.g. a state_dict's _metadata
        assert_same(vars(a), vars(b), seen, f"{where}.__dict__")


def _assert_same_standin(a: Any, b: Any, seen: dict[Any, int], where: str) -> None:
    if isinstance(a, type):
        assert isinstance(b, type) and issubclass(b, StandIn) and a.qualname == b.qualname, where
        return
    assert isinstance(b, StandIn) and type(a).qualname == type(b).qualname, where
    for slot in StandIn.__slots__:
        assert_same(getattr(a, slot), getattr(b, slot), seen, f"{where}.{slot}")


def _assert_same_tensor(a: torch.Tensor, b: torch.Tensor, seen: dict[Any, int], where: str) -> None:
    assert (a.dtype, a.shape, a.stride(), a.storage_offset()) == (b.dtype, b.shape, b.stride(), b.storage_offset())
    assert a.requires_grad == b.requires_grad, where
    assert torch.equal(bits(a), bits(b)), f"{where}: values differ"
    sa, sb = a.untyped_storage(), b.untyped_storage()
    assert sa.nbytes() == sb.nbytes(), where
    if sa.nbytes():
        assert seen.setdefault(("storage", sa.data_ptr()), sb.data_ptr()) == sb.data_ptr(), f"{where}: storage"


def saved_pickle(model: LoadedModel) -> bytes:
    """The data.pkl that torch.save writes for ``model.rebuild()``: equal bytes mean equal structure and sharing."""
    buf = io.BytesIO()
    torch.save(model.rebuild(model.weights), buf)
    with zipfile.ZipFile(buf) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))


# ---------------------------------------------------------------------------------------------------------------
# Legitimate files


def _save(obj: Any, **kwargs: Any) -> Any:
    def build(tmp: Path) -> Path:
        torch.save(obj, tmp / "model.pt", **kwargs)
        return tmp / "model.pt"

    return build


def _safetensors(tmp: Path) -> Path:
    safetensors.torch.save_file(
        {"a": sample(torch.float16), "b": sample(torch.int64)}, tmp / "m.safetensors", {"x": "y"}
    )
    return tmp / "m.safetensors"


def _script(tmp: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated; users still have archives
        torch.jit.save(torch.jit.script(_net()), tmp / "script.pt")
    return tmp / "script.pt"


def _zst(tmp: Path) -> Path:
    inner = _save({"w": sample(torch.bfloat16)})(tmp).read_bytes()
    (tmp / "model.pt.zst").write_bytes(zstandard.ZstdCompressor().compress(inner))
    return tmp / "model.pt.zst"


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def _checkpoint() -> dict[str, Any]:
    net = _net()
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    return {"model_state_dict": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "note": "best"}


def _views() -> dict[str, torch.Tensor]:
    base = sample(torch.float32, (6, 8))
    return {"base": base, "rows": base[1:3], "transposed": base.t(), "tied": base, "alone": base[4].clone()}


LEGIT_FILES = {
    "every dtype": _save({str(d)[6:]: sample(d) for d in DTYPES}),
    "0-d, 1-d and empty": _save({"scalar": torch.tensor(2.5), "vector": torch.arange(3.0), "empty": torch.empty(0, 4)}),
    "views, ties, non-contiguous": _save(_views()),
    "legacy (non-zip) torch.save": _save(_views(), _use_new_zipfile_serialization=False),
    "training checkpoint": _save(_checkpoint()),
    "state_dict with _metadata": _save(_net().state_dict()),
    "full pickled model": _save(_net()),
    "TorchScript archive": _script,
    "safetensors": _safetensors,
    "zstd": _zst,
}


@pytest.mark.parametrize("build", LEGIT_FILES.values(), ids=LEGIT_FILES.keys())
def test_legitimate_file_isolated_equals_in_process(build: Any, tmp_path: Path) -> None:
    path = build(tmp_path)
    expected = load_model(path)
    got = load_isolated(path)
    assert_same(expected, got)
    assert saved_pickle(got) == saved_pickle(expected)


def test_every_dtype_bit_for_bit(tmp_path: Path) -> None:
    tensors = {str(d)[6:]: sample(d) for d in DTYPES}
    torch.save(tensors, tmp_path / "m.pt")
    got = load_isolated(tmp_path / "m.pt").weights
    assert list(got) == list(tensors)
    for key, t in tensors.items():
        assert got[key].dtype == t.dtype and torch.equal(bits(got[key]), bits(t)), key


def test_tied_weights_stay_one_object(tmp_path: Path) -> None:
    torch.save(_views(), tmp_path / "m.pt")
    w = load_isolated(tmp_path / "m.pt").weights
    assert w["tied"] is w["base"]
    assert w["rows"].untyped_storage().data_ptr() == w["base"].untyped_storage().data_ptr()


def test_checkpoint_extras_and_rebuild(tmp_path: Path) -> None:
    ckpt = _checkpoint()
    torch.save(ckpt, tmp_path / "ckpt.pt")
    model = load_isolated(tmp_path / "ckpt.pt")
    assert model.structure == "checkpoint" and model.extras["epoch"] == 3
    assert_same(model.extras["optimizer"], ckpt["optimizer"])
    rebuilt = model.rebuild({k: torch.zeros_like(t) for k, t in model.weights.items()})
    assert set(rebuilt) == set(ckpt) and rebuilt["note"] == "best"


# ---------------------------------------------------------------------------------------------------------------
# The transport itself


def test_rich_model_comes_back_exactly(tmp_path: Path) -> None:
    run = run_isolated(tmp_path / "none", loader=f"{ME}:rich_model")
    got = run.result()
    assert_same(rich_model(str(tmp_path / "none"), Limits()), got)
    assert got.weights["tied.a"] is got.weights["tied.b"] is got.extras["same_as_weight"]
    assert got.extras["cycle"][0] is got.extras["cycle"]
    assert got.extras["state"]._metadata == {"": {"version": 1}}


def test_tensors_are_mapped_from_the_removed_file_not_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    torch.save({"w": torch.randn(256, 256)}, tmp_path / "m.pt")
    w = load_isolated(tmp_path / "m.pt").weights["w"]
    assert list(scratch.iterdir()) == []  # the private temp dir is gone
    assert _mapping_of(w.data_ptr()).endswith("tensors.safetensors (deleted)")
    assert float(w.sum()) == float(torch.load(tmp_path / "m.pt", weights_only=True)["w"].sum())
    w.mul_(0)  # private mapping: writable, copy-on-write


def _mapping_of(address: int) -> str:
    with open("/proc/self/maps") as fh:
        for line in fh:
            span, *_, name = line.rstrip("\n").split(maxsplit=5)
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= address < end:
                return name
    return ""


def test_temp_dir_removed_after_a_failed_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(UnsafeFileError):
        run_isolated(tmp_path / "x.pt", loader=f"{ME}:refuse").result()
    assert list(scratch.iterdir()) == []


def test_an_object_that_cannot_cross_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CorruptFileError, match=r"TypeError: a builtins\.builtin_function_or_method cannot be handed"):
        run_isolated(tmp_path / "x.pt", loader=f"{ME}:unsendable").result()


# ---------------------------------------------------------------------------------------------------------------
# Limits, crashes and errors


def test_memory_limit(tmp_path: Path) -> None:
    run = run_isolated(tmp_path / "x.pt", memory_bytes=64 * MiB, loader=f"{ME}:hog_memory")
    assert run.limit == "memory" and isinstance(run.error, LimitExceededError)
    assert str(run.error) == (
        "Loading x.pt stopped: the file needed more than 67.1 MB of memory; "
        "if the model really is that large, raise PRUNEAPP_WORKER_MEMORY_BYTES."
    )


def test_memory_limit_stops_the_real_loader(tmp_path: Path) -> None:
    """load_model's own out-of-memory error (whatever it wraps it in) is reported as the worker's memory limit."""
    torch.save({"w": torch.zeros(32 * MiB)}, tmp_path / "big.pt")  # 128 MiB of data
    run = run_isolated(tmp_path / "big.pt", memory_bytes=32 * MiB)
    assert run.limit == "memory" and isinstance(run.error, LimitExceededError)
    assert str(run.error).startswith("Loading big.pt stopped: the file needed more than 33.6 MB of memory")


def test_cpu_limit(tmp_path: Path) -> None:
    run = run_isolated(tmp_path / "x.pt", cpu_s=1, loader=f"{ME}:hog_cpu")
    assert run.limit == "cpu" and run.cpu_seconds > 0.5
    assert "more than 1 s of CPU time" in str(run.error) and "PRUNEAPP_WORKER_CPU_SECONDS" in str(run.error)


def test_wall_limit_comes_from_limits(tmp_path: Path) -> None:
    run = run_isolated(tmp_path / "x.pt", Limits(worker_wall_seconds=1), loader=f"{ME}:hang")
    assert run.limit == "wall" and 1 <= run.worker_seconds < 10
    assert "took longer than 1 s" in str(run.error) and "PRUNEAPP_WORKER_WALL_SECONDS" in str(run.error)


def test_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNEAPP_WORKER_MEMORY_BYTES", str(3 * MiB))
    monkeypatch.setenv("PRUNEAPP_WORKER_CPU_SECONDS", "7")
    assert (Limits.from_env().worker_memory_bytes, Limits.from_env().worker_cpu_seconds) == (3 * MiB, 7)


def test_crash_is_unsafe_file_error_and_the_next_load_works(tmp_path: Path, mlp_file: Path) -> None:
    with pytest.raises(UnsafeFileError, match=r"^Loading x\.pt stopped: .* crashed \(signal SIGSEGV\).*crash readers"):
        run_isolated(tmp_path / "x.pt", loader=f"{ME}:crash").result()
    assert set(load_isolated(mlp_file).weights) == set(load_model(mlp_file).weights)


def test_killed_by_the_system_points_at_memory(tmp_path: Path) -> None:
    with pytest.raises(UnsafeFileError, match="system killed the loading process.*PRUNEAPP_WORKER_MEMORY_BYTES"):
        run_isolated(tmp_path / "x.pt", loader=f"{ME}:killed").result()


@pytest.mark.parametrize(
    ("loader", "error", "message"),
    [
        ("refuse", UnsafeFileError, r"^x\.pt: refused for a test\.$"),
        ("fail", CorruptFileError, r"could not be read \(ValueError: an unexpected bug\); it is damaged"),
        ("fail_out_of_memory", LimitExceededError, r"needed more than 4\.29 GB of memory"),
    ],
)
def test_loader_errors_cross_as_prune_app_errors(
    loader: str, error: type[PruneAppError], message: str, tmp_path: Path
) -> None:
    with pytest.raises(error, match=message):
        run_isolated(tmp_path / "x.pt", loader=f"{ME}:{loader}").result()


def test_worker_never_sees_force_no_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    notes = run_isolated(tmp_path / "x.pt", Limits(max_tensors=7), loader=f"{ME}:report_env").result().notes
    assert notes == ["unset", "7"]


def test_concurrent_loads_do_not_disturb_each_other(tmp_path: Path, mlp_file: Path, tied_file: Path) -> None:
    results: dict[str, IsolatedLoad] = {}

    def load(name: str, path: Path, **kwargs: Any) -> None:
        results[name] = run_isolated(path, **kwargs)

    threads = [
        threading.Thread(
            target=load, args=("hang", tmp_path / "x.pt"), kwargs={"timeout_s": 2, "loader": f"{ME}:hang"}
        ),
        threading.Thread(target=load, args=("mlp", mlp_file)),
        threading.Thread(target=load, args=("tied", tied_file)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["hang"].limit == "wall"
    assert_same(load_model(mlp_file), results["mlp"].result())
    assert_same(load_model(tied_file), results["tied"].result())


def test_run_reports_the_workers_cost(mlp_file: Path) -> None:
    run = run_isolated(mlp_file)
    assert run.error is None and run.limit is None
    assert run.peak_rss_bytes > 10 * MiB and run.worker_seconds > 0 and run.cpu_seconds >= 0


def test_parent_only_rebuilds_pruneapp_classes_and_torch_allowlisted_globals() -> None:
    decoder = isolation._Decoder({})
    with pytest.raises(ValueError, match="not a pruneapp class"):
        decoder.decode({"t": "obj", "n": 0, "cls": "os:system", "state": {"t": "dict", "n": 1, "items": []}})
    with pytest.raises(KeyError):
        decoder.decode({"t": "global", "name": "builtins.eval"})
    with pytest.raises(ValueError, match="dtype, layout"):
        decoder.decode({"t": "torch", "name": "load"})


def test_parent_refuses_views_outside_their_storage() -> None:
    decoder = isolation._Decoder({"s0": torch.zeros(4)})
    node = {"t": "tensor", "n": 0, "entry": "s0", "dtype": "float32", "shape": [8], "stride": [1], "offset": 0}
    with pytest.raises(ValueError, match="does not fit its storage"):
        decoder.decode({**node, "grad": False, "param": False})


def test_loads_beyond_the_concurrency_limit_wait_their_turn(tmp_path: Path) -> None:
    one_at_a_time = dataclasses.replace(default_limits(), max_concurrent_loads=1)
    results: list[IsolatedLoad] = []

    def load() -> None:
        results.append(run_isolated(tmp_path / "x.pt", one_at_a_time, timeout_s=1, loader=f"{ME}:hang"))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.limit for r in results] == ["wall", "wall"]
    assert max(r.seconds for r in results) >= 2.0  # the second waited for the first's whole second
