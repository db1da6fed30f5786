"""Reading our own formats back (read_weights) is untrusted input too: crafted .zst and CSR files are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile_cases import CASES, TEST_LIMITS, Case, assert_outcome, params

from pruneapp.errors import PruneAppError
from pruneapp.formats import read_weights
from pruneapp.loading import LoadedModel

# Cases that need the worker's memory limit stay out: read_weights runs in this process.
READ_CASES = [c for c in CASES if (c.name.startswith("zstd") or "CSR" in c.name) and not c.worker_limit]


def read(path: Path) -> LoadedModel | PruneAppError:
    """read_weights' result as a LoadedModel, so that the cases' checks apply unchanged."""
    try:
        weights = read_weights(path, TEST_LIMITS)
    except PruneAppError as e:
        return e
    return LoadedModel(path, "output", "state_dict", weights)


@pytest.mark.parametrize("case", params(READ_CASES))
def test_read_weights_refuses_crafted_outputs(case: Case, tmp_path: Path) -> None:
    path = case.build(tmp_path)
    assert_outcome(case, read(path), tmp_path, path)
