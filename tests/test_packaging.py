"""What can be checked here of the container and cluster files: the Dockerfile (hadolint) and the shell
scripts (shellcheck), where those linters are installed; the CI script runs the README's test command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


def _tool(name: str) -> str:
    found = shutil.which(name) or (str(Path(sys.executable).parent / name)
                                   if (Path(sys.executable).parent / name).exists() else None)
    if found is None:
        pytest.skip(f"{name} is not installed here")
    return found


def test_the_dockerfile_passes_hadolint():
    completed = subprocess.run([_tool("hadolint"), "Dockerfile"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_the_shell_scripts_pass_shellcheck():
    scripts = ["setup.sh", ".ci/run", "examples/slurm/common.sh", *sorted(
        str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "examples" / "slurm").glob("*.sbatch"))]
    completed = subprocess.run([_tool("shellcheck"), "-x", *scripts], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_ci_runs_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    command = "./setup.sh && .venv/bin/python -m pytest -q tests"
    assert command in readme
    assert command in (REPO_ROOT / ".ci" / "run").read_text()
