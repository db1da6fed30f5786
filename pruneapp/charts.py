"""Plotly figures built from a pruning report or sweep: pure functions of plain data, shared by the app and scripts.

Sizes are shown in decimal units (1 kB = 1000 bytes), as file managers and download pages show them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import TYPE_CHECKING

import plotly.graph_objects as go

from pruneapp.units import human_bytes

if TYPE_CHECKING:
    from pruneapp.pipeline import SweepPoint
    from pruneapp.report import Report

FORMAT_LABELS = {
    "dense": "pruned dense",
    "csr": "CSR",
    "dense.zst": "dense + zstd",
    "csr.zst": "CSR + zstd",
    "packed": "packed",
}
FORMAT_COLORS = {
    "dense": "#636efa",
    "csr": "#ef553b",
    "dense.zst": "#00cc96",
    "csr.zst": "#ab63fa",
    "packed": "#19d3f3",
}
ORIGINAL_LABEL = "original"
TORCH_PRUNE_LABEL = "torch.nn.utils.prune before prune.remove"
_GREY, _AMBER, _BLUE, _GREEN = "#9e9e9e", "#f5a623", "#4c78a8", "#2ca02c"


def format_label(fmt: str) -> str:
    """What users call an output format ("csr.zst" -> "CSR + zstd")."""
    return FORMAT_LABELS.get(fmt, fmt)


def _ratio_text(size: int, original: int) -> str:
    return f"{size / original:.2f}x original" if original > 0 else ""


def size_chart(report: Report) -> go.Figure:
    """Bar chart of real file sizes: the original, torch.nn.utils.prune's file, then each output (smallest in green)."""
    original = report.input.bytes
    keys, labels, sizes, colors = ["original"], [ORIGINAL_LABEL], [original], [_GREY]
    if report.torch_prune_bytes:
        keys.append("torch-prune")
        labels.append(TORCH_PRUNE_LABEL)
        sizes.append(report.torch_prune_bytes)
        colors.append(_AMBER)
    smallest = report.smallest
    for out in report.outputs:
        keys.append(out.format)
        labels.append(format_label(out.format))
        sizes.append(out.bytes)
        colors.append(_GREEN if out is smallest else _BLUE)
    text = [f"{human_bytes(b)}<br>{_ratio_text(b, original)}" for b in sizes]
    bar = go.Bar(
        x=labels,
        y=sizes,
        text=text,
        textposition="outside",
        customdata=keys,
        marker_color=colors,
        hovertemplate="%{x}<br>%{y:,} bytes<extra></extra>",
    )
    fig = go.Figure(bar)
    fig.update_layout(title="File size on disk", yaxis_title="bytes", showlegend=False, uniformtext_minsize=9)
    fig.update_yaxes(tickformat="~s", ticksuffix="B", range=[0, max(sizes) * 1.2])
    return fig


def layer_sparsity_chart(report: Report) -> go.Figure:
    """Sparsity of each pruned tensor in model order (tied copies once), with the target as a dashed line."""
    tensors = [t for t in report.tensors if t.pruned and t.tied_to is None]
    bar = go.Bar(
        x=[t.zeros_after / t.numel if t.numel else 0.0 for t in tensors],
        y=[t.name for t in tensors],
        orientation="h",
        customdata=[[str(list(t.shape)), t.numel, t.zeros_after] for t in tensors],
        hovertemplate="%{y}<br>shape %{customdata[0]}<br>%{customdata[2]:,} of %{customdata[1]:,} zero"
        "<br>sparsity %{x:.1%}<extra></extra>",
        marker_color=_BLUE,
    )
    fig = go.Figure(bar)
    fig.add_vline(
        x=report.sparsity_target,
        line_dash="dash",
        line_color=_AMBER,
        annotation_text=f"target {report.sparsity_target:.0%}",
    )
    fig.update_layout(
        title="Sparsity per tensor",
        xaxis_title="fraction of weights that are zero",
        height=max(300, 24 * len(tensors) + 140),
        showlegend=False,
    )
    fig.update_xaxes(range=[0, 1.05], tickformat=".0%")
    fig.update_yaxes(autorange="reversed", automargin=True)  # model order, top to bottom
    return fig


def magnitude_histogram(report: Report) -> go.Figure:
    """Histogram of log10 |w| before pruning, with the pruning threshold as a vertical line when there is one."""
    hist = report.histogram
    bins = list(pairwise(hist.edges))
    bar = go.Bar(
        x=[(lo + hi) / 2 for lo, hi in bins],
        y=hist.counts,
        width=[hi - lo for lo, hi in bins],
        marker_color=_BLUE,
        hovertemplate="|w| ~ 1e%{x:.2f}<br>%{y:,} weights<extra></extra>",
    )
    fig = go.Figure(bar)
    if hist.threshold is not None and hist.threshold > 0:
        fig.add_vline(
            x=math.log10(hist.threshold),
            line_dash="dash",
            line_color=_AMBER,
            annotation_text=f"threshold {hist.threshold:.3g}",
        )
    fig.update_layout(
        title=f"Weight magnitudes before pruning ({hist.zeros:,} exact zeros not shown)",
        xaxis_title="log10 |w|",
        yaxis_title="weights",
        bargap=0,
        showlegend=False,
    )
    return fig


def csr_crossover(points: Sequence[SweepPoint]) -> float | None:
    """The lowest measured sparsity at which the CSR file is smaller than the dense one (None if it never is)."""
    for point in sorted(points, key=lambda p: p.sparsity):
        if "csr" in point.bytes and "dense" in point.bytes and point.bytes["csr"] < point.bytes["dense"]:
            return point.sparsity
    return None


def sweep_chart(points: Sequence[SweepPoint]) -> go.Figure:
    """Each format's measured size against sparsity, marking where CSR starts to beat dense."""
    points = sorted(points, key=lambda p: p.sparsity)
    formats = list(dict.fromkeys(fmt for p in points for fmt in p.bytes))
    fig = go.Figure()
    for fmt in formats:
        fig.add_scatter(
            x=[p.sparsity for p in points],
            y=[p.bytes.get(fmt) for p in points],
            mode="lines+markers",
            name=format_label(fmt),
            line_color=FORMAT_COLORS.get(fmt),
            hovertemplate=f"{format_label(fmt)}<br>sparsity %{{x:.0%}}<br>%{{y:,}} bytes<extra></extra>",
        )
    crossover = csr_crossover(points)
    if crossover is not None:
        size = next(p.bytes["csr"] for p in points if p.sparsity == crossover)
        fig.add_scatter(
            x=[crossover],
            y=[size],
            mode="markers",
            name="CSR beats dense",
            marker={"symbol": "star", "size": 16, "color": _AMBER},
            hoverinfo="skip",
        )
        fig.add_annotation(x=crossover, y=size, text=f"CSR < dense from {crossover:.0%}", yshift=18, showarrow=False)
    fig.update_layout(title="Size against sparsity", xaxis_title="sparsity", yaxis_title="bytes")
    fig.update_xaxes(tickformat=".0%", range=[-0.02, 1.0])
    fig.update_yaxes(tickformat="~s", ticksuffix="B", rangemode="tozero")
    return fig


def accuracy_chart(curve: Sequence[tuple[float, float]]) -> go.Figure:
    """Test accuracy of the demo model against sparsity."""
    fig = go.Figure(
        go.Scatter(
            x=[s for s, _ in curve],
            y=[a for _, a in curve],
            mode="lines+markers",
            name="test accuracy",
            marker_color=_BLUE,
            hovertemplate="sparsity %{x:.0%}<br>accuracy %{y:.1%}<extra></extra>",
        )
    )
    fig.update_layout(
        title="Demo model: test accuracy against sparsity", xaxis_title="sparsity", yaxis_title="accuracy"
    )
    fig.update_xaxes(tickformat=".0%", range=[-0.02, 1.0])
    fig.update_yaxes(tickformat=".0%", range=[0, 1.05])
    return fig
