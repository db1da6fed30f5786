"""Start the isolated loading server early, before torch is imported here, so the two imports overlap.

This module imports nothing heavy: ``python -m pruneapp prune`` calls ``launch()`` first thing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

_lock = threading.Lock()
_early: subprocess.Popen[bytes] | None = None


def server_process() -> subprocess.Popen[bytes]:
    """A new fork-server process (``pruneapp.isolation.serve``) with pipes on stdin and stdout."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p or os.curdir for p in sys.path),
        "MALLOC_ARENA_MAX": "2",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    return subprocess.Popen(
        [sys.executable, "-c", "from pruneapp.isolation import serve; serve()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,  # a Ctrl-C meant for the app does not reach half-finished loads
    )


def launch() -> None:
    """Start the server now; the first isolated load takes it over."""
    global _early
    with _lock:
        if _early is None:
            _early = server_process()


def take() -> subprocess.Popen[bytes]:
    """The server started by ``launch()`` if it is still running, else a new one."""
    global _early
    with _lock:
        proc, _early = _early, None
    return proc if proc is not None and proc.poll() is None else server_process()
