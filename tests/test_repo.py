"""The repository's own promises: lint-clean code, the README's two commands, pinned torch."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_exactly_two_commands_app_then_tests() -> None:
    first_lines = (ROOT / "README.md").read_text().splitlines()[:8]
    assert "```bash" in first_lines
    app, tests = readme_commands()
    assert "requirements.txt" in app and "streamlit run app.py" in app
    assert "requirements-dev.txt" in tests and tests.endswith("python -m pytest")


def test_ci_runs_the_readmes_test_command() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    extracted = subprocess.run(
        ["bash", "-c", "grep -m1 -A1 '^# Run the tests' README.md | tail -n1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert extracted == readme_commands()[1]
    assert "grep -m1 -A1 '^# Run the tests' README.md" in script
    assert "|| true" not in script  # a failing or empty test run must fail CI


def test_torch_is_pinned_to_the_cpu_build_on_disk() -> None:
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text().splitlines()


def test_package_installs_a_console_command() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["pruneapp"] == "pruneapp.__main__:main"


def ruff() -> str:
    found = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed; pip install -r requirements-dev.txt")
    return found


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_code_is_ruff_clean(args: list[str]) -> None:
    done = subprocess.run([ruff(), *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_library_never_imports_streamlit() -> None:
    offenders = [
        p.name
        for p in (ROOT / "pruneapp").glob("*.py")
        if re.search(r"^\s*(import|from) streamlit", p.read_text(), re.M)
    ]
    assert offenders == []


def test_public_api_names_resolve() -> None:
    import pruneapp

    assert all(getattr(pruneapp, name) is not None for name in pruneapp.__all__)
    with pytest.raises(AttributeError):
        _ = pruneapp.no_such_name
