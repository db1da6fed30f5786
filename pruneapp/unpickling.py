"""Read pickles without running code from them: torch's tensor allowlist, inert stand-ins for every other class.

This reads full pickled modules (``torch.save(model)``) and TorchScript archives, whose classes pruneapp never
imports, and does the dry run (storages on the meta device) that checks each torch file before its data is read.
"""

from __future__ import annotations

import ast
import builtins
import io
import pickle
import re
import sys
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
from torch._weights_only_unpickler import _get_allowed_globals

from pruneapp.errors import CorruptFileError, LimitExceededError, UnsafeFileError, UnsupportedFileError
from pruneapp.limits import Limits

# Standard-library modules whose classes may appear as data in checkpoints (hyperparameters, paths, dates).
# Any other standard-library global (os, subprocess, builtins.eval, pdb, ...) exists to run code: refused.
_DATA_STDLIB = frozenset(
    {
        "argparse",
        "array",
        "collections",
        "copyreg",
        "dataclasses",
        "datetime",
        "decimal",
        "enum",
        "fractions",
        "functools",
        "numbers",
        "pathlib",
        "types",
        "typing",
        "uuid",
        "_codecs",
    }
)
_SAFE_BUILTINS = ("set", "frozenset", "complex", "slice", "range", "object")  # object: copyreg's base class
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class StandIn:
    """An inert placeholder for an object of a class that the file names: it only records what the pickle gives it.

    Subclasses are made per class name (``qualname``); none of them imports, calls or looks up anything.
    """

    __slots__ = ("args", "kwargs", "state", "items", "mapping")
    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items, obj.mapping = args, kwargs, None, [], {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Arguments were recorded by __new__."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Any) -> None:
        self.items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.mapping[key] = value

    def __reduce__(self) -> Any:
        raise TypeError(f"a stand-in for {self.qualname} cannot be saved")

    def __repr__(self) -> str:
        return f"<stand-in for {self.qualname}>"


def is_standin(obj: Any) -> bool:
    """Whether ``obj`` is a stand-in object or a stand-in class."""
    return isinstance(obj, StandIn) or (isinstance(obj, type) and issubclass(obj, StandIn))


def standin_children(obj: StandIn) -> list[Any]:
    """Everything a stand-in recorded, for walking the object tree."""
    return [*obj.args, *obj.kwargs.values(), obj.state, *obj.items, *obj.mapping.keys(), *obj.mapping.values()]


def module_state(obj: StandIn) -> dict[str, Any]:
    """The attribute dict a pickle gave a stand-in (BUILD state, or the dict half of a ``(dict, slots)`` pair)."""
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict | type(None)):
        state = state[0]
    return state if isinstance(state, dict) else {}


# ---------------------------------------------------------------------------------------------------------------
# Storages: where the bytes of each pickled storage come from


@dataclass(frozen=True)
class StorageRef:
    """One storage as a pickle declares it: the record key, its element type and element count."""

    key: str
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Storages:
    """Gives the unpickler a storage per key (memoized, so shared keys share one storage)."""

    def __init__(self) -> None:
        self.refs: dict[str, StorageRef] = {}
        self._made: dict[str, torch.UntypedStorage] = {}

    def get(self, ref: StorageRef) -> torch.UntypedStorage:
        known = self.refs.setdefault(ref.key, ref)
        if known.nbytes != ref.nbytes:
            raise CorruptFileError(f"storage {ref.key!r} is declared with two different sizes; the file is damaged.")
        if ref.key not in self._made:
            self._made[ref.key] = self.make(ref)
        return self._made[ref.key]

    def make(self, ref: StorageRef) -> torch.UntypedStorage:
        """Dry run: a meta storage of the declared size (no memory, no reading)."""
        return torch.UntypedStorage(ref.nbytes, device="meta")


class ZipStorages(Storages):
    """Reads each storage from its ``<prefix>/data/<key>`` record; sizes were checked against the records first."""

    def __init__(self, zf: Any, prefix: str) -> None:
        super().__init__()
        self.zf, self.prefix = zf, prefix

    def make(self, ref: StorageRef) -> torch.UntypedStorage:
        info = self.zf.getinfo(f"{self.prefix}/data/{ref.key}")
        if info.file_size != ref.nbytes:
            raise CorruptFileError(
                f"storage {ref.key!r} declares {ref.nbytes} bytes but its record holds {info.file_size}."
            )
        with self.zf.open(info) as fh:  # zipfile checks the CRC when the record is read to its end
            return _read_storage(fh, ref.nbytes)


class FileStorages(Storages):
    """Reads each storage from a known offset of an open file (legacy torch.save files)."""

    def __init__(self, fh: BinaryIO, offsets: dict[str, int]) -> None:
        super().__init__()
        self.fh, self.offsets = fh, offsets

    def make(self, ref: StorageRef) -> torch.UntypedStorage:
        self.fh.seek(self.offsets[ref.key])
        return _read_storage(self.fh, ref.nbytes)


def _read_storage(fh: BinaryIO, nbytes: int) -> torch.UntypedStorage:
    if nbytes == 0:
        return torch.UntypedStorage(0)
    buf = bytearray(nbytes)
    view, pos = memoryview(buf), 0
    while pos < nbytes:
        chunk = fh.read(min(nbytes - pos, 1 << 24))
        if not chunk:
            raise CorruptFileError("a tensor's data ends early; the file is truncated.")
        view[pos : pos + len(chunk)] = chunk
        pos += len(chunk)
    fh.read(1)
    return torch.frombuffer(buf, dtype=torch.uint8).untyped_storage()


# ---------------------------------------------------------------------------------------------------------------
# The unpickler


def _refuse(message: str, error: type[Exception] = UnsupportedFileError) -> Callable[..., Any]:
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise error(message)

    return refused


_REFUSED_REBUILDS = {
    "_rebuild_sparse_tensor": "holds sparse tensors, which pruneapp reads only from its own CSR files; save dense "
    "ones instead: {k: t.to_dense() for k, t in state_dict.items()}",
    "_rebuild_qtensor": "holds quantized tensors; prune the float model and quantize afterwards",
    "_rebuild_nested_tensor": "holds nested tensors, which pruneapp does not prune; save plain tensors instead",
    "_rebuild_meta_tensor_no_storage": "holds meta tensors without data; save the materialized weights",
    "_rebuild_wrapper_subclass": "holds tensor subclasses; save plain tensors (e.g. t.detach().clone())",
    "_rebuild_device_tensor_from_numpy": "holds tensors of a non-CPU device; re-save them after .cpu()",
    "_rebuild_device_tensor_from_cpu_tensor": "holds tensors of a non-CPU device; re-save them after .cpu()",
}
_TENSOR_REBUILDS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3")


def _identity_list(data: Any) -> Any:
    return list(data) if isinstance(data, list | tuple) else data


def _restore_type_tag(value: Any, type_str: Any = None) -> Any:
    return value


def _safe_bytearray(*args: Any) -> bytearray:
    if args and not isinstance(args[0], bytes | bytearray | str):
        raise UnsafeFileError("the file asks for a bytearray built from a number (a memory bomb); it was refused.")
    return bytearray(*args)


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if not getattr(func, "rebuilds_tensor", False):
        raise UnsafeFileError(f"the file asks to rebuild a tensor with {func!r}; pruneapp refused it.")
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise UnsupportedFileError(
            f"holds tensors of class {getattr(new_type, 'qualname', new_type)}; save plain tensors instead"
        )
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


def _csr_parts(layout: Any, data: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dry run of a CSR rebuild: its (crow, col, values) tensors, which the tree checks then bound and count."""
    if layout is not torch.sparse_csr:
        raise UnsupportedFileError(_REFUSED_REBUILDS["_rebuild_sparse_tensor"])
    ok = isinstance(data, tuple) and len(data) == 4 and all(isinstance(t, torch.Tensor) for t in data[:3])
    if not ok or not _ints(data[3]) or len(data[3]) != 2:
        raise CorruptFileError("a sparse CSR tensor in the file is malformed; it is damaged.")
    return data[0], data[1], data[2]


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    if not (isinstance(cls, type) and issubclass(cls, StandIn)):
        raise UnsafeFileError(f"the file asks copyreg to build {cls!r}; it was refused.")
    return cls(state)


def _newobj(cls: Any, *args: Any) -> Any:
    return _reconstructor(cls, None, args)


class _Counter:
    def __init__(self, limit: int) -> None:
        self.limit, self.count = limit, 0

    def wrap(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def rebuild(*args: Any) -> torch.Tensor:
            self.count += 1
            if self.count > self.limit:
                raise LimitExceededError(
                    f"the file holds more than {self.limit} tensors, over the limit (PRUNEAPP_MAX_TENSORS)."
                )
            _check_view(args, fn is torch._utils._rebuild_tensor_v3)
            return fn(*args)

        rebuild.rebuilds_tensor = True  # type: ignore[attr-defined]  # the only funcs _rebuild_from_type may call
        return rebuild


def _check_view(args: tuple[Any, ...], v3: bool) -> None:
    """The view a rebuild asks for must lie inside its storage (meta storages would silently grow to fit)."""
    if len(args) < 4 or not isinstance(args[0], torch.storage.TypedStorage):
        raise CorruptFileError("a tensor in the file is malformed; it is damaged.")
    storage, offset, size, stride = args[:4]
    dtype = args[6] if v3 and len(args) > 6 else storage.dtype
    if not isinstance(dtype, torch.dtype) or not _ints(size) or not _ints(stride) or len(size) != len(stride):
        raise CorruptFileError("a tensor in the file has a malformed shape or stride; it is damaged.")
    if type(offset) is not int or offset < 0:
        raise CorruptFileError("a tensor in the file has a negative storage offset; it is damaged.")
    if 0 in size:
        return
    span = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
    if span * _itemsize(dtype) > storage._untyped_storage.nbytes():
        raise CorruptFileError(
            f"a tensor of shape {tuple(size)} reaches past the end of its storage; the file is damaged or forged."
        )


def _ints(values: Any) -> bool:
    return isinstance(values, tuple | list | torch.Size) and all(type(v) is int and v >= 0 for v in values)


def _globals(limits: Limits, sparse_csr: bool = False) -> dict[str, Any]:
    """torch's weights-only allowlist, with tensor rebuilds counted and unusual tensor kinds refused clearly.

    ``sparse_csr`` (the dry run of a pruneapp CSR file only): a CSR tensor becomes the tuple of its parts.
    """
    counter = _Counter(limits.max_tensors)
    table = dict(_get_allowed_globals())
    for name in _TENSOR_REBUILDS:
        table[f"torch._utils.{name}"] = counter.wrap(getattr(torch._utils, name))
    for name, message in _REFUSED_REBUILDS.items():
        table[f"torch._utils.{name}"] = _refuse(message)
    if sparse_csr:
        table["torch._utils._rebuild_sparse_tensor"] = _csr_parts
    table["torch._tensor._rebuild_from_type_v2"] = _rebuild_from_type
    table["builtins.bytearray"] = _safe_bytearray
    table.update({f"builtins.{name}": getattr(builtins, name) for name in _SAFE_BUILTINS})
    table["copyreg._reconstructor"] = _reconstructor
    table["copyreg.__newobj__"] = _newobj
    for name in ("intlist", "floatlist", "boollist", "tensorlist", "doublelist"):
        table[f"torch.jit._pickle.build_{name}"] = _identity_list
    table["torch.jit._pickle.restore_type_tag"] = _restore_type_tag
    return table


# Classes a pickle may instantiate (NEWOBJ) or call, besides stand-in classes and the allowlisted functions.
_NEW_OK = (OrderedDict, Counter, set, frozenset, dict, list)
_CALL_OK = (*_NEW_OK, torch.Size, torch.device, complex, slice, range)


class SafeUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its memo is a dict, not a sized array
    """Unpickles with torch's allowlist; other classes become inert stand-ins, code-running globals are refused."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO, storages: Storages, limits: Limits, sparse_csr: bool = False) -> None:
        super().__init__(file, encoding="utf-8")
        self.storages = storages
        self._table = _globals(limits, sparse_csr)
        self._callable = {id(v) for v in self._table.values() if callable(v) and not isinstance(v, type)}
        self._callable |= {id(v) for v in _CALL_OK}
        self._standins: dict[str, type[StandIn]] = {}
        self._torch_names = frozenset(_get_allowed_globals())
        self.foreign = False  # set when the pickle names anything outside torch's weights-only allowlist

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:
            import _compat_pickle

            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        self.foreign |= full not in self._torch_names
        if full in self._table:
            return self._table[full]
        top = module.split(".")[0]
        if module == "builtins" or (top in sys.stdlib_module_names and top not in _DATA_STDLIB):
            raise UnsafeFileError(
                f"the file asks to run {full} while loading; pruneapp never runs code from a file. "
                "If you trust it, load it in your own code and re-save: torch.save(model.state_dict(), PATH)"
            )
        if full not in self._standins:
            self._standins[full] = type(f"StandIn[{full}]", (StandIn,), {"__slots__": (), "qualname": full})
        return self._standins[full]

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise UnsafeFileError("the file holds a persistent id that is not a torch storage.")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and len(pid) == 4 and is_standin(pid[1]):  # legacy torch.save(model): the class
            return pid[1]
        if kind != "storage" or len(pid) not in (5, 6):
            raise UnsafeFileError("the file holds a persistent id that is not a torch storage.")
        ref = _storage_ref(pid[1], pid[2], pid[4])
        storage = self.storages.get(ref)
        if len(pid) == 6 and pid[5] is not None:  # legacy view: (view_key, offset, numel), in elements
            _, offset, numel = pid[5]
            size = _itemsize(ref.dtype)
            if not (0 <= offset and 0 <= numel and (offset + numel) * size <= storage.nbytes()):
                raise CorruptFileError("a storage view reaches past its storage; the file is damaged.")
            storage = storage[offset * size : (offset + numel) * size]
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=ref.dtype, _internal=True)

    def _call(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise CorruptFileError("the pickle calls something with malformed arguments; the file is damaged.")
        if isinstance(func, type) and issubclass(func, StandIn):
            return func(*args, **kwargs)
        if id(func) not in self._callable:
            raise UnsafeFileError(f"the file asks to call {func!r} while loading; pruneapp refused it.")
        return func(*args, **kwargs)

    def _new(self, cls: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if isinstance(cls, type) and (issubclass(cls, StandIn) or cls in _NEW_OK):
            return cls.__new__(cls, *args, **kwargs)
        if cls is torch.nn.Parameter:
            return torch.nn.Parameter(*args)
        raise UnsafeFileError(f"the file asks to create an object of {cls!r}; pruneapp refused it.")

    def _instantiate(self, klass: Any, args: Any) -> None:
        self.append(self._call(klass, tuple(args), {}))

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args, {})

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, {}))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))

    def load_build(self) -> None:
        inst = self.stack[-2]
        if not isinstance(inst, StandIn | OrderedDict | Counter) and type(inst) not in (
            torch.Tensor,
            torch.nn.Parameter,
        ):
            raise UnsafeFileError(f"the file asks to set the state of {type(inst).__name__}; pruneapp refused it.")
        super().load_build()

    def load_append(self) -> None:
        _require(self.stack[-2], (list, StandIn), "append to")
        super().load_append()

    def load_appends(self) -> None:
        items = self.pop_mark()
        _require(self.stack[-1], (list, StandIn), "append to")
        self.stack[-1].extend(items)

    def load_setitem(self) -> None:
        _require(self.stack[-3], (dict, StandIn), "set items of")
        super().load_setitem()

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = _require(self.stack[-1], (dict, StandIn), "set items of")
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]

    def load_additems(self) -> None:
        items = self.pop_mark()
        _require(self.stack[-1], (set,), "add items to").update(items)


SafeUnpickler.dispatch.update(
    {
        pickle.REDUCE[0]: SafeUnpickler.load_reduce,
        pickle.NEWOBJ[0]: SafeUnpickler.load_newobj,
        pickle.NEWOBJ_EX[0]: SafeUnpickler.load_newobj_ex,
        pickle.BUILD[0]: SafeUnpickler.load_build,
        pickle.APPEND[0]: SafeUnpickler.load_append,
        pickle.APPENDS[0]: SafeUnpickler.load_appends,
        pickle.SETITEM[0]: SafeUnpickler.load_setitem,
        pickle.SETITEMS[0]: SafeUnpickler.load_setitems,
        pickle.ADDITEMS[0]: SafeUnpickler.load_additems,
    }
)


def _require(obj: Any, types: tuple[type, ...], action: str) -> Any:
    if not isinstance(obj, types):
        raise UnsafeFileError(f"the file asks to {action} an object of type {type(obj).__name__}; pruneapp refused it.")
    return obj


def _storage_ref(storage_type: Any, key: Any, numel: Any) -> StorageRef:
    if storage_type is torch.UntypedStorage:
        dtype = torch.uint8
    elif isinstance(storage_type, torch.serialization.StorageType):
        dtype = storage_type.dtype
    else:
        raise UnsafeFileError(f"the file declares a storage of type {storage_type!r}; pruneapp refused it.")
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_.]{1,64}", key) or ".." in key:
        raise CorruptFileError(f"the file names a storage {key!r}, which is not a valid record key.")
    if type(numel) is not int or numel < 0:
        raise CorruptFileError(f"storage {key!r} declares {numel!r} elements; the file is damaged.")
    return StorageRef(key, dtype, numel)


def unpickle(data: bytes | BinaryIO, storages: Storages, limits: Limits) -> Any:
    """Unpickle ``data`` with SafeUnpickler; tensors get their storages from ``storages``."""
    fh = io.BytesIO(data) if isinstance(data, bytes) else data
    return SafeUnpickler(fh, storages, limits).load()


@dataclass
class DryRun:
    """A pickle read with meta storages: its object tree, the storages it declares, whether torch.load could read it."""

    tree: Any
    refs: dict[str, StorageRef]
    foreign: bool  # torch.load cannot read it (a name outside its allowlist, protocol != 2): use SafeUnpickler


def dry_run(data: bytes | BinaryIO, limits: Limits, sparse_csr: bool = False) -> DryRun:
    """Unpickle with meta storages: no tensor data is read or allocated, every declaration is recorded.

    ``sparse_csr``: sparse CSR tensors are accepted, as the tuples of their parts (pruneapp's own CSR files).
    """
    storages = Storages()
    unpickler = SafeUnpickler(io.BytesIO(data) if isinstance(data, bytes) else data, storages, limits, sparse_csr)
    tree = unpickler.load()
    # torch's weights-only unpickler speaks protocol 2 only (torch.save's default)
    return DryRun(tree, storages.refs, unpickler.foreign or unpickler.proto != 2)


def is_legacy_magic(head: bytes) -> bool:
    """Whether ``head`` starts with the pickled magic number of a legacy torch.save file (any pickle protocol)."""
    try:
        return unpickle(head, Storages(), Limits()) == _LEGACY_MAGIC
    except Exception:  # anything else, even a refused payload, is simply not that magic number
        return False


def read_legacy_preamble(fh: BinaryIO, limits: Limits) -> None:
    """Read and check the three small pickles that open a legacy (non-zip) torch.save file."""
    none = Storages()
    magic = unpickle(fh, none, limits)
    if magic != _LEGACY_MAGIC:
        raise UnsupportedFileError("the file is a pickle but not a torch.save file (wrong magic number).")
    protocol = unpickle(fh, none, limits)
    if protocol != _LEGACY_PROTOCOL:
        raise UnsupportedFileError(f"the file uses torch.save protocol {protocol!r}, which pruneapp does not read.")
    info = unpickle(fh, none, limits)
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise UnsupportedFileError("the file was saved on a big-endian machine; re-save it on a little-endian one.")


# ---------------------------------------------------------------------------------------------------------------
# Weights of full pickled modules and TorchScript archives, with the keys state_dict() would give


def is_module_standin(obj: Any) -> bool:
    """Whether ``obj`` stands in for an nn.Module (its pickled attributes hold ``_parameters`` and ``_modules``)."""
    if not isinstance(obj, StandIn):
        return False
    state = module_state(obj)
    return isinstance(state.get("_parameters"), dict) and isinstance(state.get("_modules"), dict)


def module_state_dict(root: StandIn) -> dict[str, torch.Tensor]:
    """What ``root.state_dict()`` would return: parameters, persistent buffers, then children, recursively."""
    out: dict[str, torch.Tensor] = {}
    _module_into(root, "", out, set())
    return out


def _module_into(module: StandIn, prefix: str, out: dict[str, torch.Tensor], path: set[int]) -> None:
    if id(module) in path:
        raise CorruptFileError("the pickled model contains itself as a submodule; the file is damaged.")
    state = module_state(module)
    skip = state.get("_non_persistent_buffers_set") or set()
    for group, values in (("_parameters", state.get("_parameters")), ("_buffers", state.get("_buffers"))):
        for name, value in (values or {}).items():
            if value is None or (group == "_buffers" and name in skip):
                continue
            out[prefix + _key(name)] = _as_tensor(value, prefix + _key(name))
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not is_module_standin(child):
            raise CorruptFileError(f"submodule {prefix + _key(name)!r} is not a module; the file is damaged.")
        _module_into(child, f"{prefix}{_key(name)}.", out, path | {id(module)})


def _key(name: Any) -> str:
    if not isinstance(name, str):
        raise CorruptFileError(f"the pickled model has an attribute named {name!r}, which is not a string.")
    return name


def _as_tensor(value: Any, key: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise CorruptFileError(f"{key!r} should be a tensor but is a {type(value).__name__}; the file is damaged.")
    return value


@dataclass(frozen=True)
class ScriptClass:
    """What a TorchScript archive's code declares about one module class."""

    parameters: tuple[str, ...]
    buffers: tuple[str, ...]
    custom_state: bool = False  # defines __setstate__: only its code knows which saved value is which attribute


_CLASS_LINE = re.compile(r"class\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(")
_DECL_LINE = re.compile(r"\s+(__parameters__|__buffers__)\s*=\s*(\[.*\])\s*")
_SETSTATE_LINE = re.compile(r"\s+def\s+__setstate__\s*\(")


def script_classes(sources: dict[str, str]) -> dict[str, ScriptClass]:
    """Module classes declared by TorchScript code files (``code/<module path>.py`` -> text), read, never run.

    The serializer writes ``class Name(Module):`` then ``  __parameters__ = ["weight", ...]`` and ``__buffers__``.
    """
    classes: dict[str, ScriptClass] = {}
    for path, text in sources.items():
        module = path.removesuffix(".py").replace("/", ".")
        current, decl = None, {}
        for line in text.splitlines():
            if m := _CLASS_LINE.match(line):
                _store_class(classes, module, current, decl)
                current, decl = m.group(1), {}
            elif current and (m := _DECL_LINE.fullmatch(line)):
                decl[m.group(1)] = _name_list(m.group(2), f"{module}.{current}")
            elif current and _SETSTATE_LINE.match(line):
                decl["__setstate__"] = True
        _store_class(classes, module, current, decl)
    return classes


def _store_class(classes: dict[str, ScriptClass], module: str, name: str | None, decl: dict[str, tuple]) -> None:
    if name and "__parameters__" in decl:
        custom = bool(decl.get("__setstate__"))
        classes[f"{module}.{name}"] = ScriptClass(decl["__parameters__"], decl.get("__buffers__", ()), custom)


def _name_list(text: str, owner: str) -> tuple[str, ...]:
    try:
        names = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CorruptFileError(f"the archive's code for {owner} declares malformed parameter names.")
    return tuple(names)


def script_state_dict(root: Any, classes: dict[str, ScriptClass]) -> dict[str, torch.Tensor]:
    """What ``torch.jit.load(...).state_dict()`` would return, from the archive's objects and declarations."""
    out: dict[str, torch.Tensor] = {}
    if not isinstance(root, StandIn) or root.qualname not in classes:
        raise CorruptFileError("the TorchScript archive's top object is not a module its code declares.")
    _script_into(root, "", classes, out, set())
    return out


def _script_into(
    obj: StandIn, prefix: str, classes: dict[str, ScriptClass], out: dict[str, torch.Tensor], path: set[int]
) -> None:
    if id(obj) in path:
        raise CorruptFileError("the TorchScript module contains itself; the archive is damaged.")
    decl, state = classes[obj.qualname], obj.state
    if decl.custom_state:
        raise UnsupportedFileError(
            f"the TorchScript class {obj.qualname} defines __setstate__, so only running its code would tell which "
            "saved value is which weight, and pruneapp never runs code from a file. In trusted code, load it and "
            "re-save: torch.save(torch.jit.load(PATH).state_dict(), 'model.pt')"
        )
    if not isinstance(state, dict):
        raise CorruptFileError(f"the TorchScript object of {obj.qualname} holds no attributes; the archive is damaged.")
    for name in (*decl.parameters, *decl.buffers):
        if state.get(name) is not None:
            out[prefix + name] = _as_tensor(state[name], prefix + name)
    for name, value in state.items():
        if isinstance(value, StandIn) and value.qualname in classes:
            _script_into(value, f"{prefix}{_key(name)}.", classes, out, path | {id(obj)})
