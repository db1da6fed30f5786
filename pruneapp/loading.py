"""Detect what a model file is from its bytes and load its tensors without running code from it.

torch.save files go through torch's weights-only loader once pruneapp.checks has verified their structure and a
dry run has read their pickle; full pickled modules and TorchScript archives are read by pruneapp.unpickling into
inert stand-ins and never imported. Every failure leaves load_model as a PruneAppError with a one-line message.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pruneapp import checks, unpickling
from pruneapp.errors import CorruptFileError, LimitExceededError, PruneAppError, UnsafeFileError, UnsupportedFileError
from pruneapp.limits import Limits, default_limits
from pruneapp.unpickling import StandIn

# File kinds, as detect_kind() names them.
KINDS = (
    "torch-zip",  # torch.save (zip, torch >= 1.6): state_dict, checkpoint or pickled module
    "torch-legacy",  # torch.save before 1.6 / _use_new_zipfile_serialization=False
    "torchscript",  # torch.jit.save archive
    "safetensors",
    "zstd",  # a .zst frame around one of the above (our own outputs)
    "pruneapp-packed",  # our packed format
)

# Checkpoint entries that hold the weights, most specific first.
WEIGHT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model_state",
    "model",
    "module",
    "net",
    "network",
    "weights",
    "params",
    "ema",
    "ema_state_dict",
)
PICKLED_NOTE = "Loaded the weights of a full pickled model without running its code; outputs are a state_dict."
SCRIPT_NOTE = "Loaded the weights of a TorchScript archive without running its code; outputs are a state_dict."
CSR_NOTE = "pruneapp CSR file: loaded densified."

ZIP_MAGIC = b"PK\x03\x04"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickle of torch's 0x1950a86a20f9469cfc6c
_NO_WEIGHTS_ONLY_VAR = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_TORCH_LOAD_LOCK = threading.Lock()

# Skeleton markers (plain tuples, so a skeleton pickles with weights_only): where rebuild() puts what.
_WEIGHT, _EXTRA, _FLAT = "weight", "extra", "flat"


@dataclass
class LoadedModel:
    """The weights of a file plus what is needed to write it back in its own structure.

    ``weights`` is a flat state_dict: tied keys hold the very same tensor object.
    """

    path: Path
    kind: str  # one of KINDS
    structure: str  # "state_dict" | "checkpoint" | "safetensors" | "pickled-module" | "torchscript"
    weights: dict[str, torch.Tensor]
    extras: dict[str, Any] = field(default_factory=dict)  # non-weight entries of a checkpoint
    extra_bytes: dict[str, int] = field(default_factory=dict)  # tensor bytes each extra entry holds
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors __metadata__
    notes: list[str] = field(default_factory=list)  # user-facing remarks about the file
    file_bytes: int = 0
    weights_key: str | None = None  # the checkpoint entry that holds the weights
    # The input's containers with ("weight", flat key) / ("extra", key) / ("flat",) markers; None: a flat dict.
    skeleton: Any = field(default=None, repr=False)

    def rebuild(self, weights: dict[str, torch.Tensor], drop_extras: bool = False) -> Any:
        """The object to torch.save for a dense output: the input's structure with ``weights`` in it.

        ``drop_extras`` turns a checkpoint into its plain state_dict (no optimizer state, epoch, ...).
        """
        if self.skeleton is None:
            return dict(weights)
        skeleton, extras = self.skeleton, self.extras
        if drop_extras:
            extras = {}
            if self.weights_key is not None:  # a checkpoint without its extras is its state_dict
                skeleton = skeleton[self.weights_key]
                if not isinstance(skeleton, dict):
                    return dict(weights)
        out = _fill(skeleton, weights, extras)
        placed = set(_leaf_keys(skeleton))
        if any(k not in placed for k in weights):  # keys the input did not have go next to the weights
            root = out[self.weights_key] if skeleton is self.skeleton and self.weights_key in out else out
            root.update({k: t for k, t in weights.items() if k not in placed})
        return out


def detect_kind(path: str | Path) -> str:
    """Name the kind of file from its leading bytes (never from its name)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(ZIP_MAGIC) or head.startswith(b"PK\x05\x06"):
        return _zip_kind(path)
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if (magic := _packed_magic()) and head.startswith(magic):
        return "pruneapp-packed"
    if head.startswith(LEGACY_MAGIC) or (head[:1] == b"\x80" and unpickling.is_legacy_magic(head[:64])):
        return "torch-legacy"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 1 << 40:
        return "safetensors"
    raise UnsupportedFileError(_unknown_message(path.name, size, head))


def load_model(path: str | Path, limits: Limits | None = None) -> LoadedModel:
    """Load a model file safely; raise a PruneAppError subclass for anything else."""
    limits = limits or default_limits()
    path = Path(path)
    try:
        return _load(path, limits)
    except PruneAppError as e:
        raise _named(e, path.name) from e
    except Exception as e:  # torch and zipfile raise many kinds on malformed input: all become one family
        raise _translate(e, path.name) from e


def tensor_bytes(obj: Any) -> int:
    """Bytes of the storages of all tensors in a nested object, each storage counted once."""
    seen: set[Any] = set()
    visited: set[int] = set()
    total, stack = 0, [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            for part in _dense_parts(item):
                storage = part.untyped_storage()
                key = (storage.device, storage.data_ptr()) if storage.data_ptr() else id(part)
                if key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
        elif id(item) not in visited and (children := _container_children(item)) is not None:
            visited.add(id(item))
            stack.extend(children)
    return total


# ---------------------------------------------------------------------------------------------------------------
# Detection


def _zip_kind(path: Path) -> str:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    if not any(n.endswith("data.pkl") and n.count("/") == 1 for n in names):
        raise UnsupportedFileError(
            f"{path.name} is a zip archive but not a PyTorch file (it has no data.pkl); "
            "upload a torch.save or .safetensors file."
        )
    script = any((n.count("/") == 1 and n.endswith("/constants.pkl")) or "/code/" in n for n in names)
    return "torchscript" if script else "torch-zip"


def _packed_magic() -> bytes | None:
    try:
        from pruneapp.packed import MAGIC
    except ImportError:
        return None
    return MAGIC


_SIGNATURES = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x7fELF", "a program (ELF binary)"),
    (b"\x89HDF", "an HDF5 file (Keras .h5?)"),
    (b"GGUF", "a GGUF file (llama.cpp)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
)
_RESAVE = "In trusted code, load it and re-save the weights: torch.save(model.state_dict(), 'model.pt')."


def _unknown_message(name: str, size: int, head: bytes) -> str:
    if size == 0:
        return f"{name} is empty (0 bytes); choose the model file itself."
    for signature, what in _SIGNATURES:
        if head.startswith(signature):
            return f"{name} is {what}, not a model; upload a .pt, .pth, .bin or .safetensors file."
    if len(head) > 262 and head[257:262] == b"ustar":
        return (
            f"{name} is a legacy .tar checkpoint (torch < 0.4), which pruneapp cannot read safely. "
            f"Load it with torch < 1.6 in trusted code and re-save: torch.save(model.state_dict(), 'model.pt')."
        )
    if head[:1] == b"\x80" and head[1:2] in (b"\x01", b"\x02", b"\x03", b"\x04", b"\x05"):
        return f"{name} is a plain pickle, not a torch.save file; pickles can run code, so it is not opened. {_RESAVE}"
    if _looks_like_text(head):
        return f"{name} is a text file, not a model; upload a .pt, .pth, .bin or .safetensors file."
    return f"{name} is not a model file pruneapp recognises (it starts with {head[:8].hex(' ')}); {_RESAVE}"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = head[:-3].decode("utf-8", errors="replace")
    printable = sum((c.isprintable() and c != "\ufffd") or c in "\r\n\t" for c in text)
    return printable >= 0.95 * max(1, len(text))


# ---------------------------------------------------------------------------------------------------------------
# Loading each kind


def checked_size(path: Path, limits: Limits) -> int:
    """The size of ``path``, after checking that it is a file within ``limits.max_file_bytes``."""
    if not path.is_file():
        raise UnsupportedFileError(f"{path} is not a file; check the path.")
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise LimitExceededError(
            f"{path.name} is {size} bytes, over the limit of {limits.max_file_bytes}; "
            "raise PRUNEAPP_MAX_FILE_BYTES if the file is trusted."
        )
    return size


def _load(path: Path, limits: Limits) -> LoadedModel:
    size = checked_size(path, limits)
    kind = detect_kind(path)
    return _LOADERS[kind](path, size, limits)


def _load_zip(path: Path, size: int, limits: Limits) -> LoadedModel:
    with open(path, "rb") as fh:
        checks.check_zip_directory(fh, limits, path.name)
    with zipfile.ZipFile(path) as zf:
        layout = checks.check_zip(zf, size, limits, path.name)
        if layout.torchscript:
            return _load_script(path, size, zf, layout, limits)
        if _is_csr(path):
            return _load_csr(path, size, zf, layout, limits)
        pkl = zf.read(layout.pickle_name)
        dry = _dry_run(pkl, limits)
        checks.check_storage_records(dry.refs.values(), layout, path.name)
        if dry.foreign:
            obj = unpickling.unpickle(pkl, _zip_storages(zf, layout, path.name), limits)
        else:
            checks.verify_crc(zf, layout)
            obj = _torch_load(path)
    checks.validate_tree(obj, limits)
    return _from_object(obj, path, "torch-zip", size)


def _load_script(path: Path, size: int, zf: zipfile.ZipFile, layout: checks.ZipLayout, limits: Limits) -> LoadedModel:
    classes = unpickling.script_classes(checks.read_code(zf, layout, limits, path.name))
    pkl = zf.read(layout.pickle_name)
    dry = _dry_run(pkl, limits)
    checks.check_storage_records(dry.refs.values(), layout, path.name)
    obj = unpickling.unpickle(pkl, _zip_storages(zf, layout, path.name), limits)
    checks.validate_tree(obj, limits)
    weights = _tie(unpickling.script_state_dict(obj, classes))
    return LoadedModel(path, "torchscript", "torchscript", weights, notes=[SCRIPT_NOTE], file_bytes=size)


def _zip_storages(zf: zipfile.ZipFile, layout: checks.ZipLayout, name: str) -> unpickling.ZipStorages:
    if layout.big_endian:
        raise UnsupportedFileError(
            f"{name} was saved on a big-endian machine; load it there in trusted code and re-save: "
            "torch.save(model.state_dict(), 'model.pt')."
        )
    return unpickling.ZipStorages(zf, layout.prefix)


def _is_csr(path: Path) -> bool:
    from pruneapp.formats import _is_csr_zip  # formats imports this module

    return _is_csr_zip(path)


def _load_csr(path: Path, size: int, zf: zipfile.ZipFile, layout: checks.ZipLayout, limits: Limits) -> LoadedModel:
    """pruneapp's own CSR output, densified: checked like any torch zip, then loaded under sparse invariant checks.

    Its extras (optimizer state, epoch, ...) make it a checkpoint again; see _csr_checkpoint for the structure.
    """
    from pruneapp.formats import ALIASES_METADATA_KEY, densify_csr

    dry = unpickling.dry_run(zf.read(layout.pickle_name), limits, sparse_csr=True)
    checks.validate_tree(dry.tree, limits, meta=True)
    checks.check_storage_records(dry.refs.values(), layout, path.name)
    if dry.foreign:
        raise UnsafeFileError(f"{path.name} claims to be a pruneapp CSR file but names objects pruneapp never writes.")
    checks.verify_crc(zf, layout)
    try:
        obj = _torch_load(path, sparse=True)
    except RuntimeError as e:  # torch's sparse invariant checks
        raise CorruptFileError(f"{path.name} is not a readable CSR file ({_short(e)}); write it again.") from None
    weights = _tie(densify_csr(obj, limits, path.name))
    extras, metadata = obj.get("extras", {}), obj.get("metadata", {})
    if not isinstance(extras, dict) or not _str_dict(metadata):
        raise CorruptFileError(f"{path.name}: its CSR extras or metadata are malformed; write the file again.")
    checks.validate_tree(extras, limits)
    metadata = {k: v for k, v in metadata.items() if k != ALIASES_METADATA_KEY}  # the weights are re-tied already
    model = LoadedModel(path, "torch-zip", "state_dict", weights, metadata=metadata, notes=[CSR_NOTE], file_bytes=size)
    if extras:
        _csr_checkpoint(model, extras)
    return model


def _str_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items())


def _csr_checkpoint(model: LoadedModel, extras: dict[Any, Any]) -> None:
    """A CSR file of a checkpoint: dense outputs hold the weights under the first free known key, beside the extras.

    The CSR file does not record the input's weights key; the first free one of WEIGHT_KEYS reads back as the
    weights (every earlier one is an extra that is not a state_dict), so outputs read back with the same keys.
    """
    claimed = _weights_key(extras)
    free = [k for k in WEIGHT_KEYS if k not in extras]
    if not free or (claimed is not None and WEIGHT_KEYS.index(free[0]) > WEIGHT_KEYS.index(claimed)):
        names = ", ".join(map(repr, extras))
        model.notes.append(
            f"Left out the CSR file's extras ({names}): they leave no checkpoint key free for the weights."
        )
        return
    key = free[0]
    model.structure, model.weights_key, model.extras = "checkpoint", key, dict(extras)
    model.skeleton = {key: {k: (_WEIGHT, k) for k in model.weights}, **{k: (_EXTRA, k) for k in extras}}
    model.extra_bytes = {name: tensor_bytes(value) for name, value in extras.items()}
    model.notes.append(
        f"Kept its checkpoint entries ({', '.join(map(repr, extras))}); dense outputs hold the weights under {key!r}."
    )


def _load_legacy(path: Path, size: int, limits: Limits) -> LoadedModel:
    with open(path, "rb") as fh:
        layout = checks.check_legacy(fh, size, limits, path.name)
    checks.validate_tree(layout.dry_run.tree, limits, meta=True)
    if layout.dry_run.foreign:
        with open(path, "rb") as fh, open(path, "rb") as data:
            fh.seek(layout.pickle_start)
            obj = unpickling.unpickle(fh, unpickling.FileStorages(data, layout.offsets), limits)
    else:
        obj = _torch_load(path)
    checks.validate_tree(obj, limits)
    return _from_object(obj, path, "torch-legacy", size)


def _load_safetensors(path: Path, size: int, limits: Limits) -> LoadedModel:
    from safetensors.torch import load_file

    with open(path, "rb") as fh:
        header = checks.check_safetensors(fh, size, limits, path.name)
    loaded = load_file(str(path), device="cpu")
    if set(loaded) != set(header.entries):
        raise CorruptFileError(f"{path.name}'s tensors do not match its safetensors header; the file is damaged.")
    weights = {}
    for key, entry in header.entries.items():
        tensor = loaded[key]
        if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise CorruptFileError(f"{path.name}: tensor {key!r} does not match its safetensors header.")
        weights[key] = tensor
    checks.validate_tree(weights, limits)
    return LoadedModel(path, "safetensors", "safetensors", weights, metadata=dict(header.metadata), file_bytes=size)


def _load_zstd(path: Path, size: int, limits: Limits) -> LoadedModel:
    from pruneapp.formats import decompress_file

    with tempfile.TemporaryDirectory(prefix="pruneapp-") as tmp:
        inner = Path(tmp) / path.name  # messages about the content then name the file the user gave
        inner_bytes = decompress_file(path, inner, limits.max_decompressed_bytes)
        kind = detect_kind(inner)
        if kind == "zstd":
            raise UnsupportedFileError(f"{path.name} holds a zstd frame inside a zstd frame; decompress it first.")
        model = _LOADERS[kind](inner, inner_bytes, limits)
    model.path, model.kind, model.file_bytes = path, "zstd", size
    model.notes.insert(0, f"Decompressed from zstd ({inner_bytes} bytes).")
    return model


def _load_packed(path: Path, size: int, limits: Limits) -> LoadedModel:
    from pruneapp.packed import read_packed

    weights = read_packed(path, limits)
    checks.validate_tree(weights, limits)
    return LoadedModel(path, "pruneapp-packed", "state_dict", _tie(weights), file_bytes=size)


_LOADERS: dict[str, Callable[[Path, int, Limits], LoadedModel]] = {
    "torch-zip": _load_zip,
    "torchscript": _load_zip,
    "torch-legacy": _load_legacy,
    "safetensors": _load_safetensors,
    "zstd": _load_zstd,
    "pruneapp-packed": _load_packed,
}


def _dry_run(pkl: bytes, limits: Limits) -> unpickling.DryRun:
    dry = unpickling.dry_run(pkl, limits)
    checks.validate_tree(dry.tree, limits, meta=True)
    return dry


def _torch_load(path: Path, sparse: bool = False) -> Any:
    """torch.load with weights_only=True passed explicitly, and no environment variable allowed to weaken it.

    torch 2.13 lets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD override only an unset ``weights_only``, and raises when
    it is set together with TORCH_FORCE_WEIGHTS_ONLY_LOAD; removing it for the call covers both and later torches.
    ``sparse``: sparse tensors are validated as they load (the switch is process-wide, hence inside the lock).
    """
    with _TORCH_LOAD_LOCK:
        saved = os.environ.pop(_NO_WEIGHTS_ONLY_VAR, None)
        try:
            with _sparse_checks() if sparse else contextlib.nullcontext():
                return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
        finally:
            if saved is not None:
                os.environ[_NO_WEIGHTS_ONLY_VAR] = saved


@contextlib.contextmanager
def _sparse_checks() -> Iterator[None]:
    from pruneapp.formats import _sparse_quiet

    with _sparse_quiet(), torch.sparse.check_sparse_tensor_invariants():
        yield


# ---------------------------------------------------------------------------------------------------------------
# Structure: state_dict, checkpoint or pickled module


def _from_object(obj: Any, path: Path, kind: str, size: int) -> LoadedModel:
    if unpickling.is_module_standin(obj):
        weights = _tie(unpickling.module_state_dict(obj))
        return LoadedModel(path, kind, "pickled-module", weights, notes=[PICKLED_NOTE], file_bytes=size)
    if not isinstance(obj, dict):
        raise UnsupportedFileError(_not_a_state_dict(path.name, obj))
    if _is_tensor_tree(obj) and _weights_key(obj) is None:
        weights: dict[str, torch.Tensor] = {}
        skeleton = _skeleton(obj, "", weights)
        return LoadedModel(path, kind, "state_dict", _tie(weights), file_bytes=size, skeleton=skeleton)
    return _checkpoint(obj, path, kind, size)


def _not_a_state_dict(name: str, obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return (
            f"{name} holds a single tensor, not a state_dict; save a dict instead: torch.save({{'weight': t}}, PATH)."
        )
    what = obj.qualname if isinstance(obj, StandIn) else type(obj).__name__
    return f"{name} holds a {what}, not a model or state_dict; save model.state_dict() with torch.save instead."


def _is_tensor_tree(obj: Any) -> bool:
    """A dict whose leaves are all tensors (through nested dicts), with at least one tensor."""
    if not isinstance(obj, dict):
        return False
    found = False
    for value in obj.values():
        if isinstance(value, torch.Tensor):
            found = True
        elif isinstance(value, dict) and (not value or _is_tensor_tree(value)):
            found |= bool(value)
        else:
            return False
    return found


def _is_weights(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or _is_tensor_tree(value) or unpickling.is_module_standin(value)


def _weights_key(obj: dict[Any, Any]) -> str | None:
    for key in WEIGHT_KEYS:
        if key in obj and (_is_tensor_tree(obj[key]) or unpickling.is_module_standin(obj[key])):
            return key
    modules = [k for k, v in obj.items() if unpickling.is_module_standin(v)]
    return modules[0] if len(modules) == 1 and isinstance(modules[0], str) else None


def _checkpoint(obj: dict[Any, Any], path: Path, kind: str, size: int) -> LoadedModel:
    """A dict with weights under one known key (or tensors among other entries at its top level).

    A known key holding a state_dict makes a checkpoint even as the only entry: ``{"model": sd}`` is what a
    checkpoint's dense output holds once its unloadable entries are left out, and it must read back as ``sd``'s keys.
    """
    key = _weights_key(obj)
    model = LoadedModel(path, kind, "checkpoint", {}, file_bytes=size, weights_key=key)
    weights: dict[str, torch.Tensor] = {}
    skeleton = _empty_like(obj)
    for name, value in obj.items():
        if name == key and unpickling.is_module_standin(value):
            weights.update(unpickling.module_state_dict(value))
            skeleton[name] = (_FLAT,)
            model.notes.append(PICKLED_NOTE)
        elif name == key or (key is None and _is_weights(value) and not isinstance(value, StandIn)):
            skeleton[name] = _skeleton(value, "" if name == key else f"{name}.", weights)
        elif _holds_standin(value):
            model.notes.append(_left_out(name, value))
        else:
            model.extras[name] = value
            skeleton[name] = (_EXTRA, name)
    if not weights:
        raise UnsupportedFileError(_no_weights_message(path.name, obj))
    model.weights, model.skeleton = _tie(weights), skeleton
    model.extra_bytes = {name: tensor_bytes(value) for name, value in model.extras.items()}
    return model


def _no_weights_message(name: str, obj: dict[Any, Any]) -> str:
    keys = ", ".join(repr(k) for k in list(obj)[:8])
    return (
        f"{name} holds a dict without model weights (top-level keys: {keys}); pruneapp looks for a state_dict or "
        f"one of {', '.join(WEIGHT_KEYS[:4])}. Save model.state_dict() with torch.save."
    )


def _left_out(name: Any, value: Any) -> str:
    what = _first_standin(value)
    return (
        f"Left out checkpoint entry {name!r}: it holds a {what} object, which needs its code to load; "
        "the outputs do not include it."
    )


def _holds_standin(obj: Any) -> bool:
    return _first_standin(obj) is not None


def _first_standin(obj: Any) -> str | None:
    stack, visited = [obj], set()
    while stack:
        item = stack.pop()
        if isinstance(item, StandIn):
            return item.qualname
        if id(item) not in visited and (children := _container_children(item)) is not None:
            visited.add(id(item))
            stack.extend(children)
    return None


def _container_children(obj: Any) -> list[Any] | None:
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, list | tuple | set | frozenset):
        return list(obj)
    if isinstance(obj, StandIn):
        return unpickling.standin_children(obj)
    return None


def _dense_parts(t: torch.Tensor) -> list[torch.Tensor]:
    if t.layout == torch.sparse_coo:
        return [t._indices(), t._values()]
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return [t.crow_indices(), t.col_indices(), t.values()]
    if t.layout in (torch.sparse_csc, torch.sparse_bsc):
        return [t.ccol_indices(), t.row_indices(), t.values()]
    return [t]


# ---------------------------------------------------------------------------------------------------------------
# Flattening nested dicts to dotted keys, and back


def _empty_like(container: dict[Any, Any]) -> dict[Any, Any]:
    """An empty dict of the same type with the same attributes (e.g. state_dict()._metadata)."""
    out = type(container)()
    if hasattr(container, "__dict__"):
        out.__dict__.update(vars(container))
    return out


def _skeleton(tree: Any, prefix: str, weights: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, torch.Tensor):
        flat = prefix.removesuffix(".")
        if flat in weights:
            raise UnsupportedFileError(
                f"two entries of the file flatten to the same key {flat!r}; rename one of them and re-save."
            )
        weights[flat] = tree
        return (_WEIGHT, flat)
    skeleton = _empty_like(tree)
    for key, value in tree.items():
        skeleton[key] = _skeleton(value, f"{prefix}{key}.", weights)
    return skeleton


def _fill(skeleton: Any, weights: dict[str, torch.Tensor], extras: dict[Any, Any]) -> Any:
    out = _empty_like(skeleton)
    for key, value in skeleton.items():
        if isinstance(value, dict):
            out[key] = _fill(value, weights, extras)
        elif value[0] == _FLAT:
            out[key] = dict(weights)
        elif value[0] == _EXTRA and value[1] in extras:
            out[key] = extras[value[1]]
        elif value[0] == _WEIGHT and value[1] in weights:
            out[key] = weights[value[1]]
    return out


def _leaf_keys(skeleton: Any) -> list[str]:
    keys = []
    for value in skeleton.values():
        if isinstance(value, dict):
            keys.extend(_leaf_keys(value))
        elif value[0] == _WEIGHT:
            keys.append(value[1])
        elif value[0] == _FLAT:
            return []
    return keys


def _tie(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain tensors; keys that share one storage at the same offset, shape and stride get the very same object.

    Parameters become tensors without grad and conj/neg views are resolved, as ``state_dict()`` would give them.
    """
    plain: dict[int, torch.Tensor] = {}
    same: dict[tuple[Any, ...], torch.Tensor] = {}
    out = {}
    for key, t in weights.items():
        if type(t) is not torch.Tensor or t.requires_grad or t.is_conj() or t.is_neg():
            if id(t) not in plain:
                plain[id(t)] = t.detach().resolve_conj().resolve_neg()
            t = plain[id(t)]
        ptr = t.untyped_storage().data_ptr()
        if ptr == 0 or t.numel() == 0:
            out[key] = t
            continue
        signature = (ptr, t.dtype, t.storage_offset(), tuple(t.shape), t.stride())
        out[key] = same.setdefault(signature, t)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Errors


def _named(error: PruneAppError, name: str) -> PruneAppError:
    """The same error with the file's name in front, unless the message already names it."""
    message = str(error)
    if name in message:
        return error
    return type(error)(f"{name}: {message}")


def _translate(error: Exception, name: str) -> PruneAppError:
    if isinstance(error, MemoryError):
        return LimitExceededError(f"{name} needs more memory than is available to load; try a smaller model.")
    if isinstance(error, RecursionError):
        return UnsafeFileError(f"{name} nests objects too deeply to load safely; it was refused.")
    if isinstance(error, zipfile.BadZipFile):
        return CorruptFileError(f"{name} is a damaged zip archive ({_short(error)}); download or save it again.")
    return CorruptFileError(
        f"{name} could not be read: it is damaged or not a valid model file ({type(error).__name__}: "
        f"{_short(error)}); download or save it again."
    )


def _short(error: Exception) -> str:
    text = " ".join(str(error).split()) or "no details"
    return text if len(text) <= 160 else text[:157] + "..."
