"""The payloads are live (an unsafe loader runs them), and pruneapp never runs them: isolated, in-process, and with
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 set."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import hostile_craft as craft
import pytest
import torch
from hostile_cases import CASES, CODE_CASES, PAYLOAD_CASES, TEST_LIMITS, Case, assert_outcome, params

from pruneapp.errors import LimitExceededError, PruneAppError
from pruneapp.isolation import run_isolated
from pruneapp.loading import LoadedModel, load_model

ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
ENV_CASES = [
    *(c for c in PAYLOAD_CASES if c.name.split(" in ")[0] in ("payload os.system", "payload torch.load")),
    *(c for c in CASES if c.name in ("zstd around a malicious pickle", "checkpoint holding argparse.Namespace")),
]


def load_in_process(path: Path) -> LoadedModel | PruneAppError:
    try:
        return load_model(path, TEST_LIMITS)
    except PruneAppError as e:
        return e


@pytest.mark.parametrize("kind", craft.PAYLOADS)
def test_payload_runs_when_unpickled_unsafely(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control for every marker test: plain pickle runs each payload (the nested torch.load needs ENV)."""
    monkeypatch.setenv(ENV, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that ENV turned weights_only off
        pickle.loads(pickle.dumps(craft.payload(kind, tmp_path)))
    assert craft.marker(tmp_path).exists()


@pytest.mark.parametrize("container", ["zip", "checkpoint", "legacy", "pickle"])
def test_container_runs_payload_under_unsafe_loader(container: str, tmp_path: Path) -> None:
    path = craft.payload_file("os.system", container, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if container == "pickle":
            pickle.loads(path.read_bytes())
        else:
            torch.load(path, weights_only=False)
    assert craft.marker(tmp_path).exists()


def test_script_setstate_runs_under_jit_load(tmp_path: Path) -> None:
    path = craft.script_file(tmp_path, craft.ScriptWrites(str(craft.marker(tmp_path))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.load(path)
    assert craft.marker(tmp_path).exists()


def test_script_forward_writes_when_called(tmp_path: Path) -> None:
    path = craft.script_file(tmp_path, craft.ScriptForwardWrites(str(craft.marker(tmp_path))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.load(path)(torch.ones(1, 3))
    assert craft.marker(tmp_path).exists()


def test_script_setstate_loop_is_stopped_by_the_worker_limits(tmp_path: Path) -> None:
    """torch.jit.load really loops on this archive; in a worker it is stopped, with a clear message."""
    path = craft.script_file(tmp_path, craft.ScriptLoops())
    run = run_isolated(path, TEST_LIMITS, cpu_s=1, timeout_s=5, loader="hostile_craft:jit_load")
    assert run.limit == "cpu" and isinstance(run.error, LimitExceededError)
    assert "CPU time" in str(run.error) and "PRUNEAPP_WORKER_CPU_SECONDS" in str(run.error)


@pytest.mark.parametrize("case", params([*PAYLOAD_CASES, *CODE_CASES]))
def test_payload_in_process(case: Case, tmp_path: Path) -> None:
    path = case.build(tmp_path)
    assert_outcome(case, load_in_process(path), tmp_path, path)


@pytest.mark.parametrize("case", params(ENV_CASES))
def test_force_no_weights_only_changes_nothing(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "1")
    path = case.build(tmp_path)
    assert_outcome(case, load_in_process(path), tmp_path, path)
    run = run_isolated(path, TEST_LIMITS)
    assert_outcome(case, run.error or run.model, tmp_path, path)
