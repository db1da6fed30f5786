"""Charts are pure functions of report data: the plotted values are the report's own numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import plotly.graph_objects as go
import pytest

from pruneapp import charts
from pruneapp.pipeline import SweepPoint
from pruneapp.pruning import TensorStats
from pruneapp.report import Histogram, InputInfo, OutputSize, Report


def _output(fmt: str, size: int, original: int) -> OutputSize:
    return OutputSize(fmt, f"model.{fmt}", size, size / original, 0.01, 0.01)


def _report(threshold: float | None = 0.02, outputs: dict[str, int] | None = None) -> Report:
    original = 1_000_000
    outputs = outputs or {"dense": 1_000_500, "csr": 310_000, "dense.zst": 270_000, "csr.zst": 255_000}
    tensors = [
        TensorStats("conv.weight", (8, 3, 3, 3), "float32", 216, 0, 100, True),
        TensorStats("conv.bias", (8,), "float32", 8, 0, 0, False),
        TensorStats("fc.weight", (10, 200), "float32", 2000, 0, 1900, True),
        TensorStats("head.weight", (10, 200), "float32", 2000, 0, 1900, True, tied_to="fc.weight"),
        TensorStats("emb.weight", (40, 10), "float32", 400, 0, 380, True),
    ]
    return Report(
        input=InputInfo("model.pt", original, "torch-zip", "state_dict", 990_000),
        settings={"method": "global-l1", "sparsity": 0.9},
        sparsity_target=0.9,
        sparsity_achieved=0.9,
        outputs=[_output(fmt, size, original) for fmt, size in outputs.items()],
        torch_prune_bytes=2_001_000,
        tensors=tensors,
        histogram=Histogram(edges=[-4.0, -3.0, -2.0, -1.0, 0.0], counts=[5, 40, 300, 20], zeros=3, threshold=threshold),
    )


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.00 kB"),
        (1_234_567, "1.23 MB"),
        (45_600_000, "45.6 MB"),
        (999_999, "1.00 MB"),
    ],
)
def test_human_bytes_uses_decimal_units(n: int, text: str) -> None:
    assert charts.human_bytes(n) == text


def test_size_chart_plots_real_byte_counts() -> None:
    report = _report()
    fig = charts.size_chart(report)
    assert isinstance(fig, go.Figure) and len(fig.data) == 1
    bar = fig.data[0]
    assert list(bar.y) == [1_000_000, 2_001_000, 1_000_500, 310_000, 270_000, 255_000]
    assert list(bar.x) == [
        "original",
        "torch.nn.utils.prune before prune.remove",
        "pruned dense",
        "CSR",
        "dense + zstd",
        "CSR + zstd",
    ]
    assert bar.text[0].startswith("1.00 MB") and "0.26x original" in bar.text[-1]
    assert bar.text[1].startswith("2.00 MB") and "2.00x original" in bar.text[1]


def test_size_chart_highlights_the_smallest_output() -> None:
    report = _report(outputs={"dense": 1_000_500, "csr.zst": 255_000, "packed": 180_000})
    bar = charts.size_chart(report).data[0]
    smallest = list(bar.customdata).index(report.smallest.format)
    assert bar.x[smallest] == "packed"
    assert [c for i, c in enumerate(bar.marker.color) if c == bar.marker.color[smallest]] == [
        bar.marker.color[smallest]
    ]


def test_layer_sparsity_lists_pruned_tensors_in_model_order_with_target_line() -> None:
    fig = charts.layer_sparsity_chart(_report())
    bar = fig.data[0]
    assert list(bar.y) == ["conv.weight", "fc.weight", "emb.weight"]
    assert list(bar.x) == pytest.approx([100 / 216, 0.95, 0.95])
    assert fig.layout.yaxis.autorange == "reversed"
    assert [s.x0 for s in fig.layout.shapes] == [0.9]


def test_magnitude_histogram_marks_the_threshold() -> None:
    fig = charts.magnitude_histogram(_report(threshold=0.02))
    bar = fig.data[0]
    assert list(bar.y) == [5, 40, 300, 20]
    assert list(bar.x) == [-3.5, -2.5, -1.5, -0.5] and list(bar.width) == [1.0, 1.0, 1.0, 1.0]
    assert [s.x0 for s in fig.layout.shapes] == pytest.approx([math.log10(0.02)])


def test_magnitude_histogram_without_threshold_has_no_line() -> None:
    assert charts.magnitude_histogram(_report(threshold=None)).layout.shapes == ()


def _sweep(csr: list[int]) -> list[SweepPoint]:
    sparsities = [0.0, 0.25, 0.5, 0.75, 0.99]
    return [SweepPoint(s, {"dense": 1000, "csr": c, "csr.zst": c // 2}) for s, c in zip(sparsities, csr, strict=True)]


def test_csr_crossover_is_first_sparsity_where_csr_is_smaller() -> None:
    assert charts.csr_crossover(_sweep([2000, 1500, 1000, 700, 40])) == 0.75
    assert charts.csr_crossover(list(reversed(_sweep([2000, 1500, 999, 700, 40])))) == 0.5
    assert charts.csr_crossover(_sweep([2000, 1900, 1800, 1500, 1000])) is None


def test_sweep_chart_draws_each_format_and_marks_crossover() -> None:
    points = _sweep([2000, 1500, 1000, 700, 40])
    fig = charts.sweep_chart(points)
    lines = {trace.name: trace for trace in fig.data}
    assert set(lines) == {"pruned dense", "CSR", "CSR + zstd", "CSR beats dense"}
    assert list(lines["CSR"].x) == [0.0, 0.25, 0.5, 0.75, 0.99]
    assert list(lines["CSR"].y) == [2000, 1500, 1000, 700, 40]
    assert list(lines["pruned dense"].y) == [1000] * 5
    assert (lines["CSR beats dense"].x, lines["CSR beats dense"].y) == ((0.75,), (700,))
    assert "75%" in fig.layout.annotations[0].text


def test_sweep_chart_without_crossover_has_no_marker() -> None:
    fig = charts.sweep_chart(_sweep([2000, 1900, 1800, 1500, 1000]))
    assert [trace.name for trace in fig.data] == ["pruned dense", "CSR", "CSR + zstd"]
    assert fig.layout.annotations == ()


def test_accuracy_chart_plots_the_curve() -> None:
    curve = [(0.0, 0.98), (0.5, 0.975), (0.9, 0.8), (0.99, 0.2)]
    fig = charts.accuracy_chart(curve)
    assert len(fig.data) == 1
    assert list(fig.data[0].x) == [0.0, 0.5, 0.9, 0.99] and list(fig.data[0].y) == [0.98, 0.975, 0.8, 0.2]


def test_figures_serialize_from_a_report_read_back_from_json(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    _report().write_json(path)
    report = Report.from_dict(json.loads(path.read_text()))
    for build in (charts.size_chart, charts.layer_sparsity_chart, charts.magnitude_histogram):
        assert build(report).to_json()
    assert list(charts.size_chart(report).data[0].y) == list(charts.size_chart(_report()).data[0].y)
