"""Pickle payloads for tests that prove no code from a file runs: each creates a marker file if it ever does."""

from __future__ import annotations

from pathlib import Path


def touch(path: str) -> None:
    """A harmless gadget: plain pickle.loads of a payload that names it creates the marker file."""
    Path(path).write_text("ran")


class Payload:
    """Pickles as a call of ``func(*args)``, the shape of every code-execution payload."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args
