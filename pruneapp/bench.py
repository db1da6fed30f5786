"""Benchmark pruneapp against what users would otherwise run, on this machine, in one run.

Three parts: pruning wall time and peak memory of the CLI against ``torch.nn.utils.prune`` (each a fresh
subprocess, beyond a shared load-and-save floor); each output format's size against the reference bound; and
encode/decode throughput against plain zstd of the dense file. ``python -m pruneapp bench --help`` lists the options.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zstandard

from pruneapp.entropy import reference_bound_bytes
from pruneapp.formats import read_weights, write_outputs
from pruneapp.loading import LoadedModel, load_model
from pruneapp.pruning import PruneSettings, prune

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "assets" / "demo_digits.pt"
SPARSITIES = (0.5, 0.7, 0.9, 0.95, 0.99)
TARGET_SPARSITIES = (0.5, 0.7, 0.9, 0.95)  # where the packed size targets apply
SIZE_FORMATS = ("dense", "csr", "dense.zst", "csr.zst", "packed")
SPEED_SPARSITY = 0.9
ZSTD_LEVEL = 3
FULL_PARAMS = (10_000_000, 30_000_000, 100_000_000)
QUICK_PARAMS = (2_000_000,)
FULL_SIZES_PARAMS = 16_000_000
QUICK_SIZES_PARAMS = 500_000
MB = 1e6
MIN_TIMED_BYTES = 10 * MB  # the decode-speed target is checked on models at least this large

# Children are self-contained scripts (argv: input, output, sparsity) so that neither imports pruneapp; each prints
# its stage times as one JSON line.
FLOOR_CODE = """\
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
sd = torch.load(sys.argv[1], weights_only=True)
t2 = time.perf_counter()
torch.save(sd, sys.argv[2])
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "save": t3 - t2}))
"""

TORCH_CODE = """\
import json, sys, time
t0 = time.perf_counter()
import torch
from torch import nn
from torch.nn.utils import prune
t1 = time.perf_counter()
sd = torch.load(sys.argv[1], weights_only=True)
t2 = time.perf_counter()
modules = {}
for name, t in sd.items():
    if t.dim() < 2 or not t.is_floating_point():
        continue
    with torch.device("meta"):  # shells only: the loaded tensors become their parameters, uncopied
        if t.dim() == 2 and "embed" in name:
            m = nn.Embedding(t.shape[0], t.shape[1])
        elif t.dim() == 2:
            m = nn.Linear(t.shape[1], t.shape[0], bias=False)
        else:
            m = nn.Module()
    m.weight = nn.Parameter(t)
    modules[name] = m
params = [(m, "weight") for m in modules.values()]
prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=float(sys.argv[3]))
t3 = time.perf_counter()
for m in modules.values():
    prune.remove(m, "weight")
t4 = time.perf_counter()
out = dict(sd)
for name, m in modules.items():
    out[name] = m.weight.data
torch.save(out, sys.argv[2])
t5 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "prune": t3 - t2, "remove": t4 - t3, "save": t5 - t4}))
"""


# ---------------------------------------------------------------- machine and synthetic models


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": _memory_gb(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "zstandard": zstandard.__version__,
        "load_average_at_start": _load_average(),
    }


def _load_average() -> float | None:
    """1-minute load average: other work on the machine slows every number, so the output states it."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        return None


def transformer_shapes(n_params: int) -> dict[str, tuple[int, ...]]:
    """Shapes of a GPT-like encoder with about ``n_params`` parameters: embedding, attention, MLP, LayerNorms."""
    d = 128 if n_params < 2_000_000 else 256 if n_params < 8_000_000 else 512 if n_params < 30_000_000 else 1024
    per_layer = 12 * d * d + 13 * d
    layers = max(1, int(0.9 * n_params) // per_layer)
    vocab = max(d, (n_params - layers * per_layer - 2 * d) // d)
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (vocab, d)}
    for i in range(layers):
        p = f"layers.{i}."
        shapes |= {
            p + "ln1.weight": (d,),
            p + "ln1.bias": (d,),
            p + "attn.qkv.weight": (3 * d, d),
            p + "attn.qkv.bias": (3 * d,),
            p + "attn.out.weight": (d, d),
            p + "attn.out.bias": (d,),
            p + "ln2.weight": (d,),
            p + "ln2.bias": (d,),
            p + "mlp.fc1.weight": (4 * d, d),
            p + "mlp.fc1.bias": (4 * d,),
            p + "mlp.fc2.weight": (d, 4 * d),
            p + "mlp.fc2.bias": (d,),
        }
    return shapes | {"ln_f.weight": (d,), "ln_f.bias": (d,)}


def synthetic_weights(n_params: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic fp32 weights shaped like a transformer, with trained-looking (not uniform) statistics.

    Matrices: Laplace values with per-row log-normal scales around 1/sqrt(fan_in); LayerNorm weights near 1;
    biases small. Synthetic all the same: the benchmark labels every number measured on them as such.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in transformer_shapes(n_params).items():
        if len(shape) == 2:
            sign = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).float().mul_(2).sub_(1)
            t = torch.empty(shape).exponential_(generator=gen).mul_(sign)
            rows = torch.randn(shape[0], 1, generator=gen).mul_(0.3).exp_()
            out[name] = t.mul_(rows / math.sqrt(2 * shape[1]))
        elif name.endswith("ln1.weight") or name.endswith("ln2.weight") or name == "ln_f.weight":
            out[name] = 1 + 0.05 * torch.randn(shape, generator=gen)
        else:
            out[name] = 0.02 * torch.randn(shape, generator=gen)
    return out


def write_synthetic(n_params: int, path: Path, seed: int = 0) -> int:
    """torch.save a synthetic state_dict to ``path``; returns its parameter count."""
    weights = synthetic_weights(n_params, seed)
    torch.save(weights, path)
    return sum(t.numel() for t in weights.values())


# ---------------------------------------------------------------- speed and memory (subprocesses)


# Measures one command from a small process: a child spawned straight from the benchmark would inherit the
# benchmark's own peak RSS (Linux carries the old address space's high-water mark across exec, and vfork shares it).
# While the command runs with children of its own (an isolated load), its tree's RSS is polled every 10 ms and, at
# each new high, the PSS of the tree is read (smaps_rollup is too slow to read that often), because ru_maxrss is the
# largest single process, not their sum. argv: result path, command...
WRAPPER_CODE = """\
import json, os, sys, time

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

def tree(pid):
    found = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [q for c in f.read().split() for q in tree(int(c))]
    except OSError:
        pass
    return found

def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KIB
    except (OSError, ValueError, IndexError):
        return 0

def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
    except OSError:
        return 0

t0 = time.perf_counter()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
tree_peak = rss_high = 0
while True:
    done, status, usage = os.wait4(pid, os.WNOHANG)
    if done:
        break
    procs = tree(pid)
    if len(procs) > 1:
        rss = sum(rss_kib(p) for p in procs)
        if rss > rss_high * 1.01:
            rss_high = rss
            tree_peak = max(tree_peak, sum(pss_kib(p) for p in procs))
    time.sleep(0.01)
seconds = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump({"status": status, "maxrss": usage.ru_maxrss, "tree_pss_kib": tree_peak, "seconds": seconds}, f)
"""


@dataclass
class ProcessRun:
    seconds: float  # wall time, from spawn to exit (Python start-up and imports included)
    peak_rss: int  # bytes: ru_maxrss of the process, or the sampled PSS of its process tree where larger
    stages: dict[str, float] = field(default_factory=dict)  # the child's own timings, if it printed them


def run_process(cmd: Sequence[str], timeout: float = 1800.0, env: dict[str, str] | None = None) -> ProcessRun:
    """Run ``cmd`` as a fresh process: its wall time and its own peak RSS, never mixed with another's."""
    with tempfile.TemporaryDirectory(prefix="pruneapp-run-") as tmp:
        result, out, err = Path(tmp) / "rusage.json", Path(tmp) / "stdout", Path(tmp) / "stderr"
        wrapped = [sys.executable, "-S", "-c", WRAPPER_CODE, str(result), *cmd]
        with out.open("wb") as fout, err.open("wb") as ferr:
            proc = subprocess.Popen(wrapped, stdout=fout, stderr=ferr, env=env, start_new_session=True)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                raise RuntimeError(f"{' '.join(cmd[:4])} ... ran over {timeout:.0f} s and was stopped") from None
        usage = json.loads(result.read_text()) if result.exists() else {"status": -1}
        code = os.waitstatus_to_exitcode(usage["status"]) if usage["status"] >= 0 else proc.returncode
        if code != 0:
            tail = " | ".join(err.read_text(errors="replace").strip().splitlines()[-5:])
            raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {code}: {tail}")
        stages = _last_json(out.read_text(errors="replace"))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peak = max(usage["maxrss"] * scale, usage["tree_pss_kib"] * 1024)
    return ProcessRun(seconds=usage["seconds"], peak_rss=peak, stages=stages)


def _last_json(text: str) -> dict[str, float]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return {k: v for k, v in json.loads(line).items() if isinstance(v, (int, float))}
            except json.JSONDecodeError:
                return {}
    return {}


def child_env() -> dict[str, str]:
    """The caller's environment, with this checkout importable as ``pruneapp``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def speed_commands(model: Path, work: Path) -> dict[str, list[str]]:
    """The three measured commands on the same input file."""
    py, s = sys.executable, str(SPEED_SPARSITY)
    pruneapp_cmd = [py, "-m", "pruneapp", "prune", str(model), "--method", "global-l1", "--sparsity", s]
    return {
        "import": [py, "-c", "import torch"],
        "floor": [py, "-c", FLOOR_CODE, str(model), str(work / "floor.pt"), s],
        "pruneapp": pruneapp_cmd + ["--formats", "dense", "--out", str(work / "pruneapp"), "--force", "--quiet"],
        "torch": [py, "-c", TORCH_CODE, str(model), str(work / "torch.pt"), s],
    }


def measure_speed(n_params: int, work: Path, repeat: int = 1, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time and peak RSS of importing torch, the floor, the pruneapp CLI and torch.nn.utils.prune on one model."""
    model = work / f"synthetic-{n_params}.pt"
    actual = write_synthetic(n_params, model)
    model_bytes = 4 * actual
    _warm_cache(model)
    runs: dict[str, ProcessRun] = {}
    env = child_env()
    for name, cmd in speed_commands(model, work).items():
        log(f"  {actual / 1e6:.1f}M params: {name} ...")
        tries = [run_process(cmd, env=env) for _ in range(repeat)]
        runs[name] = min(tries, key=lambda r: r.seconds)
        runs[name].peak_rss = max(r.peak_rss for r in tries)
    runs["pruneapp"].stages = _report_seconds(work / "pruneapp" / "report.json")
    row = speed_row(actual, model_bytes, runs)
    row["agreement"] = compare_outputs(work / "pruneapp" / f"{model.stem}.pruned.pt", work / "torch.pt")
    for p in (model, work / "floor.pt", work / "torch.pt"):
        p.unlink(missing_ok=True)
    return row


def _report_seconds(path: Path) -> dict[str, float]:
    """The stage times pruneapp wrote into its report.json (load, prune, encode, measure)."""
    try:
        return dict(json.loads(path.read_text()).get("seconds", {}))
    except (OSError, ValueError):
        return {}


def _warm_cache(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(1 << 24):
            pass


def speed_row(n_params: int, model_bytes: int, runs: dict[str, ProcessRun]) -> dict[str, Any]:
    """Derived numbers: time beyond the floor, the torch/pruneapp ratio, peak RSS as a multiple of the model.

    The ratio is None when pruneapp's time beyond the floor is not positive (lost in the noise of one run).
    """
    floor, imported = runs["floor"].seconds, runs["import"].peak_rss
    beyond = {k: runs[k].seconds - floor for k in ("pruneapp", "torch")}
    return {
        "params": n_params,
        "model_bytes": model_bytes,
        "seconds": {k: r.seconds for k, r in runs.items()},
        "beyond_floor_seconds": beyond,
        "ratio_torch_over_pruneapp": beyond["torch"] / beyond["pruneapp"] if beyond["pruneapp"] > 0 else None,
        "peak_rss_bytes": {k: r.peak_rss for k, r in runs.items()},
        "peak_rss_over_model": {k: r.peak_rss / model_bytes for k, r in runs.items()},
        "peak_rss_beyond_import_over_model": {k: (r.peak_rss - imported) / model_bytes for k, r in runs.items()},
        "stages": {k: r.stages for k, r in runs.items()},
    }


def compare_outputs(ours: Path, theirs: Path) -> dict[str, Any]:
    """How far pruneapp's dense output is from torch's: zeros in each, elements that differ, and the magnitudes
    kept by one and pruned by the other (a single magnitude means they only chose differently among ties)."""
    a = torch.load(ours, weights_only=True, mmap=True)
    b = torch.load(theirs, weights_only=True, mmap=True)
    differ = zeros_a = zeros_b = total = 0
    magnitudes: set[float] = set()
    for name, t in b.items():
        u = a[name]
        diff = u != t
        differ += int(diff.sum())
        magnitudes.update((u[diff].abs() + t[diff].abs()).unique()[:10].tolist())
        zeros_a, zeros_b, total = zeros_a + int((u == 0).sum()), zeros_b + int((t == 0).sum()), total + t.numel()
    return {
        "elements": total,
        "zeros_pruneapp": zeros_a,
        "zeros_torch": zeros_b,
        "elements_differing": differ,
        "differing_magnitudes": sorted(magnitudes)[:10],
    }


# ---------------------------------------------------------------- sizes and throughput (in process)


def measure_sizes(path: Path, label: str, work: Path, repeat: int = 2) -> list[dict[str, Any]]:
    """Size, encode and decode time of every format at every sparsity, next to the bound and plain zstd."""
    model = load_model(path)
    tensor_bytes = _tensor_bytes(model.weights)
    rows = []
    for s in SPARSITIES:
        row = _sizes_at(model, s, work / f"{label}-{s}".replace(" ", "_"), repeat)
        rows.append({"model": label, "sparsity": s, "tensor_bytes": tensor_bytes} | row)
    return rows


def _sizes_at(model: LoadedModel, sparsity: float, out_dir: Path, repeat: int) -> dict[str, Any]:
    result = prune(model.weights, PruneSettings(method="global-l1", sparsity=sparsity))
    names = [st.name for st in result.stats if st.pruned and st.tied_to is None]
    written = write_outputs(
        model, result.weights, names, out_dir, model.path.stem, SIZE_FORMATS, ZSTD_LEVEL, force=True
    )
    formats = {}
    for o in written:
        decode = min(_timed(read_weights, o.path) for _ in range(repeat))
        formats[o.format] = {"bytes": o.bytes, "encode_seconds": o.encode_seconds, "decode_seconds": decode}
    dense = next(o.path for o in written if o.format == "dense")
    formats["zstd -3 of dense file"] = plain_zstd(dense, out_dir / "plain.zst", repeat)
    bound = reference_bound_bytes(result.weights, names)
    for o in written:
        o.path.unlink(missing_ok=True)
    return {"achieved_sparsity": result.achieved_sparsity, "bound_bytes": bound, "formats": formats}


def _timed(fn: Callable[..., Any], *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def plain_zstd(src: Path, dst: Path, repeat: int = 2) -> dict[str, float]:
    """Plain zstd of a file at ZSTD_LEVEL on all cores (``zstd -3 -T0``), file to file; decompression into memory."""

    def compress() -> None:
        dst.write_bytes(zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1).compress(src.read_bytes()))

    def decompress() -> None:
        with dst.open("rb") as f:
            zstandard.ZstdDecompressor().stream_reader(f).readall()

    encode = min(_timed(compress) for _ in range(repeat))
    decode = min(_timed(decompress) for _ in range(repeat))
    size = dst.stat().st_size
    dst.unlink()
    return {"bytes": size, "encode_seconds": encode, "decode_seconds": decode}


def _tensor_bytes(weights: dict[str, torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for t in weights.values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------- targets and tables


def check_targets(speed: list[dict[str, Any]], sizes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it holds."""
    checks = []
    if speed:
        big = max(speed, key=lambda r: r["params"])
        at = f"at {big['params'] / 1e6:.0f}M params" + ("" if big["params"] >= 95_000_000 else " (target is at 100M)")
        ratio, peak = big["ratio_torch_over_pruneapp"], big["peak_rss_over_model"]["pruneapp"]
        ratio = math.inf if ratio is None else ratio  # pruneapp within the noise of the floor
        checks.append(_check(f"global-l1 time beyond floor, torch / pruneapp {at}", ratio, ">=", 10.0))
        checks.append(_check(f"pruneapp peak RSS / model size {at}", peak, "<", 2.0))
    for model in dict.fromkeys(r["model"] for r in sizes):
        rows = [r for r in sizes if r["model"] == model and r["sparsity"] in TARGET_SPARSITIES]
        over = max(r["formats"]["packed"]["bytes"] / r["bound_bytes"] - 1 for r in rows)
        gain = min(1 - r["formats"]["packed"]["bytes"] / r["formats"]["dense.zst"]["bytes"] for r in rows)
        checks.append(_check(f"{model}: packed above bound, worst of 0.5-0.95", over, "<=", 0.03))
        checks.append(_check(f"{model}: packed smaller than dense.zst, worst of 0.5-0.95", gain, ">=", 0.15))
        if rows[0]["tensor_bytes"] >= MIN_TIMED_BYTES:  # smaller files time per-call overheads, not decoding
            speed_ratio = min(_decode_ratio(r) for r in sizes if r["model"] == model)
            checks.append(_check(f"{model}: packed decode / zstd -d speed, worst sparsity", speed_ratio, ">=", 1.0))
    return checks


def _decode_ratio(row: dict[str, Any]) -> float:
    f = row["formats"]
    return f["zstd -3 of dense file"]["decode_seconds"] / f["packed"]["decode_seconds"]


def _check(name: str, value: float, op: str, target: float) -> dict[str, Any]:
    ok = {">=": value >= target, "<": value < target, "<=": value <= target}[op]
    return {"target": name, "value": value if math.isfinite(value) else None, "op": op, "goal": target, "holds": ok}


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table: first column left-aligned, the rest right-aligned."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_machine(m: dict[str, Any]) -> str:
    return (
        f"machine: {m['processor']}, {m['cpus_usable']} usable CPUs (torch threads {m['torch_threads']}), "
        f"{m['memory_gb']} GB RAM, {m['platform']}\n"
        f"software: Python {m['python']}, torch {m['torch']}, zstandard {m['zstandard']}\n"
        f"load average (1 min): {m['load_average_at_start']} at start, {m.get('load_average_at_end')} at end"
    )


def format_speed(rows: Sequence[dict[str, Any]]) -> str:
    head = ["params", "model", "import torch s", "floor s", "pruneapp s", "torch s"]
    head += ["beyond floor: pruneapp s", "torch s", "torch/pruneapp", "same zeros"]
    times = []
    for r in rows:
        s, b, ratio = r["seconds"], r["beyond_floor_seconds"], r["ratio_torch_over_pruneapp"]
        times.append(
            [f"{r['params'] / 1e6:.1f}M", f"{r['model_bytes'] / MB:.0f} MB"]
            + [f"{s[k]:.2f}" for k in ("import", "floor", "pruneapp", "torch")]
            + [f"{b['pruneapp']:.2f}", f"{b['torch']:.2f}", "n/a" if ratio is None else f"{ratio:.1f}x"]
            + [_agreement(r.get("agreement", {}))]
        )
    mem = []
    for r in rows:
        x, y, abs_ = r["peak_rss_over_model"], r["peak_rss_beyond_import_over_model"], r["peak_rss_bytes"]
        cells = [
            f"{abs_[k] / MB:.0f} MB = {x[k]:.2f}x ({y[k]:+.2f}x)" for k in ("import", "floor", "pruneapp", "torch")
        ]
        mem.append([f"{r['params'] / 1e6:.1f}M", *cells])
    note = (
        f"global-l1 at {SPEED_SPARSITY:.0%} on synthetic fp32 transformer-shaped weights, each command a fresh process"
        " (best of --repeat);\nfloor = start Python, import torch, torch.load + torch.save of the same file;"
        " pruneapp = the CLI, --formats dense;\ntorch = global_unstructured(L1Unstructured) + prune.remove + torch.save"
    )
    mem_note = "peak RSS of each process = multiple of the model's fp32 bytes (beyond the RSS of importing torch)"
    mem_head = ["params", "import torch", "floor", "pruneapp", "torch"]
    return "\n".join([note, format_table(head, times), "", mem_note, format_table(mem_head, mem)])


def _agreement(a: dict[str, Any]) -> str:
    if not a:
        return "-"
    n = a["elements_differing"]
    if n == 0:
        return "yes"
    ties = a["zeros_pruneapp"] == a["zeros_torch"] and len(a["differing_magnitudes"]) == 1
    return f"yes ({n} ties)" if ties else f"no ({n} differ)"


def format_sizes(rows: Sequence[dict[str, Any]]) -> str:
    head = ["model", "sparsity", "dense", "csr", "dense.zst", "csr.zst", "packed", "bound", "packed/bound"]
    head += ["packed/dense.zst"]
    body = []
    for r in rows:
        f = r["formats"]
        dense = f["dense"]["bytes"]
        body.append(
            [r["model"], f"{r['sparsity']:.2f}", f"{dense / MB:.2f} MB"]
            + [f"{f[k]['bytes'] / dense:.3f}" for k in SIZE_FORMATS[1:]]
            + [f"{r['bound_bytes'] / dense:.3f}", f"{f['packed']['bytes'] / r['bound_bytes']:.3f}"]
            + [f"{f['packed']['bytes'] / f['dense.zst']['bytes']:.3f}"]
        )
    note = f"sizes relative to the dense .pt at the same sparsity (global-l1, zstd level {ZSTD_LEVEL})"
    return note + "\n" + format_table(head, body)


def format_throughput(rows: Sequence[dict[str, Any]], sparsity: float = SPEED_SPARSITY) -> str:
    head = ["model", "format", "bytes / dense", "encode MB/s", "decode MB/s"]
    body = []
    for r in rows:
        if r["sparsity"] != sparsity:
            continue
        dense = r["formats"]["dense"]["bytes"]
        for name, f in r["formats"].items():
            enc, dec = r["tensor_bytes"] / f["encode_seconds"] / MB, r["tensor_bytes"] / f["decode_seconds"] / MB
            body.append([r["model"], name, f"{f['bytes'] / dense:.3f}", f"{enc:.0f}", f"{dec:.0f}"])
    note = (
        f"throughput at sparsity {sparsity} in MB of dense tensor bytes per second; formats: file to file (encode) and"
        "\nfile to tensors (decode); zstd -3: whole dense file on all cores (encode), into memory (decode)"
    )
    return note + "\n" + format_table(head, body)


def format_targets(checks: Sequence[dict[str, Any]]) -> str:
    lines = ["targets:"]
    for c in checks:
        mark = "holds" if c["holds"] else "MISSED"
        value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
        lines.append(f"  {mark:<6}  {c['target']}: {value} (goal {c['op']} {c['goal']})")
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def parse_count(text: str) -> int:
    """'100M' -> 100_000_000, '2.5M' -> 2_500_000, '500k' -> 500_000, '1000' -> 1000."""
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a parameter count like 10M or 2500000") from None
    if value < 10_000:
        raise argparse.ArgumentTypeError(f"{text!r} is too small; give at least 10k parameters")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pruneapp bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small models only: a smoke test that runs in under a minute")
    p.add_argument("--speed", action="store_true", help="run the speed and memory part (default: all parts)")
    p.add_argument("--sizes", action="store_true", help="run the sizes and throughput part (default: all parts)")
    p.add_argument("--params", nargs="+", type=parse_count, metavar="N", help="model sizes for --speed, e.g. 10M 100M")
    p.add_argument("--sizes-params", type=parse_count, metavar="N", help="size of the synthetic model for --sizes")
    p.add_argument("--repeat", type=int, default=1, help="runs per speed measurement; the fastest counts (default 1)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write every number to PATH as JSON")
    return p


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Run the selected parts and return every number."""
    both = not (args.speed or args.sizes)
    params = args.params or (QUICK_PARAMS if args.quick else FULL_PARAMS)
    size_params = args.sizes_params or (QUICK_SIZES_PARAMS if args.quick else FULL_SIZES_PARAMS)
    result: dict[str, Any] = {"machine": machine(), "speed": [], "sizes": [], "notes": []}
    with tempfile.TemporaryDirectory(prefix="pruneapp-bench-") as tmp:
        work = Path(tmp)
        if both or args.speed:
            log("speed and memory:")
            result["speed"] = [measure_speed(n, work, max(1, args.repeat), log) for n in params]
        if both or args.sizes:
            log("sizes and throughput:")
            result["sizes"], notes = sizes_part(work, size_params, 1 if args.quick else 3, log)
            result["notes"] += notes
    result["machine"]["load_average_at_end"] = _load_average()
    result["targets"] = check_targets(result["speed"], result["sizes"])
    return result


def sizes_part(
    work: Path, n_params: int, repeat: int, log: Callable[[str], None]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The demo model (if present) and a synthetic one; decode and plain-zstd times are the best of ``repeat``."""
    rows, notes = [], []
    if DEMO_MODEL.exists():
        log(f"  {DEMO_MODEL.name} ...")
        rows += measure_sizes(DEMO_MODEL, "demo (trained)", work, repeat)
    else:
        notes.append(f"{DEMO_MODEL} is missing: the trained demo model was skipped")
    synthetic = work / "synthetic-sizes.pt"
    actual = write_synthetic(n_params, synthetic, seed=1)
    log(f"  synthetic {actual / 1e6:.1f}M ...")
    rows += measure_sizes(synthetic, f"synthetic {actual / 1e6:.1f}M", work, repeat)
    return rows, notes


def format_all(result: dict[str, Any]) -> str:
    parts = [format_machine(result["machine"])]
    if result["speed"]:
        parts.append(format_speed(result["speed"]))
    if result["sizes"]:
        parts += [format_sizes(result["sizes"]), format_throughput(result["sizes"])]
    parts += [f"note: {n}" for n in result["notes"]]
    parts.append(format_targets(result["targets"]))
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pruneapp bench``: print the tables, optionally write JSON; 0 on success."""
    args = build_parser().parse_args(argv)

    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    result = run(args, log)
    print(format_all(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


if __name__ == "__main__":
    sys.exit(main())
