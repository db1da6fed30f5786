"""Load untrusted model files in a separate process bounded in memory, CPU time and wall time.

A fork server, started on first use with torch already imported, forks one fresh worker per load. The worker sets its
limits, runs ``pruneapp.loading.load_model`` and hands the result back through a private temp dir: each tensor storage
once in a safetensors file, everything else as JSON. No pickle crosses back, and the parent maps the safetensors file
instead of copying it, so isolation costs little time or memory. Needs Linux (fork, /proc, RLIMIT_AS).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import errno
import functools
import importlib
import itertools
import json
import math
import os
import queue
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import safetensors.torch
import torch
from torch._weights_only_unpickler import _get_allowed_globals

from pruneapp import errors, prestart
from pruneapp.errors import CorruptFileError, LimitExceededError, PruneAppError, UnsafeFileError
from pruneapp.limits import Limits, default_limits
from pruneapp.loading import LoadedModel
from pruneapp.units import human_bytes
from pruneapp.unpickling import StandIn

LOADER = "pruneapp.loading:load_model"
_MEMORY_EXIT = 3  # worker exit code: the load ran out of its memory allowance
_CRASH_EXIT = 70  # worker exit code: the worker itself failed before it could report
_RESULT, _TENSORS = "result.json", "tensors.safetensors"
_MAX_RESULT_BYTES = 256 * 1024**2
_GRACE_S = 30.0  # beyond the wall limit, how long the parent waits for the fork server before giving up on it
_POLL_S = 0.01  # how often the fork server checks on running workers
_OOM_TEXT = ("can't allocate memory", "Cannot allocate memory", "std::bad_alloc", "out of memory")
_CARRIERS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}  # storage bytes, by alignment
_ERROR_CLASSES = {c.__name__: c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, PruneAppError)}


@dataclass
class IsolatedLoad:
    """How one isolated load ended, with what it cost the worker."""

    model: LoadedModel | None
    error: PruneAppError | None
    seconds: float  # wall time as the caller saw it, handing the tensors back included
    worker_seconds: float
    cpu_seconds: float
    peak_rss_bytes: int  # the worker's ru_maxrss
    limit: str | None = None  # "memory" | "cpu" | "wall" when a worker limit stopped the load

    def result(self) -> LoadedModel:
        """The loaded model, or the error the load ended with."""
        if self.error is not None:
            raise self.error
        if self.model is None:
            raise RuntimeError("an isolated load ended with neither a model nor an error")
        return self.model


_SLOTS: dict[int, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


def _slots(n: int) -> threading.BoundedSemaphore:
    """One semaphore per configured count: at most ``n`` workers (each up to its memory budget) at once."""
    with _SLOTS_LOCK:
        return _SLOTS.setdefault(max(1, n), threading.BoundedSemaphore(max(1, n)))


@dataclass(frozen=True)
class _Budget:
    memory_bytes: int
    cpu_s: float
    wall_s: float


def load_isolated(
    path: str | Path,
    limits: Limits | None = None,
    timeout_s: float | None = None,
    memory_bytes: int | None = None,
    cpu_s: float | None = None,
) -> LoadedModel:
    """``load_model(path, limits)`` in a worker process; budgets default to ``limits.worker_*``.

    A worker stopped by a budget raises LimitExceededError, a crashed one UnsafeFileError.
    """
    return run_isolated(path, limits, timeout_s=timeout_s, memory_bytes=memory_bytes, cpu_s=cpu_s).result()


def run_isolated(
    path: str | Path,
    limits: Limits | None = None,
    *,
    timeout_s: float | None = None,
    memory_bytes: int | None = None,
    cpu_s: float | None = None,
    loader: str = LOADER,
) -> IsolatedLoad:
    """Like load_isolated, but report the outcome and the worker's cost instead of raising.

    ``loader`` ("module:function", called as ``f(path, limits)``) replaces load_model, for tests.
    """
    limits = limits or default_limits()
    budget = _Budget(
        memory_bytes if memory_bytes is not None else limits.worker_memory_bytes,
        cpu_s if cpu_s is not None else limits.worker_cpu_seconds,
        timeout_s if timeout_s is not None else limits.worker_wall_seconds,
    )
    out = Path(tempfile.mkdtemp(prefix="pruneapp-load-"))
    start = time.perf_counter()
    model, error = None, None
    try:
        with _slots(limits.max_concurrent_loads):
            reply = _server().run(_request(path, out, limits, budget, loader), budget.wall_s + _GRACE_S)
        try:
            model = _outcome(reply, budget, out, Path(path).name)
        except PruneAppError as exc:
            error = exc
    finally:
        shutil.rmtree(out, ignore_errors=True)  # mapped tensors keep the unlinked file's data until they are freed
    seconds = time.perf_counter() - start
    limit = _limit_hit(reply, budget)
    return IsolatedLoad(model, error, seconds, reply["seconds"], reply["cpu_s"], reply["maxrss_kb"] * 1024, limit)


def _request(path: str | Path, out: Path, limits: Limits, budget: _Budget, loader: str) -> dict[str, Any]:
    return {
        "path": os.fspath(path),
        "cwd": os.getcwd(),
        "out": str(out),
        "limits": dataclasses.asdict(limits),
        "loader": loader,
        **dataclasses.asdict(budget),
    }


# ---------------------------------------------------------------------------------------------------------------
# Parent side: what the worker's exit and files mean


def _outcome(reply: dict[str, Any], budget: _Budget, out: Path, name: str) -> LoadedModel:
    limit = _limit_hit(reply, budget)
    if limit is not None:
        raise LimitExceededError(f"Loading {name} stopped: {_limit_message(limit, budget)}")
    if reply["exit"] == -signal.SIGKILL:
        raise UnsafeFileError(
            f"Loading {name} stopped: the system killed the loading process, most likely for lack of memory; "
            "set PRUNEAPP_WORKER_MEMORY_BYTES below the memory this machine has free."
        )
    if reply["exit"] != 0:
        raise UnsafeFileError(
            f"Loading {name} stopped: the loading process crashed ({_exit_text(reply['exit'])}); "
            "the file is damaged or built to crash readers."
        )
    result = _read_result(out / _RESULT)
    if "error" in result:
        raise _error_from(result["error"])
    try:
        model = _Decoder(safetensors.torch.load_file(out / _TENSORS)).decode(result["model"])
    except PruneAppError:
        raise
    except Exception as exc:  # the worker's files are untrusted too: any inconsistency is a refusal
        raise CorruptFileError(f"the loading process sent back an unreadable result ({exc}).") from None
    if not isinstance(model, LoadedModel):
        raise CorruptFileError("the loading process sent back something other than a loaded model.")
    return model


def _limit_hit(reply: dict[str, Any], budget: _Budget) -> str | None:
    code = reply["exit"]
    if reply["timed_out"]:
        return "wall"
    if code == _MEMORY_EXIT:
        return "memory"
    if code == -signal.SIGXCPU or (code == -signal.SIGKILL and reply["cpu_s"] >= budget.cpu_s):
        return "cpu"
    return None


def _limit_message(limit: str, budget: _Budget) -> str:
    fix = "if the model really is that large, raise"
    if limit == "memory":
        needed = f"the file needed more than {human_bytes(budget.memory_bytes)} of memory"
        return f"{needed}; {fix} PRUNEAPP_WORKER_MEMORY_BYTES."
    if limit == "cpu":
        return f"reading the file used more than {budget.cpu_s:g} s of CPU time; {fix} PRUNEAPP_WORKER_CPU_SECONDS."
    return f"reading the file took longer than {budget.wall_s:g} s; {fix} PRUNEAPP_WORKER_WALL_SECONDS."


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def _read_result(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > _MAX_RESULT_BYTES:
            raise CorruptFileError("the loading process sent back an oversized result.")
        result = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise CorruptFileError(f"the loading process sent back no readable result ({exc}).") from None
    if not isinstance(result, dict):
        raise CorruptFileError("the loading process sent back a malformed result.")
    return result


def _error_from(record: Any) -> PruneAppError:
    if not isinstance(record, dict):
        return CorruptFileError("the loading process sent back a malformed error.")
    cls = _ERROR_CLASSES.get(str(record.get("class")), CorruptFileError)
    return cls(str(record.get("message", "the file could not be read.")))


# ---------------------------------------------------------------------------------------------------------------
# The fork server and the parent's handle on it


class _ForkServer:
    """The parent's side of the fork server: a pipe for requests and a thread that routes each reply to its caller."""

    def __init__(self) -> None:
        self.proc = prestart.take()
        self._lock = threading.Lock()
        self._waiting: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._ids = itertools.count()
        threading.Thread(target=self._route, name="pruneapp-isolation", daemon=True).start()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, request: dict[str, Any], wait_s: float) -> dict[str, Any]:
        """Send one request and wait for its reply (the server enforces the wall limit; ``wait_s`` is a backstop)."""
        box: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=1)
        with self._lock:
            rid = next(self._ids)
            self._waiting[rid] = box
            try:
                self.proc.stdin.write(json.dumps({**request, "id": rid}).encode() + b"\n")  # type: ignore[union-attr]
                self.proc.stdin.flush()  # type: ignore[union-attr]
            except OSError:
                box.put({"lost": True})
        try:
            reply = box.get(timeout=wait_s)
        except queue.Empty:
            self.close()
            reply = {"lost": True}
        finally:
            with self._lock:
                self._waiting.pop(rid, None)
        if reply.get("lost"):
            raise RuntimeError("the isolated loading process stopped unexpectedly; see its messages on stderr.")
        return reply

    def _route(self) -> None:
        with self.proc.stdout:  # type: ignore[union-attr]
            for line in self.proc.stdout:  # type: ignore[union-attr]
                reply = json.loads(line)
                with self._lock:
                    box = self._waiting.get(reply["id"])
                if box is not None:
                    box.put(reply)
        with self._lock:
            for box in self._waiting.values():
                with contextlib.suppress(queue.Full):
                    box.put_nowait({"lost": True})

    def close(self) -> None:
        """End the server: it kills its running workers when its stdin closes."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Servers:
    current: _ForkServer | None = None
    lock = threading.Lock()


def _server() -> _ForkServer:
    with _Servers.lock:
        server = _Servers.current
        if server is None or not server.alive:
            if server is None:
                atexit.register(shutdown)
            else:
                server.close()
            server = _Servers.current = _ForkServer()
        return server


def shutdown() -> None:
    """Stop the loading server (a one-shot command frees its memory; the next load starts a new one)."""
    with _Servers.lock:
        if _Servers.current is not None:
            _Servers.current.close()
            _Servers.current = None


@dataclass
class _Job:
    id: int
    started: float
    deadline: float
    timed_out: bool = False


def serve() -> None:
    """The fork server: one JSON request per line on stdin, one JSON reply per finished worker on stdout."""
    jobs: dict[int, _Job] = {}
    pending = b""
    while True:
        ready, _, _ = select.select([0], [], [], _POLL_S if jobs else None)
        if ready:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in filter(None, lines):
                _start(json.loads(line), jobs)
        _reap(jobs)
        _enforce_deadlines(jobs)
    for pid in jobs:
        _kill(pid)


def _start(request: dict[str, Any], jobs: dict[int, _Job]) -> None:
    now = time.perf_counter()
    try:
        pid = os.fork()
    except OSError:
        _reply({"id": request["id"], "lost": True})
        return
    if pid == 0:
        code = _CRASH_EXIT
        try:
            code = _work(request)
        finally:
            os._exit(code)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)
    jobs[pid] = _Job(request["id"], now, now + request["wall_s"])


def _reap(jobs: dict[int, _Job]) -> None:
    while jobs:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        job = jobs.pop(pid, None)
        if job is None:
            continue
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)  # anything the worker left running
        _reply(
            {
                "id": job.id,
                "exit": os.waitstatus_to_exitcode(status),
                "timed_out": job.timed_out,
                "seconds": time.perf_counter() - job.started,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "maxrss_kb": usage.ru_maxrss,
            }
        )


def _enforce_deadlines(jobs: dict[int, _Job]) -> None:
    now = time.perf_counter()
    for pid, job in jobs.items():
        if not job.timed_out and now > job.deadline:
            job.timed_out = True
            _kill(pid)


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _reply(message: dict[str, Any]) -> None:
    os.write(1, json.dumps(message).encode() + b"\n")


# ---------------------------------------------------------------------------------------------------------------
# Worker side


def _work(request: dict[str, Any]) -> int:
    """In the forked worker: confine the process, load the file, write the result; the exit code says how it ended."""
    _confine(request)
    out = Path(request["out"])
    try:
        module, _, name = request["loader"].partition(":")
        loader = getattr(importlib.import_module(module), name)
        _send(loader(request["path"], Limits(**request["limits"])), out)
    except Exception as exc:  # every failure is reported; the parent turns it into a PruneAppError
        if _out_of_memory(exc):
            return _MEMORY_EXIT
        _write_json(out / _RESULT, {"error": _describe(exc)})
    return 0


def _confine(request: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the server
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # the server's stdout is its reply channel
    os.close(devnull)
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    os.chdir(request["cwd"])
    torch.set_num_threads(1)
    _set_limits(request["memory_bytes"], request["cpu_s"])


def _set_limits(memory_bytes: int, cpu_s: float) -> None:
    _lower(resource.RLIMIT_CORE, 0)
    cpu = max(1, math.ceil(cpu_s))
    _lower(resource.RLIMIT_CPU, cpu, cpu + 1)  # SIGXCPU at the soft limit, SIGKILL a second later
    with contextlib.suppress(OSError):
        with open("/proc/self/statm") as fh:
            mapped = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _lower(resource.RLIMIT_AS, mapped + memory_bytes)  # what is mapped now (torch, Python) is not the file's


def _lower(kind: int, soft: int, hard: int | None = None) -> None:
    hard = soft if hard is None else hard
    _, current = resource.getrlimit(kind)
    if current != resource.RLIM_INFINITY:
        hard = min(hard, current)
    resource.setrlimit(kind, (min(soft, hard), hard))


def _out_of_memory(exc: BaseException | None) -> bool:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
            return True
        if isinstance(exc, RuntimeError) and any(text in str(exc) for text in _OOM_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _describe(exc: Exception) -> dict[str, str]:
    for cls in type(exc).__mro__:
        if _ERROR_CLASSES.get(cls.__name__) is cls:
            return {"class": cls.__name__, "message": str(exc)}
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return {
        "class": "CorruptFileError",
        "message": f"the file could not be read ({type(exc).__name__}: {first}); it is damaged or not a model file.",
    }


def _send(model: LoadedModel, out: Path) -> None:
    encoder = _Encoder()
    tree = encoder.encode(model)
    safetensors.torch.save_file(encoder.carriers, out / _TENSORS)
    _write_json(out / _RESULT, {"model": tree})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj))


# ---------------------------------------------------------------------------------------------------------------
# The transport: objects as JSON nodes, tensors as views of storages written once


@functools.cache
def _torch_globals() -> dict[str, Any]:
    """Objects a weights-only pickle may name (tensor classes, storage types, ...), by their dotted name."""
    return dict(_get_allowed_globals())


@functools.cache
def _global_names() -> dict[int, str]:
    return {id(v): k for k, v in _torch_globals().items()}


_TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)
_MAPPINGS = {dict: "dict", OrderedDict: "odict", Counter: "counter"}
_SEQUENCES = {list: "list", tuple: "tuple", set: "set", frozenset: "frozenset", torch.Size: "size"}
_ATOMS = (type(None), bool, int, float, str)


class _Encoder:
    """Turns a loaded model into JSON-ready nodes; every object, tensor and storage is written once, then referenced."""

    def __init__(self) -> None:
        self.memo: dict[int, int] = {}
        self.keep: list[Any] = []  # holds encoded objects so that their ids stay unique
        self.carriers: dict[str, torch.Tensor] = {}
        self.storage_entry: dict[Any, str] = {}

    def encode(self, obj: Any) -> Any:
        if type(obj) in _ATOMS:
            return obj
        if id(obj) in self.memo:
            return {"t": "ref", "n": self.memo[id(obj)]}
        if id(obj) in _global_names():
            return {"t": "global", "name": _global_names()[id(obj)]}
        if isinstance(obj, _TORCH_ENUMS):
            return {"t": "torch", "name": str(obj).removeprefix("torch.")}
        self.memo[id(obj)] = n = len(self.keep)
        self.keep.append(obj)
        return {**self._node(obj), "n": n}

    def _node(self, obj: Any) -> dict[str, Any]:
        kind = type(obj)
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        if kind in _MAPPINGS:  # attrs: e.g. the _metadata that torch keeps on a state_dict
            node = {"t": _MAPPINGS[kind], "items": [[self.encode(k), self.encode(v)] for k, v in obj.items()]}
            if getattr(obj, "__dict__", None):
                node["attrs"] = self.encode(vars(obj))
            return node
        if kind in _SEQUENCES:
            return {"t": _SEQUENCES[kind], "items": [self.encode(v) for v in obj]}
        if isinstance(obj, StandIn):
            return {
                "t": "standin",
                "qualname": kind.qualname,
                "slots": [self.encode(getattr(obj, s)) for s in StandIn.__slots__],
            }
        if isinstance(obj, type) and issubclass(obj, StandIn):
            return {"t": "standin-class", "qualname": obj.qualname}
        return self._scalar(obj)

    def _scalar(self, obj: Any) -> dict[str, Any]:
        kind = type(obj)
        if kind in (bytes, bytearray):
            return {"t": kind.__name__, "hex": obj.hex()}
        if kind is complex:
            return {"t": "complex", "items": [obj.real, obj.imag]}
        if kind in (slice, range):
            return {"t": kind.__name__, "items": [self.encode(obj.start), self.encode(obj.stop), self.encode(obj.step)]}
        if kind is torch.device:
            return {"t": "device", "name": str(obj)}
        if isinstance(obj, PurePath):
            return {"t": "path", "name": str(obj)}
        if kind.__module__.split(".")[0] == "pruneapp" and hasattr(obj, "__dict__"):
            return {"t": "obj", "cls": f"{kind.__module__}:{kind.__qualname__}", "state": self.encode(vars(obj))}
        raise TypeError(f"a {kind.__module__}.{kind.__qualname__} cannot be handed back from the loading process")

    def _tensor(self, t: torch.Tensor) -> dict[str, Any]:
        if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu" or t.is_conj() or t.is_neg():
            raise TypeError(f"a {t.layout} {t.dtype} tensor on {t.device} cannot be handed back")
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes()) if storage.nbytes() else id(t)
        if key not in self.storage_entry:
            entry = self.storage_entry[key] = f"s{len(self.carriers)}"
            self.carriers[entry] = _carrier(storage, t.element_size())
        return {
            "t": "tensor",
            "entry": self.storage_entry[key],
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "stride": list(t.stride()),
            "offset": t.storage_offset(),
            "grad": t.requires_grad,
            "param": isinstance(t, torch.nn.Parameter),
        }


def _carrier(storage: torch.UntypedStorage, itemsize: int) -> torch.Tensor:
    """The storage's bytes as a 1-D integer tensor as wide as its elements, so the file keeps them aligned."""
    nbytes = storage.nbytes()
    width = next(w for w in _CARRIERS if w <= max(itemsize, 1) and nbytes % w == 0)
    return torch.empty(0, dtype=_CARRIERS[width]).set_(storage, 0, (nbytes // width,), (1,))


class _Decoder:
    """Rebuilds objects from _Encoder nodes; tensors become views of the mapped safetensors entries."""

    def __init__(self, carriers: dict[str, torch.Tensor]) -> None:
        self.carriers = carriers
        self.nodes: dict[int, Any] = {}
        self.standins: dict[str, type[StandIn]] = {}

    def decode(self, node: Any) -> Any:
        if not isinstance(node, dict):  # repeated strings become one object again, as they were in the pickle
            return sys.intern(node) if type(node) is str else node
        kind = node["t"]
        if kind == "ref":
            return self.nodes[node["n"]]
        if kind in ("global", "torch"):
            return self._named(kind, node["name"])
        if kind in ("dict", "odict", "counter", "list", "set", "standin", "obj"):
            return self._container(kind, node)
        return self._keep(node, self._value(kind, node))

    def _keep(self, node: dict[str, Any], value: Any) -> Any:
        self.nodes[node["n"]] = value
        return value

    def _container(self, kind: str, node: dict[str, Any]) -> Any:
        """Mutable containers are registered before their contents, so contents may refer back to them."""
        if kind == "standin":
            obj = self._keep(node, self._standin_class(node["qualname"]).__new__(self._standin_class(node["qualname"])))
            for slot, value in zip(StandIn.__slots__, node["slots"], strict=True):
                setattr(obj, slot, self.decode(value))
            return obj
        if kind == "obj":
            cls = _pruneapp_class(node["cls"])
            obj = self._keep(node, cls.__new__(cls))
            vars(obj).update(self.decode(node["state"]))
            return obj
        if kind in ("list", "set"):
            items = self._keep(node, list() if kind == "list" else set())
            for v in node["items"]:
                items.append(self.decode(v)) if kind == "list" else items.add(self.decode(v))
            return items
        mapping = self._keep(node, {"dict": dict, "odict": OrderedDict, "counter": Counter}[kind]())
        for k, v in node["items"]:
            mapping[self.decode(k)] = self.decode(v)
        if "attrs" in node:
            vars(mapping).update(self.decode(node["attrs"]))
        return mapping

    def _value(self, kind: str, node: dict[str, Any]) -> Any:
        if kind == "tensor":
            return self._tensor(node)
        if kind in ("tuple", "frozenset", "size"):
            return {"tuple": tuple, "frozenset": frozenset, "size": torch.Size}[kind](map(self.decode, node["items"]))
        if kind in ("bytes", "bytearray"):
            return {"bytes": bytes, "bytearray": bytearray}[kind].fromhex(node["hex"])
        if kind == "complex":
            return complex(*node["items"])
        if kind in ("slice", "range"):
            return {"slice": slice, "range": range}[kind](*map(self.decode, node["items"]))
        if kind == "device":
            return torch.device(node["name"])
        if kind == "path":
            return Path(node["name"])
        if kind == "standin-class":
            return self._standin_class(node["qualname"])
        raise ValueError(f"unknown node type {kind!r}")

    def _named(self, kind: str, name: str) -> Any:
        if kind == "global":
            return _torch_globals()[name]
        value = getattr(torch, name)
        if not isinstance(value, _TORCH_ENUMS):
            raise ValueError(f"torch.{name} is not a dtype, layout, memory format or qscheme")
        return value

    def _standin_class(self, qualname: str) -> type[StandIn]:
        if qualname not in self.standins:
            attrs = {"__slots__": (), "qualname": qualname}
            self.standins[qualname] = type(f"StandIn[{qualname}]", (StandIn,), attrs)
        return self.standins[qualname]

    def _tensor(self, node: dict[str, Any]) -> torch.Tensor:
        carrier = self.carriers[node["entry"]]
        dtype = self._named("torch", node["dtype"])
        shape, stride, offset = node["shape"], node["stride"], node["offset"]
        base, rem = divmod(carrier.storage_offset() * carrier.element_size(), dtype.itemsize)
        if rem or not _in_bounds(shape, stride, offset, dtype.itemsize, carrier.untyped_storage().nbytes()):
            raise ValueError(f"tensor view {shape}/{stride}+{offset} does not fit its storage")
        t = torch.empty(0, dtype=dtype).set_(carrier.untyped_storage(), base + offset, shape, stride)
        if node["param"]:
            return torch.nn.Parameter(t, requires_grad=node["grad"])
        return t.requires_grad_(node["grad"])


def _in_bounds(shape: list[int], stride: list[int], offset: int, itemsize: int, nbytes: int) -> bool:
    if offset < 0 or any(s < 0 for s in shape) or any(s < 0 for s in stride) or len(shape) != len(stride):
        return False
    if 0 in shape:
        return True
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    return (last + 1) * itemsize <= nbytes


def _pruneapp_class(name: str) -> type:
    """A class of pruneapp itself, by "module:qualname"; the worker may name no other."""
    module, _, qualname = name.partition(":")
    if module.split(".")[0] != "pruneapp":
        raise ValueError(f"{name} is not a pruneapp class")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if not isinstance(cls, type) or cls.__module__ != module:
        raise ValueError(f"{name} is not a pruneapp class")
    return cls
