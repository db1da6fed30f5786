"""pruneapp's web app: upload a model (or keep the demo), prune it, see where the bytes went, download smaller files.

A thin Streamlit shell over the pruneapp library: every number and chart it shows comes from pruneapp.
Run with ``streamlit run app.py``.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from pruneapp import charts, demo, formats, isolation, pipeline, pruning
from pruneapp.charts import format_label
from pruneapp.errors import PruneAppError
from pruneapp.limits import Limits, default_limits
from pruneapp.pipeline import Inspection, SweepPoint
from pruneapp.report import Report
from pruneapp.units import human_bytes

MiB = 1024**2
SESSION_DIR_PREFIX = "pruneapp-session-"
STALE_SESSION_SECONDS = 12 * 3600  # left behind by a crashed or killed server
SWEEP_SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
NM_PATTERNS = ("2:4", "1:4", "4:8", "1:2")


@dataclass(frozen=True)
class Source:
    """The model file the session works on: the bundled demo or an upload written to disk."""

    key: str  # changes whenever the file does
    path: Path
    label: str


@dataclass(frozen=True)
class RunOptions:
    settings: pruning.PruneSettings
    zstd_level: int
    drop_extras: bool


@dataclass
class ModelCheck:
    """Checks that need the model's code, so only for models the app can run (the demo)."""

    agreement: dict[str, float]
    method: str
    sparsity: float
    accuracy_before: float
    accuracy_after: float
    curve: list[tuple[float, float]]
    curve_method: str


@dataclass
class RunResult:
    source_key: str
    options: RunOptions
    report: Report
    out_dir: Path
    check: ModelCheck | None = None
    sweep: list[SweepPoint] | None = None
    sweep_method: str = ""


class SessionDir:
    """A temporary directory for one browser session, deleted when Streamlit drops the session's state."""

    def __init__(self) -> None:
        remove_stale_session_dirs()
        self.path = Path(tempfile.mkdtemp(prefix=SESSION_DIR_PREFIX))
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.path, True)

    def touch(self) -> Path:
        """Mark the directory in use; recreate it if the stale cleanup took it while the session sat idle."""
        self.path.mkdir(exist_ok=True)
        self.path.touch()
        return self.path


def remove_stale_session_dirs(now: float | None = None) -> None:
    """Delete session directories that nobody touched for STALE_SESSION_SECONDS (their server died)."""
    now = time.time() if now is None else now
    for path in Path(tempfile.gettempdir()).glob(f"{SESSION_DIR_PREFIX}*"):
        try:
            stale = now - path.stat().st_mtime > STALE_SESSION_SECONDS
        except OSError:
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)


def session_dir() -> Path:
    if "session_dir" not in st.session_state:
        st.session_state.session_dir = SessionDir()
    return st.session_state.session_dir.touch()


def safe_file_name(name: str) -> str:
    """The upload's base name reduced to characters that are safe in a path (output names derive from it)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).lstrip("._")
    return base[:120] or "model"


def download_mime(file_name: str) -> str:
    """A content type that Streamlit's server does not gzip on the fly.

    The server compresses every download whose type is not on Starlette's already-compressed list (application/zip,
    application/gzip, images, audio, video), which costs tens of seconds on a few hundred MB of weights. ``.pt``
    files are zip archives; other binary outputs get application/gzip so that they pass through untouched (the
    browser names the file from ``file_name``, not from its type).
    """
    if file_name.endswith(".json"):
        return "application/json"
    if file_name.endswith((".pt", ".pth")):
        return "application/zip"
    return "application/gzip"


# ---- sidebar -------------------------------------------------------------------------------------------------------


def sidebar_source(limits: Limits, workdir: Path) -> Source:
    limit_mb = max(1, limits.max_file_bytes // MiB)
    upload = st.sidebar.file_uploader(
        "Model file",
        key="upload",
        max_upload_size=limit_mb,
        help="A torch.save file (.pt .pth .bin .ckpt .tar), a TorchScript archive or .safetensors. "
        "pruneapp reads the kind from the bytes and never runs code from the file.",
    )
    st.sidebar.caption(f"Up to {limit_mb:,} MB per file. Without an upload, the demo model is used.")
    if upload is None:
        remove_upload(workdir)
        return Source("demo", demo.DEMO_MODEL_PATH, "Demo model: a small CNN for 8x8 handwritten digits")
    return Source(f"upload:{upload.file_id}", save_upload(upload, workdir), upload.name)


def save_upload(upload: Any, workdir: Path) -> Path:
    """Write the upload to the session directory once per file (the library loads from a path)."""
    saved = st.session_state.get("saved_upload")
    if saved and saved[0] == upload.file_id and Path(saved[1]).exists():
        return Path(saved[1])
    remove_upload(workdir)
    path = workdir / "upload" / safe_file_name(upload.name)
    path.parent.mkdir(parents=True)
    upload.seek(0)
    with path.open("wb") as f:
        shutil.copyfileobj(upload, f, length=16 * MiB)
    st.session_state.saved_upload = (upload.file_id, str(path))
    return path


def remove_upload(workdir: Path) -> None:
    shutil.rmtree(workdir / "upload", ignore_errors=True)
    st.session_state.pop("saved_upload", None)


def sidebar_settings(inspection: Inspection | None) -> RunOptions:
    sb = st.sidebar
    method = sb.selectbox("Method", pruning.METHODS, key="method")
    sb.caption(pruning.METHOD_HELP.get(method, ""))
    nm = (2, 4)
    if method == "n:m":
        nm = pruning.parse_nm(sb.selectbox("N:M pattern (keep N of every M)", NM_PATTERNS, key="nm"))
    percent = sb.slider(
        "Sparsity (share of weights set to zero)",
        0,
        99,
        80,
        format="%d%%",
        key="sparsity",
        disabled=method == "n:m",
        help="With n:m the pattern sets the sparsity (2:4 is 50%).",
    )
    device = sb.selectbox("Device", pruning.available_devices(), key="device", help="Where the pruning runs.")
    with sb.expander("Advanced"):
        advanced = advanced_settings(method, has_extras=bool(inspection and inspection.extra_bytes))
    settings = pruning.PruneSettings(
        method=method,
        sparsity=percent / 100,
        nm=nm,
        norm=advanced["norm"],
        seed=advanced["seed"],
        include=advanced["include"],
        exclude=advanced["exclude"],
        device=device,
    )
    return RunOptions(settings, advanced["zstd_level"], advanced["drop_extras"])


def advanced_settings(method: str, has_extras: bool) -> dict[str, Any]:
    """The expander's options: the method's own knob, tensor patterns, zstd level, dropping non-weight entries."""
    norm = st.radio("Row norm", (1, 2), key="norm", horizontal=True) if method == "ln-structured" else 1
    seed = st.number_input("Seed", 0, 2**31 - 1, 0, key="seed") if method == "random" else 0
    include = st.text_input("Only tensors matching", key="include", placeholder="e.g. *.weight, encoder.*")
    exclude = st.text_input("Skip tensors matching", key="exclude", placeholder="e.g. *embed*, lm_head.*")
    levels = formats.ZSTD_LEVELS
    level = st.slider("zstd level", levels[0], levels[-1], formats.DEFAULT_ZSTD_LEVEL, key="zstd_level")
    drop = st.checkbox(
        "Drop optimizer state and other non-weight entries",
        key="drop_extras",
        disabled=not has_extras,
        help="Training checkpoints carry optimizer state that inference does not need.",
    )
    return {
        "norm": int(norm),
        "seed": int(seed),
        "include": split_patterns(include),
        "exclude": split_patterns(exclude),
        "zstd_level": int(level),
        "drop_extras": bool(drop and has_extras),
    }


def split_patterns(text: str) -> tuple[str, ...]:
    return tuple(p for p in re.split(r"[,\s]+", text) if p)


# ---- inspection ----------------------------------------------------------------------------------------------------


def inspect_source(source: Source, limits: Limits) -> Inspection | str:
    """The inspection of the current file, or the error message that it raised; computed once per file."""
    cached = st.session_state.get("inspection")
    if cached and cached[0] == source.key:
        return cached[1]
    try:
        value: Inspection | str = pipeline.inspect_file(source.path, limits)
    except PruneAppError as e:
        value = str(e)
    st.session_state.inspection = (source.key, value)
    return value


def show_inspection(source: Source, info: Inspection, collapsed: bool) -> None:
    """What the file is; the byte breakdown folds away once results take the space."""
    st.subheader(source.label)
    cols = st.columns(4)
    cols[0].metric("File size", human_bytes(info.file_bytes))
    cols[1].metric("Kind", info.kind, help=f"Structure: {info.structure}")
    cols[2].metric("Weight tensors", f"{info.n_tensors:,}")
    cols[3].metric("Parameters", f"{info.n_params:,}")
    total = max(1, sum(info.dtypes.values()))
    mix = ", ".join(f"{name} {count / total:.0%}" for name, count in sorted(info.dtypes.items(), key=lambda x: -x[1]))
    with st.expander("Data types and where the bytes go", expanded=not collapsed):
        st.markdown(f"**Data types:** {mix or 'none'}")
        st.markdown(f"**Where the bytes go:** {bytes_breakdown(info)}")
    for note in info.notes:
        st.info(note)


def bytes_breakdown(info: Inspection) -> str:
    parts = [("weights", info.weights_bytes), *info.extra_bytes.items()]
    rest = info.file_bytes - sum(n for _, n in parts)
    if rest > 0:
        parts.append(("file structure and metadata", rest))
    total = max(1, info.file_bytes)
    return "; ".join(f"{name} {human_bytes(n)} ({n / total:.0%})" for name, n in parts)


# ---- running -------------------------------------------------------------------------------------------------------


def staged_progress() -> tuple[Callable[[str, float], None], Any]:
    """A status box with a progress bar, and the library progress callback that names each stage in both."""
    status = st.status("Pruning", expanded=True)
    bar = status.progress(0.0, text="Starting")

    def progress(stage: str, fraction: float) -> None:
        bar.progress(min(max(float(fraction), 0.0), 1.0), text=stage)
        status.update(label=stage)

    return progress, status


def run_pruning(source: Source, options: RunOptions, limits: Limits, workdir: Path) -> RunResult | None:
    out_dir = workdir / f"run-{uuid.uuid4().hex[:8]}"
    progress, status = staged_progress()
    try:
        report, out_dir = pipeline.prune_file(
            source.path,
            options.settings,
            out_dir=out_dir,
            formats=formats.ALL_FORMATS,
            zstd_level=options.zstd_level,
            drop_extras=options.drop_extras,
            limits=limits,
            progress=progress,
        )
        result = RunResult(source.key, options, report, out_dir)
        progress("Checking the pruned model on sample inputs", 1.0)
        result.check = model_check(source, result, limits)
    except PruneAppError as e:
        shutil.rmtree(out_dir, ignore_errors=True)
        status.update(label="Pruning failed", state="error", expanded=False)
        st.error(str(e))
        return None
    seconds = sum(report.seconds.values())
    status.update(label=f"Pruned and measured in {seconds:.1f} s", state="complete", expanded=False)
    return result


def model_check(source: Source, result: RunResult, limits: Limits) -> ModelCheck | None:
    """Accuracy and agreement of pruned vs original, for models the app can run (the demo's architecture)."""
    dense = next((o for o in result.report.outputs if o.format == "dense"), None)
    if dense is None or not demo.has_demo_shapes({t.name: t.shape for t in result.report.tensors}):
        return None
    original = isolation.load_isolated(source.path, limits).weights  # an upload: loaded under the worker's limits
    pruned = formats.read_weights(result.out_dir / dense.path, limits)
    settings = result.options.settings
    curve_settings = settings if settings.method != "n:m" else dataclasses.replace(settings, method="global-l1")
    return ModelCheck(
        agreement=demo.agreement(original, pruned),
        method=settings.method,
        sparsity=result.report.sparsity_achieved,
        accuracy_before=demo.evaluate(original),
        accuracy_after=demo.evaluate(pruned),
        curve=demo.accuracy_curve(original, SWEEP_SPARSITIES, curve_settings),
        curve_method=curve_settings.method,
    )


def run_sweep(source: Source, result: RunResult, limits: Limits) -> None:
    settings = result.options.settings
    if settings.method == "n:m":
        settings = dataclasses.replace(settings, method="global-l1")
    progress, status = staged_progress()
    try:
        result.sweep = pipeline.sweep(
            source.path,
            SWEEP_SPARSITIES,
            settings,
            formats=formats.ALL_FORMATS,
            zstd_level=result.options.zstd_level,
            limits=limits,
            progress=progress,
        )
    except PruneAppError as e:
        status.update(label="Sweep failed", state="error", expanded=False)
        st.error(str(e))
        return
    result.sweep_method = settings.method
    status.update(label="Sweep done", state="complete", expanded=False)


# ---- results -------------------------------------------------------------------------------------------------------


def show_headline(report: Report) -> None:
    smallest = report.smallest
    cols = st.columns(4)
    cols[0].metric("Original size", human_bytes(report.input.bytes))
    if smallest is not None:
        cols[1].metric("Smallest output", human_bytes(smallest.bytes), help=f"{smallest.format}: {smallest.path}")
        cols[2].metric("Smaller by", f"{report.input.bytes / max(1, smallest.bytes):.1f} x")
    cols[3].metric(
        "Sparsity achieved",
        f"{report.sparsity_achieved:.1%}",
        help=f"Target {report.sparsity_target:.0%}, over the pruned tensors.",
    )
    for warning in report.warnings:
        st.warning(warning)


def show_sizes(report: Report) -> None:
    log = st.toggle("Log scale", key="sizes_log")
    fig = charts.size_chart(report)
    if log:
        fig.update_yaxes(type="log", range=None)
    st.plotly_chart(fig, key="size_chart")
    dense = next((o for o in report.outputs if o.format == "dense"), None)
    if dense is not None:
        st.markdown(
            f"The pruned dense file is {dense.ratio:.0%} of the original: a zero takes as many bytes as any other "
            "number, so zeros only shrink a file once it is stored sparse (CSR) or compressed (zstd)."
        )
    st.markdown(
        "Zeros save space, not inference time: the pruned model runs as fast as the original unless the runtime uses "
        "sparse kernels, such as the 2:4 (n:m) pattern on recent NVIDIA GPUs."
    )


def show_layers(report: Report) -> None:
    if report.settings.get("method") == "global-l1":
        st.caption("One global threshold spreads the zeros unevenly: layers with many small weights lose the most.")
    st.plotly_chart(charts.layer_sparsity_chart(report), key="layer_chart")


def show_histogram(report: Report) -> None:
    log = st.toggle("Log counts", value=True, key="hist_log")
    fig = charts.magnitude_histogram(report)
    if log:
        fig.update_yaxes(type="log")
    st.plotly_chart(fig, key="hist_chart")


def show_sweep(source: Source, result: RunResult, limits: Limits) -> None:
    st.caption("Prunes the model at sparsities from 0% to 99% and measures each format's size on disk.")
    if st.button("Run sweep", key="sweep"):
        run_sweep(source, result, limits)
    if result.sweep:
        if result.sweep_method != result.options.settings.method:
            st.caption(f"n:m fixes its own sparsity, so the sweep uses {result.sweep_method}.")
        st.plotly_chart(charts.sweep_chart(result.sweep), key="sweep_chart")


def show_check(check: ModelCheck) -> None:
    cols = st.columns(3)
    cols[0].metric(
        "Test accuracy", f"{check.accuracy_after:.1%}", f"{check.accuracy_after - check.accuracy_before:+.1%}"
    )
    cols[1].metric("Same prediction as the original", f"{check.agreement['top1_agreement']:.1%}")
    cols[2].metric("Largest change of an output", f"{check.agreement['max_abs_logit_diff']:.3g}")
    fig = charts.accuracy_chart(check.curve)
    fig.add_scatter(
        x=[check.sparsity], y=[check.accuracy_after], mode="markers", name=f"this run ({check.method})", marker_size=14
    )
    st.caption(f"Accuracy on the demo's held-out test set after {check.curve_method} pruning at each sparsity.")
    st.plotly_chart(fig, key="accuracy_chart")


def show_downloads(report: Report, out_dir: Path) -> None:
    smallest = report.smallest
    for output in report.outputs:
        path = out_dir / output.path
        left, right = st.columns([2, 3])
        left.download_button(
            f"{path.name} ({human_bytes(output.bytes)})",
            data=file_reader(path),
            file_name=path.name,
            mime=download_mime(path.name),
            key=f"download_{output.format}",
            on_click="ignore",
            icon=":material/download:",
            type="primary" if output is smallest else "secondary",
        )
        best = " The smallest file." if output is smallest else ""
        left.caption(
            f"{format_label(output.format)}: {output.ratio:.0%} of the original.{best} " + " ".join(output.notes)
        )
        right.code(formats.load_snippet(output.format, path.name), language="python")
    st.download_button(
        "report.json",
        data=report.to_json(),
        file_name="report.json",
        mime="application/json",
        key="download_report",
        on_click="ignore",
        icon=":material/download:",
    )


def file_reader(path: Path) -> Callable[[], bytes]:
    """Read the file only when its button is clicked, so the session never holds every output in memory."""
    return path.read_bytes


def show_results(source: Source, result: RunResult, current: RunOptions, limits: Limits) -> None:
    # Compared as dicts: each rerun re-executes this file, so RunOptions is a new class every time.
    if dataclasses.asdict(result.options) != dataclasses.asdict(current):
        st.info("The settings changed since this run: press Prune to apply them.")
    show_headline(result.report)
    names = ["Sizes", "Downloads", "Per layer", "Weights", "Sweep"] + (["Model check"] if result.check else [])
    tabs = st.tabs(names, key="result_tabs")
    with tabs[0]:
        show_sizes(result.report)
    with tabs[1]:
        show_downloads(result.report, result.out_dir)
    with tabs[2]:
        show_layers(result.report)
    with tabs[3]:
        show_histogram(result.report)
    with tabs[4]:
        show_sweep(source, result, limits)
    if result.check:
        with tabs[5]:
            show_check(result.check)


def forget_result() -> None:
    result = st.session_state.pop("result", None)
    if result is not None:
        shutil.rmtree(result.out_dir, ignore_errors=True)


def main() -> None:
    st.set_page_config(layout="wide", page_title="pruneapp", page_icon=":material/content_cut:")
    limits = default_limits()
    workdir = session_dir()
    st.title("pruneapp")
    st.caption("Prune a PyTorch model and download checkpoints that really are smaller on disk.")
    source = sidebar_source(limits, workdir)
    result: RunResult | None = st.session_state.get("result")
    if result is not None and (result.source_key != source.key or not result.out_dir.is_dir()):
        forget_result()  # another file, or the outputs went with an idle session's directory
        result = None
    info = inspect_source(source, limits)
    options = sidebar_settings(info if isinstance(info, Inspection) else None)
    clicked = st.sidebar.button("Prune", key="prune", type="primary", width="stretch")
    if isinstance(info, str):
        st.error(info)
        return
    show_inspection(source, info, collapsed=clicked or result is not None)
    with st.container():  # always present, so the elements below keep their place (and the open tab) across reruns
        if clicked:
            new = run_pruning(source, options, limits, workdir)
            if new is not None:
                forget_result()
                st.session_state.result = result = new
    if result is None:
        st.info("Choose a method and sparsity in the sidebar, then press Prune.")
        return
    show_results(source, result, options, limits)


if __name__ == "__main__":
    main()
