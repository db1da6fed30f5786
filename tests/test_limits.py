from __future__ import annotations

import pytest

from pruneapp.errors import SettingsError
from pruneapp.limits import Limits


def test_environment_overrides_each_limit() -> None:
    limits = Limits.from_env({"PRUNEAPP_MAX_TENSORS": "10", "PRUNEAPP_WORKER_MEMORY_BYTES": "1048576"})
    assert limits.max_tensors == 10 and limits.worker_memory_bytes == 1024**2
    assert limits.max_file_bytes == Limits().max_file_bytes


@pytest.mark.parametrize("raw", ["-5", "0", "lots", "1.5"])
def test_a_limit_must_be_a_positive_whole_number(raw: str) -> None:
    with pytest.raises(SettingsError, match="PRUNEAPP_MAX_TENSORS.*positive whole number"):
        Limits.from_env({"PRUNEAPP_MAX_TENSORS": raw})


def test_defaults_refuse_what_no_real_model_needs() -> None:
    limits = Limits()
    assert limits.max_tensors < 100_000 and limits.max_depth < 32
    assert limits.max_file_bytes >= 1024**3
    assert limits.max_decompressed_bytes <= limits.worker_memory_bytes
