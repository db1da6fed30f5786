"""Concurrent app sessions in one process, as a Streamlit server runs them: each session gets its own results, a
failed or worker-killed load in one leaves the other alone, and a session's files go when it ends or sits idle."""

from __future__ import annotations

import gc
import io
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from unittest.mock import MagicMock

import pytest
import torch
import zstandard
from streamlit import config
from streamlit.runtime import Runtime
from streamlit.runtime.dataframe_source_manager import DataframeSourceManager
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.runtime.scriptrunner.script_cache import ScriptCache
from streamlit.testing.v1 import AppTest, local_script_runner
from streamlit.testing.v1 import app_test as app_test_module
from streamlit.testing.v1.util import build_mock_config_get_option

import app
from pruneapp import demo, formats, pipeline
from pruneapp.report import Report

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024**2
WORKER_MEMORY = 32 * MiB  # the demo loads in far less; the bomb below needs twice as much


class _RunRuntime(Runtime):
    """Takes the Runtime instance AppTest sets and clears around each run, so the shared one stays in place."""


@pytest.fixture
def new_session(session_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], AppTest]:
    """Open app sessions that may run at the same time, in threads of this process as a server runs them.

    AppTest swaps two process-wide objects around every run: it sets ``Runtime._instance`` and clears it to None
    afterwards, and patches ``config.get_option`` then restores it. Overlapping runs would pull them from under each
    other (the first run to finish clears the runtime the other's script thread needs at its next start). It also
    compiles app.py afresh for every run, and two threads in ``ast.parse`` at once can fail on CPython 3.11
    (python/cpython#106905). Here all three stay fixed for the test: one runtime and one script cache shared by every
    session, as a real server has them, and a get_option that keeps AppTest's override.
    """
    runtime = MagicMock(spec=Runtime)
    runtime.media_file_mgr = MediaFileManager(MemoryMediaFileStorage("/mock/media"))
    runtime.dataframe_source_mgr = DataframeSourceManager()
    monkeypatch.setattr(app_test_module, "Runtime", _RunRuntime)
    monkeypatch.setattr(Runtime, "_instance", runtime)
    monkeypatch.setattr(config, "get_option", build_mock_config_get_option({"global.appTest": True}))
    script_cache = ScriptCache()
    for module in (app_test_module, local_script_runner):
        monkeypatch.setattr(module, "ScriptCache", lambda: script_cache)

    def start() -> AppTest:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
        at.run()
        assert not at.exception
        return at

    return start


def run_together(*runs: Callable[[], object]) -> None:
    """Start every run at the same moment, each in its own thread, and check that they overlapped in time."""
    barrier = threading.Barrier(len(runs))
    spans: dict[int, tuple[float, float]] = {}
    failures: list[BaseException] = []

    def go(i: int, run: Callable[[], object]) -> None:
        barrier.wait()
        start = time.perf_counter()
        try:
            run()
        except BaseException as e:  # re-raised in the test's thread below
            failures.append(e)
        spans[i] = (start, time.perf_counter())

    threads = [threading.Thread(target=go, args=(i, run)) for i, run in enumerate(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    assert max(s for s, _ in spans.values()) < min(e for _, e in spans.values()), spans


def choose(at: AppTest, method: str, percent: int) -> AppTest:
    at.selectbox(key="method").set_value(method).run()
    at.slider(key="sparsity").set_value(percent).run()
    assert not at.exception
    return at


def session_path(at: AppTest) -> Path:
    return at.session_state["session_dir"].path


def assert_own_run(at: AppTest, method: str, percent: int, tmp_path: Path) -> Report:
    """The session shows a run with its own settings, stored in its own directory, equal to a run on its own."""
    assert not at.exception
    assert not at.error, [e.value for e in at.error]
    result = at.session_state["result"]
    report = result.report
    assert report.settings["method"] == method
    assert report.sparsity_target == pytest.approx(percent / 100)
    assert abs(report.sparsity_achieved - percent / 100) < 0.01
    assert {m.label: m.value for m in at.metric}["Sparsity achieved"] == f"{report.sparsity_achieved:.1%}"
    assert result.out_dir.parent == session_path(at)
    assert zero_share(result.out_dir, report) == pytest.approx(report.sparsity_achieved)
    ref_report, ref_dir = pipeline.prune_file(
        demo.DEMO_MODEL_PATH,
        result.options.settings,
        out_dir=Path(tempfile.mkdtemp(prefix="alone-", dir=tmp_path)),
        formats=formats.ALL_FORMATS,
        zstd_level=result.options.zstd_level,
    )
    assert [o.format for o in report.outputs] == [o.format for o in ref_report.outputs]
    expected = dense_weights(ref_dir, ref_report)
    for output in report.outputs:  # every format is there and reads back to the same tensors as the solo run
        got = formats.read_weights(result.out_dir / output.path)
        assert set(got) == set(expected), output.format
        assert all(torch.equal(got[k], expected[k]) for k in expected), output.format
    return report


def dense_weights(out_dir: Path, report: Report) -> dict[str, torch.Tensor]:
    dense = next(o for o in report.outputs if o.format == "dense")
    return formats.read_weights(out_dir / dense.path)


def zero_share(out_dir: Path, report: Report) -> float:
    """Share of zeros over the pruned tensors, counted in the dense file on disk."""
    weights = dense_weights(out_dir, report)
    pruned = [weights[t.name] for t in report.tensors if t.pruned and t.tied_to is None]
    return sum(int((w == 0).sum()) for w in pruned) / sum(w.numel() for w in pruned)


def memory_bomb() -> bytes:
    """A few KB of zstd around a valid torch file whose one tensor needs 64 MB once loaded."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2 * WORKER_MEMORY // 4)}, buffer)
    return zstandard.ZstdCompressor(level=1).compress(buffer.getvalue())


class _Payload:
    """Pickles as a call to os.system that would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def code_payload(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(4), "hook": _Payload(marker)}, buffer)
    return buffer.getvalue()


def test_two_sessions_pruning_at_once_get_their_own_results(new_session: Callable[[], AppTest], tmp_path: Path) -> None:
    a = choose(new_session(), "global-l1", 50)
    b = choose(new_session(), "layer-l1", 90)
    assert session_path(a) != session_path(b)
    a.button(key="prune").click()
    b.button(key="prune").click()
    run_together(a.run, b.run)
    assert_own_run(a, "global-l1", 50, tmp_path)
    assert_own_run(b, "layer-l1", 90, tmp_path)
    a.button(key="sweep").click()
    b.button(key="sweep").click()
    run_together(a.run, b.run)
    for at, method in ((a, "global-l1"), (b, "layer-l1")):
        assert not at.exception and not at.error
        result = at.session_state["result"]
        assert result.sweep_method == method and [p.sparsity for p in result.sweep] == list(app.SWEEP_SPARSITIES)
    assert a.session_state["result"].sweep != b.session_state["result"].sweep  # global vs per-layer thresholds


@pytest.mark.parametrize("hostile", ["memory bomb", "code payload"])
def test_a_failed_load_in_one_session_leaves_the_other_alone(
    new_session: Callable[[], AppTest], tmp_path: Path, session_tmp: Path, monkeypatch: pytest.MonkeyPatch, hostile: str
) -> None:
    monkeypatch.setenv("PRUNEAPP_WORKER_MEMORY_BYTES", str(WORKER_MEMORY))  # the server's limit, for both sessions
    marker = tmp_path / "payload-ran"
    name, data, expected = {
        "memory bomb": ("zeros.pt.zst", memory_bomb(), "PRUNEAPP_WORKER_MEMORY_BYTES"),
        "code payload": ("hook.pt", code_payload(marker), "never runs code"),
    }[hostile]
    a, b = new_session(), choose(new_session(), "global-l1", 70)
    a.file_uploader(key="upload").set_value((name, data, "application/octet-stream"))
    b.button(key="prune").click()
    run_together(a.run, b.run)

    assert not a.exception and len(a.error) == 1
    message = a.error[0].value
    assert expected in message and name in message and "\n" not in message and "Traceback" not in message
    assert "result" not in a.session_state and not marker.exists()
    assert_own_run(b, "global-l1", 70, tmp_path)

    a.file_uploader(key="upload").set_value(None)  # A goes on with the demo, while B runs a sweep
    a.run()
    assert not a.exception and not a.error
    assert not (session_path(a) / "upload").exists()
    choose(a, "global-l1", 40).button(key="prune").click()
    b.button(key="sweep").click()
    run_together(a.run, b.run)
    assert_own_run(a, "global-l1", 40, tmp_path)
    assert_own_run(b, "global-l1", 70, tmp_path)
    assert len(b.session_state["result"].sweep) == len(app.SWEEP_SPARSITIES)


def test_ending_a_session_removes_its_files_and_only_its_files(
    new_session: Callable[[], AppTest], tmp_path: Path
) -> None:
    sessions = [choose(new_session(), "global-l1", 60), choose(new_session(), "global-l1", 80)]
    for at in sessions:
        at.button(key="prune").click()
    run_together(*(at.run for at in sessions))
    ended, kept = (session_path(at) for at in sessions)
    kept_files = sorted(p for p in kept.rglob("*") if p.is_file())
    assert list(ended.rglob("*.pt")) and kept_files
    del sessions[0]  # Streamlit drops a session's state when the session ends
    gc.collect()
    assert not ended.exists()
    assert sorted(p for p in kept.rglob("*") if p.is_file()) == kept_files
    sessions[0].run()
    assert_own_run(sessions[0], "global-l1", 80, tmp_path)


def test_a_session_idle_past_the_time_limit_loses_its_files_and_keeps_working(
    new_session: Callable[[], AppTest], tmp_path: Path, session_tmp: Path
) -> None:
    idle = choose(new_session(), "global-l1", 70)
    idle.button(key="prune").click().run()
    old_dir = session_path(idle)
    old = time.time() - app.STALE_SESSION_SECONDS - 60
    os.utime(old_dir, (old, old))
    other = new_session()  # a new session sweeps up directories untouched for the time limit
    assert not old_dir.exists() and session_path(other).is_dir()

    idle.run()
    assert not idle.exception and not idle.error
    assert old_dir.is_dir() and "result" not in idle.session_state
    assert any("press Prune" in i.value for i in idle.info)
    idle.button(key="prune").click().run()
    assert_own_run(idle, "global-l1", 70, tmp_path)
    assert sorted(p.parent for p in session_tmp.glob(f"{app.SESSION_DIR_PREFIX}*/*/report.json")) == [
        idle.session_state["result"].out_dir
    ]
