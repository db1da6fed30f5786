"""The Streamlit app driven headless with AppTest: the demo run, every method, a good and a bad upload."""

from __future__ import annotations

import os
import time
import tomllib
from pathlib import Path

import pytest
import torch
from starlette.middleware.gzip import DEFAULT_EXCLUDED_CONTENT_TYPES
from streamlit.testing.v1 import AppTest

import app
from pruneapp import demo, formats
from pruneapp.limits import Limits
from pruneapp.pruning import METHODS

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024**2


@pytest.fixture
def at(session_tmp: Path) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def prune(at: AppTest) -> AppTest:
    at.button(key="prune").click().run()
    assert not at.exception
    assert not at.error, [e.value for e in at.error]
    return at


def result(at: AppTest):
    return at.session_state["result"]


def test_upload_limit_agrees_with_the_library() -> None:
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    limit_mb = config["server"]["maxUploadSize"]
    assert limit_mb * MiB == Limits().max_file_bytes
    assert limit_mb >= 1024


def test_opens_on_the_demo_model(at: AppTest) -> None:
    n_params = sum(t.numel() for t in demo.DigitsCNN().state_dict().values())
    assert metrics(at)["Parameters"] == f"{n_params:,}"
    assert "Demo model" in at.subheader[0].value
    assert at.file_uploader(key="upload").proto.max_upload_size_mb == Limits().max_file_bytes // MiB
    assert "session_dir" in at.session_state and "result" not in at.session_state
    assert at.slider(key="sparsity").value == 80


def test_demo_run_shows_results_and_one_download_per_output(at: AppTest) -> None:
    prune(at)
    report = result(at).report
    shown = metrics(at)
    assert shown["Sparsity achieved"] == f"{report.sparsity_achieved:.1%}"
    assert abs(report.sparsity_achieved - 0.8) < 0.01
    assert float(shown["Smaller by"].split()[0]) > 1.5
    assert {t.label for t in at.tabs} >= {"Sizes", "Downloads", "Per layer", "Weights", "Sweep", "Model check"}
    assert len(at.get("plotly_chart")) >= 4  # sizes, per layer, histogram, accuracy
    labels = [b.label for b in at.get("download_button")]
    assert len(labels) == len(report.outputs) + 1
    for output in report.outputs:
        assert (result(at).out_dir / output.path).is_file()
        assert any(label.startswith(output.path) for label in labels)
    assert {o.format for o in report.outputs} == set(formats.ALL_FORMATS)
    assert len(at.code) == len(report.outputs)
    check = result(at).check
    assert check is not None and 0.0 <= check.agreement["top1_agreement"] <= 1.0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs(at: AppTest, method: str) -> None:
    at.selectbox(key="method").set_value(method).run()
    if method == "n:m":
        at.selectbox(key="nm").set_value("1:4").run()
    prune(at)
    report = result(at).report
    assert report.settings["method"] == method
    expected = 0.75 if method == "n:m" else 0.8
    assert abs(report.sparsity_achieved - expected) < 0.05


def test_sweep_runs_on_demand_without_touching_the_run(at: AppTest) -> None:
    prune(at)
    before = result(at)
    charts_before = len(at.get("plotly_chart"))
    assert before.sweep is None
    at.button(key="sweep").click().run()
    assert not at.exception and not at.error
    points = result(at).sweep
    assert [p.sparsity for p in points] == list(app.SWEEP_SPARSITIES)
    assert all(set(p.bytes) == set(formats.ALL_FORMATS) for p in points)
    assert result(at).out_dir == before.out_dir and result(at).report is before.report
    assert len(at.get("plotly_chart")) == charts_before + 1


def test_changing_a_setting_does_not_rerun_pruning(at: AppTest) -> None:
    prune(at)
    before = result(at)
    at.slider(key="sparsity").set_value(50).run()
    at.toggle(key="sizes_log").set_value(True).run()
    assert not at.exception
    assert result(at).out_dir == before.out_dir
    assert result(at).report.sparsity_target == pytest.approx(0.8)
    assert any("press Prune" in i.value for i in at.info)
    prune(at)
    assert result(at).report.sparsity_target == pytest.approx(0.5)
    assert not before.out_dir.exists()  # the previous run's files are removed


def test_upload_of_a_checkpoint_is_inspected_pruned_and_downloadable(
    at: AppTest, checkpoint_file: Path, session_tmp: Path
) -> None:
    at.file_uploader(key="upload").set_value(("ckpt.pth", checkpoint_file.read_bytes(), "application/octet-stream"))
    at.run()
    assert not at.exception and not at.error
    assert at.subheader[0].value == "ckpt.pth"
    assert "optimizer" in " ".join(m.value for m in at.markdown)
    saved = list(session_tmp.glob("pruneapp-session-*/upload/ckpt.pth"))
    assert len(saved) == 1 and saved[0].read_bytes() == checkpoint_file.read_bytes()
    at.checkbox(key="drop_extras").check().run()
    prune(at)
    report = result(at).report
    assert report.settings["drop_extras"] is True
    assert all(o.path.startswith("ckpt.") for o in report.outputs)
    assert result(at).check is None and "Model check" not in {t.label for t in at.tabs}
    dense = next(o for o in report.outputs if o.format == "dense")
    pruned = formats.read_weights(result(at).out_dir / dense.path)
    original = torch.load(checkpoint_file, weights_only=True)["model_state_dict"]
    assert set(pruned) == set(original)


def test_bad_upload_shows_one_line_error_and_app_stays_usable(at: AppTest, session_tmp: Path) -> None:
    at.file_uploader(key="upload").set_value(("junk.pt", b"this is not a model", "application/octet-stream"))
    at.run()
    assert not at.exception
    assert len(at.error) == 1
    message = at.error[0].value
    assert message and "\n" not in message and "Traceback" not in message
    assert "result" not in at.session_state
    at.file_uploader(key="upload").set_value(None)
    at.run()
    assert not at.exception and not at.error
    assert not list(session_tmp.glob("pruneapp-session-*/upload/*"))  # the bad upload is deleted
    prune(at)
    assert result(at).report.input.path == str(demo.DEMO_MODEL_PATH)


def test_stale_session_directories_are_removed(session_tmp: Path) -> None:
    stale = session_tmp / f"{app.SESSION_DIR_PREFIX}old"
    fresh = session_tmp / f"{app.SESSION_DIR_PREFIX}recent"
    for path in (stale, fresh):
        path.mkdir()
        (path / "model.pt").write_bytes(b"x")
    old = time.time() - app.STALE_SESSION_SECONDS - 60
    os.utime(stale, (old, old))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception
    assert not stale.exists() and fresh.exists()


def test_session_directory_is_removed_with_the_session(session_tmp: Path) -> None:
    session = app.SessionDir()
    path = session.path
    assert path.is_dir() and path.parent == session_tmp
    del session
    assert not path.exists()


@pytest.mark.parametrize("fmt", formats.ALL_FORMATS)
@pytest.mark.parametrize("safetensors", [False, True])
def test_downloads_use_a_content_type_the_server_does_not_gzip(fmt: str, safetensors: bool) -> None:
    name = formats.output_name("model", fmt, safetensors=safetensors)
    assert app.download_mime(name) in DEFAULT_EXCLUDED_CONTENT_TYPES


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.pt", "model.pt"),
        ("../../etc/passwd", "passwd"),
        ("my model (1).bin", "my_model_1_.bin"),
        ("..", "model"),
    ],
)
def test_upload_names_are_made_safe_for_paths(name: str, expected: str) -> None:
    assert app.safe_file_name(name) == expected
