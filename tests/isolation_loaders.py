"""Loaders that tests/test_isolation.py runs in the worker in place of load_model (called as loader(path, limits)).

Kept apart from the test module so that each forked worker imports only this small module, not pytest.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruneapp.errors import CorruptFileError, UnsafeFileError
from pruneapp.limits import Limits
from pruneapp.loading import LoadedModel
from pruneapp.unpickling import StandIn

MiB = 1024**2
DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.complex64,
    torch.complex128,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
]


def sample(dtype: torch.dtype, shape: tuple[int, ...] = (4, 3)) -> torch.Tensor:
    """Values of every dtype, with NaN, infinities and -0.0 where the dtype has them."""
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(shape, generator=g, dtype=torch.complex128 if dtype.is_complex else torch.float64)
        flat = t.view(-1)
        flat[:4] = torch.tensor([math.nan, math.inf, -math.inf, -0.0], dtype=flat.dtype)
        return t.to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    wide = torch.randint(-(2**62), 2**62, shape, generator=g, dtype=torch.int64)
    return wide.view(-1).view(torch.uint8)[: math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


def rich_model(path: str, limits: Limits) -> LoadedModel:
    """A model with every kind of content the transport must carry: all dtypes, views, ties, odd extras."""
    base = sample(torch.float32, (6, 8))
    weights: dict[str, torch.Tensor] = {f"dtype.{str(d)[6:]}": sample(d) for d in DTYPES}
    weights |= {
        "scalar": torch.tensor(3.5),
        "vector": torch.arange(5.0),
        "empty": torch.empty(0, 3),
        "transposed": base.t(),
        "rows": base[2:4],
        "every_other": base[:, ::2],
        "expanded": torch.ones(1).expand(5),
        "tied.a": base,
        "tied.b": base,
        "param": nn.Parameter(torch.ones(2)),
    }
    sub = [1, 2]
    cycle: list[Any] = []
    cycle.append(cycle)
    state = OrderedDict(w=base)
    state._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    namespace = type("StandIn[argparse.Namespace]", (StandIn,), {"__slots__": (), "qualname": "argparse.Namespace"})
    extras = {
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
            "param_groups": [{"lr": 0.1}],
        },
        "plain": [None, True, 2**80, -0.0, math.nan, "text", b"\x00\xff", bytearray(b"ab"), 1 + 2j],
        "containers": ((1, "a"), {1, 2}, frozenset({"x"}), Counter("aab"), slice(1, None, 2), range(0, 9, 3)),
        "torch": [torch.Size([2, 3]), torch.bfloat16, torch.strided, torch.device("cpu"), torch.nn.Parameter],
        "shared": [sub, sub],
        "cycle": cycle,
        "state": state,
        "same_as_weight": base,
        "standin": namespace(lr=0.1),
        "standin_class": namespace,
        "path": Path("runs/1"),
    }
    return LoadedModel(Path(path), "torch-zip", "checkpoint", weights, extras=extras, metadata={"k": "v"}, notes=["n"])


def hog_memory(path: str, limits: Limits) -> LoadedModel:
    chunks = []
    while True:
        chunks.append(torch.ones(4 * MiB))


def hog_cpu(path: str, limits: Limits) -> LoadedModel:
    while True:
        pass


def hang(path: str, limits: Limits) -> LoadedModel:
    time.sleep(3600)
    raise AssertionError("unreachable")


def crash(path: str, limits: Limits) -> LoadedModel:
    os.kill(os.getpid(), signal.SIGSEGV)
    raise AssertionError("unreachable")


def killed(path: str, limits: Limits) -> LoadedModel:
    """As the kernel's out-of-memory killer would end it."""
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


def refuse(path: str, limits: Limits) -> LoadedModel:
    raise UnsafeFileError(f"{Path(path).name}: refused for a test.")


def fail(path: str, limits: Limits) -> LoadedModel:
    raise ValueError("an unexpected bug\nwith a second line")


def fail_out_of_memory(path: str, limits: Limits) -> LoadedModel:
    try:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes")
    except RuntimeError as e:
        raise CorruptFileError("wrapped by the loader") from e


def unsendable(path: str, limits: Limits) -> LoadedModel:
    return LoadedModel(Path(path), "torch-zip", "checkpoint", {}, extras={"f": print})


def report_env(path: str, limits: Limits) -> LoadedModel:
    notes = [os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "unset"), str(limits.max_tensors)]
    return LoadedModel(Path(path), "torch-zip", "state_dict", {}, notes=notes)
