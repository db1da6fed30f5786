"""Every hostile case through the isolated loader: the right refusal (or an exact load), and no payload ran."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile_cases import CASES, Case, assert_outcome, params

from pruneapp.isolation import run_isolated


@pytest.mark.parametrize("case", params(CASES))
def test_hostile_file_isolated(case: Case, tmp_path: Path) -> None:
    path = case.build(tmp_path)
    run = run_isolated(path, case.limits)
    assert_outcome(case, run.error or run.model, tmp_path, path)
    # The loader itself must bound every case it can; the worker's limits are the backstop for the rest.
    assert run.limit == case.worker_limit
