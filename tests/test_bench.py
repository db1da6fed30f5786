"""The benchmark: its measuring harness, and ``--quick`` end to end as a smoke test (numbers checked for sanity, never
for speed: targets are the benchmark's business, not the tests')."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pruneapp import bench

REPO = Path(__file__).resolve().parent.parent
MB = 1_000_000


@pytest.mark.parametrize(
    "text, value", [("100M", 100_000_000), ("2.5m", 2_500_000), ("500k", 500_000), ("20000", 20_000)]
)
def test_parse_count_reads_suffixes(text: str, value: int) -> None:
    assert bench.parse_count(text) == value


@pytest.mark.parametrize("text", ["lots", "1x", "5k"])
def test_parse_count_rejects_nonsense_and_tiny_models(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
        bench.parse_count(text)


@pytest.mark.parametrize("n", [500_000, 1_000_000, 3_000_000, 10_000_000, 100_000_000])
def test_synthetic_shapes_hit_the_requested_size(n: int) -> None:
    shapes = bench.transformer_shapes(n)
    total = sum(math.prod(s) for s in shapes.values())
    assert abs(total - n) / n < 0.01
    assert any(len(s) == 2 and s[0] == 4 * s[1] for s in shapes.values())  # the MLP's up-projection


def test_synthetic_weights_look_trained_not_uniform() -> None:
    weights = bench.synthetic_weights(1_000_000, seed=3)
    fc = weights["layers.0.mlp.fc1.weight"]
    assert fc.dtype == torch.float32
    row_std = fc.std(dim=1)
    assert row_std.max() > 1.5 * row_std.min()  # per-row scales
    kurtosis = ((fc - fc.mean()) ** 4).mean() / fc.var() ** 2
    assert kurtosis > 4  # heavier tails than a Gaussian (3)
    assert torch.equal(weights["embed.weight"], bench.synthetic_weights(1_000_000, seed=3)["embed.weight"])


def test_run_process_reports_the_childs_own_peak_not_the_parents() -> None:
    ballast = torch.ones(100 * MB // 4)  # the test process grows by 100 MB; a fresh child must not inherit that
    small = bench.run_process([sys.executable, "-c", "pass"])
    big = bench.run_process([sys.executable, "-c", "b = bytearray(300_000_000); b[::4096] = b'x' * len(b[::4096])"])
    assert small.peak_rss < 60 * MB
    assert 300 * MB < big.peak_rss < 400 * MB
    assert small.seconds > 0 and big.seconds > 0
    assert ballast.numel() > 0


def test_run_process_reads_the_stage_times_a_child_prints() -> None:
    run = bench.run_process([sys.executable, "-c", 'print(\'hello\'); print(\'{"load": 0.5, "name": "x"}\')'])
    assert run.stages == {"load": 0.5}


def test_run_process_names_a_failing_command() -> None:
    with pytest.raises(RuntimeError, match="exited with 3: .*boom"):
        bench.run_process([sys.executable, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"])


def test_run_process_stops_a_command_that_runs_too_long() -> None:
    with pytest.raises(RuntimeError, match="was stopped"):
        bench.run_process([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)


def test_format_table_aligns_columns() -> None:
    text = bench.format_table(["name", "bytes"], [["a", 1], ["longer", 12345]])
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[2].startswith("a ") and lines[2].endswith("    1")


def test_module_runs_as_a_script() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pruneapp.bench", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--json" in proc.stdout


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """One ``python -m pruneapp bench --quick --json`` run, as CI runs it."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "pruneapp", "bench", "--quick", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_quick_prints_every_table(quick: tuple[str, dict]) -> None:
    text, result = quick
    for heading in ("machine:", "torch/pruneapp", "peak RSS", "packed/bound", "decode MB/s", "targets:"):
        assert heading in text
    assert f"torch {torch.__version__}" in text
    assert result["machine"]["cpu_count"] >= 1


def test_quick_speed_rows_are_sane(quick: tuple[str, dict]) -> None:
    _, result = quick
    (row,) = result["speed"]
    assert 1_500_000 <= row["params"] <= 5_000_000
    for name in ("import", "floor", "pruneapp", "torch"):
        assert row["seconds"][name] > 0
        assert row["peak_rss_bytes"][name] > row["model_bytes"] / 10
    assert row["seconds"]["floor"] >= row["seconds"]["import"] * 0.5
    agree = row["agreement"]
    assert agree["elements"] > 0.5 * row["params"]
    assert agree["zeros_pruneapp"] == pytest.approx(0.9 * agree["elements"], rel=0.01)
    assert agree["zeros_torch"] == pytest.approx(0.9 * agree["elements"], rel=0.01)


def test_quick_size_rows_cover_every_format_and_sparsity(quick: tuple[str, dict]) -> None:
    _, result = quick
    models = {r["model"] for r in result["sizes"]}
    assert any(m.startswith("synthetic") for m in models)
    assert ("demo (trained)" in models) == bench.DEMO_MODEL.exists()
    for model in models:
        rows = [r for r in result["sizes"] if r["model"] == model]
        assert [r["sparsity"] for r in rows] == list(bench.SPARSITIES)
        for r in rows:
            assert set(r["formats"]) == {*bench.SIZE_FORMATS, "zstd -3 of dense file"}
            for f in r["formats"].values():
                assert f["bytes"] > 0 and f["encode_seconds"] > 0 and f["decode_seconds"] > 0
            assert 0 < r["bound_bytes"] < r["formats"]["dense"]["bytes"]
            assert r["achieved_sparsity"] == pytest.approx(r["sparsity"], abs=0.01)
        packed = [r["formats"]["packed"]["bytes"] for r in rows]
        assert packed == sorted(packed, reverse=True)  # more zeros, smaller file


def test_quick_checks_each_target(quick: tuple[str, dict]) -> None:
    _, result = quick
    names = [c["target"] for c in result["targets"]]
    assert any("torch / pruneapp" in n for n in names)
    assert any("peak RSS" in n for n in names)
    assert sum("packed above bound" in n for n in names) == len({r["model"] for r in result["sizes"]})
    assert all(isinstance(c["holds"], bool) for c in result["targets"])


def test_run_process_counts_the_memory_of_a_commands_children_together() -> None:
    child = "b = bytearray(200_000_000); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(0.5)"
    parent = (
        "import subprocess, sys; b = bytearray(200_000_000); b[::4096] = b'x' * len(b[::4096]);"
        f" subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    )
    run = bench.run_process([sys.executable, "-c", parent])
    assert run.peak_rss > 400 * MB  # both held 200 MB at once; the larger process alone is ~210 MB
