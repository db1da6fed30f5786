"""The app in a real browser (`streamlit run` on a loopback port, Debian chromium via playwright): upload, prune,
see the charts, download the outputs and read them back.

Set PRUNEAPP_UPDATE_SCREENSHOT=1 to refresh assets/screenshot.png from the demo run (the README shows it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from pruneapp.formats import read_weights
from pruneapp.pruning import PruneSettings, prune

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
APP = "[data-testid=stApp]"
BIG_TIMEOUT_MS = 240_000
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--no-sandbox",
]
START_SECONDS = 90
# The app's starting settings: the first method, 80% sparsity, on the CPU.
APP_DEFAULTS = PruneSettings(method="global-l1", sparsity=0.8, device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    pytest.fail(f"streamlit did not become healthy in {START_SECONDS} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install -y --no-install-recommends chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture(scope="module")
def app_url(chromium: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app's URL; its temp files (uploads, outputs) go to a directory of this test session."""
    work = tmp_path_factory.mktemp("server")
    log = work / "streamlit.log"
    port = free_port()
    command = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true"]
    command += ["--server.address", "127.0.0.1", "--server.port", str(port), "--server.fileWatcherType", "none"]
    command += ["--browser.gatherUsageStats", "false"]
    env = {**os.environ, "TMPDIR": str(work)}
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(chromium: Path) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url: str) -> Iterator:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(app_url)
    yield page
    context.close()


def wait_idle(page, timeout: float = 60_000) -> None:
    page.wait_for_selector(f"{APP}[data-test-connection-state=CONNECTED]", timeout=timeout)
    page.wait_for_selector(f"{APP}[data-test-script-state=notRunning]", timeout=timeout)


def upload(page, path: Path, timeout: float = 60_000) -> None:
    page.locator("[data-testid=stFileUploaderDropzoneInput]").set_input_files(str(path))
    page.locator("h3").filter(has_text=path.name).wait_for(timeout=timeout)
    wait_idle(page, timeout)


def press_prune(page, timeout: float = 60_000) -> None:
    page.get_by_role("button", name="Prune", exact=True).click()
    page.locator("[data-testid=stMetric]").filter(has_text="Smallest output").wait_for(timeout=timeout)
    wait_idle(page, timeout)


def wait_chart(page) -> None:
    """Wait until a plotly chart is drawn in the open tab (charts in the other tabs are hidden)."""
    page.locator("[data-testid=stPlotlyChart] .main-svg").filter(visible=True).first.wait_for()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    wait_idle(page)


def download(page, file_name: str, dest: Path, timeout: float = 60_000) -> tuple[Path, float]:
    """Click the download button of ``file_name``; return the saved file and the seconds until it was complete."""
    button = page.locator("[data-testid=stDownloadButton] button").filter(
        has_text=re.compile(rf"{re.escape(file_name)} \(")
    )
    start = time.perf_counter()
    with page.expect_download(timeout=timeout) as info:
        button.click()
    done = info.value
    done.path()  # waits for the whole file
    seconds = time.perf_counter() - start
    assert done.failure() is None
    assert done.suggested_filename == file_name
    target = dest / file_name
    done.save_as(target)
    return target, seconds


def download_report(page, dest: Path) -> dict:
    button = page.locator("[data-testid=stDownloadButton] button").filter(has_text="report.json")
    with page.expect_download() as info:
        button.click()
    target = dest / "report.json"
    info.value.save_as(target)
    return json.loads(target.read_text())


def save_model(path: Path, *layers: nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = nn.Sequential(*layers).state_dict()
    torch.save(state, path)
    return state


def test_demo_run_shows_charts_and_sweeps_on_demand(page, tmp_path: Path) -> None:
    wait_idle(page)
    page.locator("h3").filter(has_text="Demo model").wait_for()
    press_prune(page)
    wait_chart(page)
    open_tab(page, "Model check")
    page.locator("[data-testid=stMetric]").filter(has_text="Same prediction as the original").wait_for()
    open_tab(page, "Sweep")
    page.get_by_role("button", name="Run sweep").click()
    page.get_by_text("Sweep done").wait_for()
    wait_idle(page)
    assert page.get_by_role("tab", selected=True).inner_text() == "Sweep"  # the rerun keeps the open tab
    wait_chart(page)
    open_tab(page, "Sizes")
    wait_chart(page)
    page.set_viewport_size({"width": 1440, "height": 1250})
    page.mouse.move(0, 0)
    page.wait_for_timeout(1000)  # let the tab underline finish sliding
    shot = tmp_path / "screenshot.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("PRUNEAPP_UPDATE_SCREENSHOT"):
        shutil.copyfile(shot, ROOT / "assets" / "screenshot.png")


def test_upload_prune_and_download_outputs_that_load_back(page, tmp_path: Path) -> None:
    model = tmp_path / "upload" / "mlp.pt"
    model.parent.mkdir()
    original = save_model(model, nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    wait_idle(page)
    upload(page, model)
    press_prune(page)
    wait_chart(page)
    open_tab(page, "Per layer")
    wait_chart(page)
    open_tab(page, "Downloads")
    report = download_report(page, tmp_path)
    sizes = {o["format"]: (o["path"], o["bytes"]) for o in report["outputs"]}
    expected = prune(original, APP_DEFAULTS).weights
    for fmt in ("dense", "csr", "dense.zst", "csr.zst", "packed"):
        name, size = sizes[fmt]
        path, _ = download(page, name, tmp_path)
        assert path.stat().st_size == size
        weights = read_weights(path)
        assert set(weights) == set(expected)
        for key, tensor in expected.items():
            assert torch.equal(weights[key], tensor), f"{fmt}: {key}"


def test_20m_parameter_model_from_upload_to_results(page, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "upload" / "mlp20m.pt"
    model.parent.mkdir()
    state = save_model(model, nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 10))
    n_params = sum(t.numel() for t in state.values())
    assert n_params >= 20_000_000
    del state
    wait_idle(page)
    start = time.perf_counter()
    upload(page, model, timeout=BIG_TIMEOUT_MS)
    inspected = time.perf_counter()
    press_prune(page, timeout=BIG_TIMEOUT_MS)
    done = time.perf_counter()
    open_tab(page, "Downloads")
    report = download_report(page, tmp_path)
    largest = max(report["outputs"], key=lambda o: o["bytes"])
    path, seconds = download(page, largest["path"], tmp_path, timeout=BIG_TIMEOUT_MS)
    assert path.stat().st_size == largest["bytes"]
    with capsys.disabled():
        print(
            f"\n[e2e] {n_params:,} parameters, {model.stat().st_size / 1e6:.1f} MB: upload to results "
            f"{done - start:.1f} s (upload + inspection {inspected - start:.1f} s, pruning {done - inspected:.1f} s); "
            f"download of {largest['path']} ({largest['bytes'] / 1e6:.1f} MB) {seconds:.2f} s"
        )
