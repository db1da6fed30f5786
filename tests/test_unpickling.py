"""The code-free unpickler: stand-ins for unknown classes, refusals for code-running globals, state_dict keys."""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import timeit
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from pruneapp import unpickling
from pruneapp.errors import CorruptFileError, LimitExceededError, UnsafeFileError, UnsupportedFileError
from pruneapp.limits import Limits
from pruneapp.unpickling import StandIn, Storages, ZipStorages, dry_run, unpickle
from tests.payloads import Payload, touch

LIMITS = Limits()


def load(data: bytes) -> object:
    return unpickle(data, Storages(), LIMITS)


def data_pkl(path: Path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))


def read_full(path: Path) -> object:
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        return unpickle(zf.read(name), ZipStorages(zf, name.split("/")[0]), LIMITS)


# ---------------------------------------------------------------------------------------------------------------
# Stand-ins


class Hyper:
    def __init__(self) -> None:
        self.lr, self.tags = 0.1, ["a"]


def test_unknown_classes_become_inert_stand_ins_that_record_their_state() -> None:
    obj = load(pickle.dumps({"cfg": Hyper()}, protocol=2))
    cfg = obj["cfg"]
    assert isinstance(cfg, StandIn) and cfg.qualname.endswith("Hyper")
    assert unpickling.module_state(cfg) == {"lr": 0.1, "tags": ["a"]}


@pytest.mark.parametrize("protocol", [0, 1, 2, 4, 5])
def test_every_pickle_protocol_gives_stand_ins(protocol: int) -> None:
    obj = load(pickle.dumps({"cfg": Hyper(), "s": {1, 2}, "f": frozenset({3})}, protocol=protocol))
    assert isinstance(obj["cfg"], StandIn) and unpickling.module_state(obj["cfg"]) == {"lr": 0.1, "tags": ["a"]}
    assert obj["s"] == {1, 2} and obj["f"] == frozenset({3})


def test_same_class_name_gives_one_stand_in_class() -> None:
    obj = load(pickle.dumps([Hyper(), Hyper()], protocol=2))
    assert type(obj[0]) is type(obj[1]) and obj[0] is not obj[1]


def test_a_function_of_an_importable_module_is_never_called(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    data = pickle.dumps({"x": Payload(touch, str(marker))}, protocol=2)
    obj = load(data)
    assert isinstance(obj["x"], StandIn) and obj["x"].args == (str(marker),)
    assert not marker.exists()
    pickle.loads(data)  # the same bytes do run code under a plain unpickler: the payload is real
    assert marker.exists()


def test_stand_ins_refuse_to_be_saved_again() -> None:
    obj = load(pickle.dumps(Hyper(), protocol=2))
    with pytest.raises(TypeError, match="cannot be saved"):
        pickle.dumps(obj)


# ---------------------------------------------------------------------------------------------------------------
# Refusals: globals that exist to run code, and calls outside the allowlist


@pytest.mark.parametrize(
    "func, args",
    [
        (os.system, ("touch {marker}",)),
        (eval, ("open({marker!r}, 'w').close()",)),
        (exec, ("open({marker!r}, 'w').close()",)),
        (subprocess.call, (["touch", "{marker}"],)),
        (timeit.timeit, ("open({marker!r}, 'w').close()", "pass", timeit.default_timer, 1)),
    ],
    ids=["os.system", "eval", "exec", "subprocess", "timeit"],
)
def test_code_running_globals_are_refused(tmp_path: Path, func: object, args: tuple[object, ...]) -> None:
    marker = str(tmp_path / "marker")
    filled = tuple([a.format(marker=marker) for a in x] if isinstance(x, list) else _fill(x, marker) for x in args)
    data = pickle.dumps({"w": torch.ones(2).tolist(), "evil": Payload(func, *filled)}, protocol=2)
    with pytest.raises(UnsafeFileError, match="run .* while loading"):
        load(data)
    assert not Path(marker).exists()


def _fill(value: object, marker: str) -> object:
    return value.format(marker=marker) if isinstance(value, str) else value


def test_getattr_import_chain_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    data = (
        b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'touch "
        + str(marker).encode()
        + b"'\ntR."
    )
    with pytest.raises(UnsafeFileError, match="builtins.getattr"):
        load(data)
    assert not marker.exists()


def test_protocol_4_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    with pytest.raises(UnsafeFileError):
        load(pickle.dumps([Payload(os.system, f"touch {marker}")], protocol=4))
    assert not marker.exists()


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\x80\x02ctorch\nFloatTensor\nJ\x00\x00\x00\x7f\x85R.", "call"),  # torch.FloatTensor(2**31 - ...)
        (b"\x80\x02cbuiltins\nbytearray\nJ\x00\x00\x00\x7f\x85R.", "bytearray"),  # bytearray(2**31 - ...): zeroed
        (b"\x80\x02cbuiltins\nset\n)R}b.", "set the state of set"),  # BUILD on a set
        (b"\x80\x02]X\x01\x00\x00\x00aK\x01s.", "set items of an object of type list"),
        (b"\x80\x02(K\x01K\x02t)R.", "call"),  # REDUCE on a tuple
        (  # _rebuild_from_type_v2(torch.Tensor, torch.Tensor, (2**31 - ...,), {}): the legacy constructor
            b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n(ctorch\nTensor\nctorch\nTensor\nJ\x00\x00\x00\x7f\x85}tR.",
            "rebuild a tensor with",
        ),
    ],
    ids=["tensor-ctor", "bytearray-bomb", "build-set", "setitem-list", "call-tuple", "rebuild-ctor"],
)
def test_operations_outside_the_allowlist_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(UnsafeFileError, match=match):
        load(data)


def test_huge_memo_index_costs_nothing() -> None:
    # LONG_BINPUT 0xFFFFFFF0: the C unpickler would size its memo array to 2**33 entries (64 GB)
    assert load(b"\x80\x02Nr\xf0\xff\xff\xff.") is None


UNUSUAL = {
    "coo": (lambda: torch.eye(3).to_sparse(), "sparse"),
    "csr": (lambda: torch.eye(3).to_sparse_csr(), "sparse"),
    "quantized": (lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8), "quantized"),
}


@pytest.mark.parametrize("kind", UNUSUAL)
def test_unusual_tensor_kinds_are_refused_with_a_fix(tmp_path: Path, kind: str) -> None:
    make, match = UNUSUAL[kind]
    path = tmp_path / "t.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch calls sparse CSR "beta"
        torch.save({"w": make()}, path)
    with pytest.raises(UnsupportedFileError, match=match):
        dry_run(data_pkl(path), LIMITS)


def test_tensor_count_limit_stops_the_unpickler_early(tmp_path: Path) -> None:
    path = tmp_path / "many.pt"
    torch.save({str(i): torch.zeros(1) for i in range(20)}, path)
    with pytest.raises(LimitExceededError, match="more than 10 tensors"):
        dry_run(data_pkl(path), Limits(max_tensors=10))


# ---------------------------------------------------------------------------------------------------------------
# Dry run and storages


def test_dry_run_records_storages_without_reading_data(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "mlp.pt"
    torch.save(mlp.state_dict(), path)
    dry = dry_run(data_pkl(path), LIMITS)
    assert not dry.foreign
    assert {k: v.device.type for k, v in dry.tree.items()} == dict.fromkeys(mlp.state_dict(), "meta")
    assert sum(ref.nbytes for ref in dry.refs.values()) == sum(t.nbytes for t in mlp.state_dict().values())


def test_dry_run_flags_files_torch_load_cannot_read(tmp_path: Path, mlp: nn.Module) -> None:
    path = tmp_path / "full.pt"
    torch.save(mlp, path)
    assert dry_run(data_pkl(path), LIMITS).foreign


def test_zip_storages_refuse_a_record_of_the_wrong_size(tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    torch.save({"w": torch.ones(4)}, path)
    with zipfile.ZipFile(path) as zf:
        storages = ZipStorages(zf, "t")
        with pytest.raises(CorruptFileError, match="declares 32 bytes but its record holds 16"):
            storages.get(unpickling.StorageRef("0", torch.float32, 8))


def test_one_key_declared_with_two_sizes_is_refused() -> None:
    storages = Storages()
    storages.get(unpickling.StorageRef("0", torch.float32, 4))
    with pytest.raises(CorruptFileError, match="two different sizes"):
        storages.get(unpickling.StorageRef("0", torch.float32, 5))


def test_legacy_preamble_must_be_torch_save(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFileError, match="magic"):
        unpickling.read_legacy_preamble(io.BytesIO(pickle.dumps(123, protocol=2)), LIMITS)


# ---------------------------------------------------------------------------------------------------------------
# state_dict keys of full pickled modules


@pytest.mark.parametrize("name", ["mlp", "cnn", "tied"])
def test_module_state_dict_matches_state_dict(tmp_path: Path, request: pytest.FixtureRequest, name: str) -> None:
    model = request.getfixturevalue(name)
    path = tmp_path / "full.pt"
    torch.save(model, path)
    got = unpickling.module_state_dict(read_full(path))
    want = model.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kept", torch.ones(2))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)
        self.register_buffer("unset", None)
        self.lin = nn.Linear(2, 2, bias=False)
        self.plain = torch.ones(5)
        self.empty = nn.Sequential()


def test_module_state_dict_skips_non_persistent_none_and_plain_attributes(tmp_path: Path) -> None:
    model = WithBuffers()
    path = tmp_path / "full.pt"
    torch.save(model, path)
    got = unpickling.module_state_dict(read_full(path))
    assert list(got) == list(model.state_dict()) == ["kept", "lin.weight"]


def test_module_cycle_is_refused(tmp_path: Path) -> None:
    torch.save(nn.Linear(1, 1), tmp_path / "lin.pt")
    obj = read_full(tmp_path / "lin.pt")
    unpickling.module_state(obj)["_modules"]["me"] = obj
    with pytest.raises(CorruptFileError, match="contains itself"):
        unpickling.module_state_dict(obj)


# ---------------------------------------------------------------------------------------------------------------
# TorchScript declarations


def test_script_classes_reads_declarations_without_running_them() -> None:
    sources = {
        "__torch__/torch/nn/modules/linear/___torch_mangle_1.py": (
            "class Linear(Module):\n"
            '  __parameters__ = ["weight", "bias", ]\n'
            "  __buffers__ = []\n"
            "  weight : Tensor\n"
            "  def forward(self: __torch__.X) -> Tensor:\n"
            "    while True:\n"
            "      pass\n"
        ),
        "__torch__.py": (
            'class M(Module):\n  __parameters__ = []\n  __buffers__ = ["running", ]\nclass Helper(object):\n'
        ),
    }
    classes = unpickling.script_classes(sources)
    assert classes == {
        "__torch__.torch.nn.modules.linear.___torch_mangle_1.Linear": unpickling.ScriptClass(("weight", "bias"), ()),
        "__torch__.M": unpickling.ScriptClass((), ("running",)),
    }


class CustomState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        self.weight = state[0]
        self.training = state[1]


def test_script_with_custom_setstate_is_refused_not_guessed(tmp_path: Path) -> None:
    path = tmp_path / "custom.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(CustomState()), str(path))
    with zipfile.ZipFile(path) as zf:
        sources = {n.split("/code/", 1)[1]: zf.read(n).decode() for n in zf.namelist() if n.endswith(".py")}
    classes = unpickling.script_classes(sources)
    assert [c.custom_state for c in classes.values()] == [True]
    with pytest.raises(UnsupportedFileError, match="defines __setstate__"):
        unpickling.script_state_dict(read_full(path), classes)


def test_script_classes_refuses_malformed_declarations() -> None:
    with pytest.raises(CorruptFileError, match="malformed"):
        unpickling.script_classes({"__torch__.py": "class M(Module):\n  __parameters__ = [__import__('os')]\n"})


@pytest.mark.parametrize("name", ["mlp", "cnn", "tied"])
def test_script_state_dict_matches_state_dict(tmp_path: Path, request: pytest.FixtureRequest, name: str) -> None:
    model = request.getfixturevalue(name)
    path = tmp_path / "script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated, but users have archives
        torch.jit.save(torch.jit.script(model), str(path))
    with zipfile.ZipFile(path) as zf:
        sources = {n.split("/code/", 1)[1]: zf.read(n).decode() for n in zf.namelist() if n.endswith(".py")}
    got = unpickling.script_state_dict(read_full(path), unpickling.script_classes(sources))
    want = model.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_script_state_dict_needs_a_declared_top_module() -> None:
    with pytest.raises(CorruptFileError, match="not a module its code declares"):
        unpickling.script_state_dict(load(pickle.dumps(Hyper(), protocol=2)), {})


def test_storage_keys_cannot_name_other_records() -> None:
    pid = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x05\x00\x00\x00../..X\x03\x00\x00\x00cpuK\x01tQ."
    with pytest.raises(CorruptFileError, match="not a valid record key"):
        load(b"\x80\x02" + pid)


def test_legacy_view_past_its_storage_is_refused() -> None:
    pid = struct.pack("<B", 0x28) + (
        b"X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04"
        b"(X\x01\x00\x00\x001K\x02K\x05tt"
    )
    with pytest.raises(CorruptFileError, match="view reaches past"):
        load(b"\x80\x02" + pid + b"Q.")
