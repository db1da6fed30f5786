"""Resource limits for reading untrusted files, in one place.

Defaults suit real models (a few thousand tensors, up to a few GB). Each can be changed
with an environment variable ``PRUNEAPP_<FIELD>`` (for example ``PRUNEAPP_MAX_FILE_BYTES``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from pruneapp.errors import SettingsError

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class Limits:
    """Upper bounds applied while reading a file; exceeding one raises LimitExceededError."""

    max_file_bytes: int = 2 * GiB  # uploads and inputs on disk
    max_tensors: int = 50_000  # real models have at most a few thousand
    max_total_elements: int = 4 * 1024**3  # ~16 GB of fp32
    max_tensor_elements: int = 2 * 1024**3
    max_depth: int = 31  # nesting of containers, counted along shared references
    max_pickle_bytes: int = 256 * MiB  # data.pkl / header of a file
    max_zip_entries: int = 200_000
    max_decompressed_bytes: int = 4 * GiB  # output cap for .zst inputs; at most worker_memory_bytes
    worker_memory_bytes: int = 4 * GiB  # memory one isolated load may use on top of the loader itself
    worker_cpu_seconds: int = 120  # CPU time of one isolated load
    max_concurrent_loads: int = 2  # isolated loads at once in this process; further uploads wait their turn
    worker_wall_seconds: int = 180  # wall time of one isolated load

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Limits:
        """Defaults, overridden by any ``PRUNEAPP_<FIELD>`` variables set."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(f"PRUNEAPP_{field.name.upper()}")
            if raw is None:
                continue
            try:
                values[field.name] = int(raw)
            except ValueError:
                values[field.name] = 0
            if values[field.name] <= 0:
                raise SettingsError(
                    f"PRUNEAPP_{field.name.upper()}={raw!r} is not a positive whole number; set it to a byte or item"
                    " count, or unset it for the default."
                )
        return cls(**values)


def default_limits() -> Limits:
    """The limits in force for this process (defaults plus environment overrides)."""
    return Limits.from_env()
