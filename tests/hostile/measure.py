"""Run every hostile case through the isolated loader and write docs/hostile-results.md: case, outcome, time, peak
memory; then measure what isolation costs on a 20M-parameter model (in-process vs isolated, each in a fresh process).

    .venv/bin/python tests/hostile/measure.py [--out docs/hostile-results.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]

import torch  # noqa: E402

from pruneapp.isolation import IsolatedLoad, load_isolated, run_isolated  # noqa: E402
from pruneapp.loading import load_model  # noqa: E402

if TYPE_CHECKING:
    from hostile_cases import Case

MiB = 1024**2
OVERHEAD_PARAMS = 20_000_000


def run_case(case: Case) -> dict[str, Any]:
    from hostile_cases import TEST_LIMITS, assert_outcome
    from hostile_craft import marker

    with tempfile.TemporaryDirectory(prefix="pruneapp-hostile-") as tmp:
        path = case.build(Path(tmp))
        run = run_isolated(path, case.limits)
        ran = marker(Path(tmp)).exists()
        try:
            assert_outcome(case, run.error or run.model, Path(tmp), path)
            verdict = "as expected"
        except AssertionError as e:
            verdict = f"NOT as expected: {e}".splitlines()[0]
    own = {k: v for k, v in vars(case.limits).items() if v != getattr(TEST_LIMITS, k)}
    name = case.name + (f" (limits: {', '.join(f'{k}={v}' for k, v in own.items())})" if own else "")
    return {"case": name, "outcome": _outcome(run), "verdict": verdict, "payload_ran": ran, **_cost(run)}


def _outcome(run: IsolatedLoad) -> str:
    if run.error is not None:
        message = str(run.error)
        stopped = f"stopped by the worker's {run.limit} limit; " if run.limit else ""
        return f"{stopped}{type(run.error).__name__}: {message[:120]}{'…' if len(message) > 120 else ''}"
    assert run.model is not None
    return f"loaded: {len(run.model.weights)} tensors ({run.model.structure})"


def _cost(run: IsolatedLoad) -> dict[str, float]:
    return {"seconds": run.seconds, "peak_mib": run.peak_rss_bytes / MiB}


def cases_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| case | outcome | result | time (s) | worker peak RSS (MiB) |", "|---|---|---|---:|---:|"]
    for r in rows:
        outcome = r["outcome"].replace("|", "\\|")
        lines.append(f"| {r['case']} | {outcome} | {r['verdict']} | {r['seconds']:.3f} | {r['peak_mib']:.0f} |")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Overhead: each mode in a fresh process, so that one's memory does not hide in the other's


def overhead_model(path: Path) -> None:
    """~20M fp32 parameters in 24 layers, like a small transformer's state_dict (about 80 MB)."""
    g = torch.Generator().manual_seed(0)
    weights = {}
    for i in range(24):
        weights[f"layers.{i}.attn.weight"] = torch.randn(512, 512, generator=g)
        weights[f"layers.{i}.mlp.weight"] = torch.randn(1024, 512, generator=g)
        weights[f"layers.{i}.mlp.bias"] = torch.randn(1024, generator=g)
    weights["embed.weight"] = torch.randn(OVERHEAD_PARAMS - sum(t.numel() for t in weights.values()), generator=g)
    torch.save(weights, path)


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def warm_up() -> float:
    """Start the fork server with a tiny load, so that later timings are those of warm loads; its seconds."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"w": torch.zeros(1)}, Path(tmp) / "w.pt")
        load_isolated(Path(tmp) / "w.pt")
    return time.perf_counter() - start


def overhead_child(mode: str, path: Path) -> dict[str, float]:
    """Runs in a fresh process: one load of ``path`` (after a warm-up for isolation), timed and measured."""
    load = load_model if mode == "in-process" else load_isolated
    start = warm_up() if mode == "isolated" else 0.0
    before = {field: _status(field) for field in ("VmRSS", "RssAnon", "RssFile")}
    timed = time.perf_counter()
    model = load(path)
    seconds = time.perf_counter() - timed
    after_load = _status("VmRSS")
    total = sum(float(t.double().sum()) for t in model.weights.values())  # touch every page
    return {
        "seconds": seconds,
        "server_start_seconds": start,
        "rss_after_load_mib": (after_load - before["VmRSS"]) / MiB,
        "anon_mib": (_status("RssAnon") - before["RssAnon"]) / MiB,
        "file_mib": (_status("RssFile") - before["RssFile"]) / MiB,
        "checksum": total,
    }


def overhead(repeats: int = 3) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="pruneapp-overhead-") as tmp:
        path = Path(tmp) / "model.pt"
        overhead_model(path)
        size = path.stat().st_size / MiB
        count = len(torch.load(path, weights_only=True, mmap=True))
        results = {mode: [_child(mode, path) for _ in range(repeats)] for mode in ("in-process", "isolated")}
    best = {mode: min(runs, key=lambda r: r["seconds"]) for mode, runs in results.items()}
    assert best["in-process"]["checksum"] == best["isolated"]["checksum"], "the two loads disagree"
    worker = run_isolated_cost(repeats)
    lines = [
        f"Model: {OVERHEAD_PARAMS / 1e6:.0f}M fp32 parameters in {count} tensors, a {size:.1f} MiB torch.save file. "
        f"Each mode ran {repeats} times, each time in a fresh process; the best time is shown, memory from that run.",
        "",
        "| | load time (s) | parent RSS right after the load (MiB) | after touching every tensor: private "
        "(anonymous) memory (MiB) | ... file-backed memory (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, r in best.items():
        lines.append(
            f"| {mode} | {r['seconds']:.3f} | +{r['rss_after_load_mib']:.0f} | +{r['anon_mib']:.0f} "
            f"| +{r['file_mib']:.0f} |"
        )
    start = best["isolated"]["server_start_seconds"]
    lines += [
        "",
        f"The first isolated load in a process also starts the fork server (here {start:.2f} s, mostly importing "
        f"torch); later loads fork a warm worker. The worker's own peak RSS for this model: {worker:.0f} MiB "
        "(about 150 MiB of it is the forked loader itself), released when the worker exits. In-process, the "
        "tensors are private memory; isolated, they are pages of the mapped hand-back file, read in when first "
        "touched and never copied (clean pages the kernel can reclaim, unless the temp dir is on tmpfs).",
    ]
    return lines


def run_isolated_cost(repeats: int) -> float:
    with tempfile.TemporaryDirectory(prefix="pruneapp-overhead-") as tmp:
        path = Path(tmp) / "model.pt"
        overhead_model(path)
        return min(run_isolated(path).peak_rss_bytes for _ in range(repeats)) / MiB


def _child(mode: str, path: Path) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--overhead-child", mode, str(path)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------


def write_report(out: Path) -> None:
    from hostile_cases import CASES, TEST_LIMITS  # not needed by the overhead children

    load = os.getloadavg()[0]
    server_start = warm_up()
    started = time.perf_counter()
    rows = [run_case(case) for case in CASES]
    suite_seconds = time.perf_counter() - started
    limits = ", ".join(f"{k}={v}" for k, v in vars(TEST_LIMITS).items())
    text = [
        "# Hostile-input results",
        "",
        "Produced by `tests/hostile/measure.py`: every case of `tests/hostile/hostile_cases.py` built in a temp dir "
        "and loaded with `pruneapp.isolation.run_isolated` (the loader runs in a forked worker). Time is the wall "
        "time of the whole isolated load as the caller sees it; peak memory is the worker's `ru_maxrss`, which "
        "includes about 150 MiB of the forked loader (Python and torch) before the file is opened.",
        "",
        f"Machine: {os.cpu_count()} CPUs (load average {load:.1f} when the run started), "
        f"Python {platform.python_version()}, torch {torch.__version__}. "
        f"Limits (lowered as in the tests; max_tensors and max_depth at their defaults): {limits}.",
        "",
        f"{sum(r['verdict'] == 'as expected' for r in rows)} of {len(rows)} cases as expected; all cases in "
        f"{suite_seconds:.1f} s, after {server_start:.2f} s to start the fork server (once per process). "
        f"A payload ran in {sum(r['payload_ran'] for r in rows)} cases (each payload creates a marker file, "
        "checked after the load).",
        "",
        *cases_table(rows),
        "",
        "## What isolation costs",
        "",
        *overhead(),
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "hostile-results.md")
    parser.add_argument("--overhead-child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.overhead_child:
        print(json.dumps(overhead_child(args.overhead_child[0], Path(args.overhead_child[1]))))
        return
    write_report(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
