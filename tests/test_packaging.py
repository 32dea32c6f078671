"""What can be checked here of the container and cluster files: the Dockerfile (hadolint) and the shell
scripts (shellcheck), where those linters are installed; the CI script runs the README's test command; and the
wheel: it carries the configs and model presets, and an installed copy composes its configs without the checkout."""

from __future__ import annotations

import os
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
    scripts = ["setup.sh", ".ci/run", "tools/setup_vllm_env.sh", "examples/slurm/common.sh", *sorted(
        str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "examples" / "slurm").glob("*.sbatch"))]
    completed = subprocess.run([_tool("shellcheck"), "-x", *scripts], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_ci_runs_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    command = "./setup.sh && .venv/bin/python -m pytest -q -n 2 tests"
    assert command in readme
    assert command in (REPO_ROOT / ".ci" / "run").read_text()


# -- the wheel ---------------------------------------------------------------------------------------------------

# What the build reads; copied so that building leaves no build/ folder in the (shared) checkout.
BUILD_INPUTS = ("pyproject.toml", "README.md", "setup.py", "setup.cfg", "MANIFEST.in", "LICENSE")

# Run by the installed copy, outside the checkout: the package, its configs and a recipe's config from there.
INSTALLED_CHECK = r"""
import json

from hydra import compose, initialize_config_dir

import nemo_dvpo
from nemo_dvpo.models.config import available_presets, load_model_config
from nemo_dvpo.recipes import gvm
from nemo_dvpo.utils.config import register_defaults
from nemo_dvpo.utils.paths import CONF_DIR

register_defaults("gvm_defaults", gvm.GVMRecipeConfig)
with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
    config = gvm.parse_config(compose(config_name="gvm", overrides=["model=smollm2_135m"]))
print(json.dumps({"package": nemo_dvpo.__file__, "conf": str(CONF_DIR), "presets": available_presets(),
                  "smollm2_layers": load_model_config("smollm2_135m").num_layers,
                  "gvm_model": config.model.name, "gvm_train": config.data.train}))
"""


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> tuple[Path, Path]:
    """``(wheel, site)``: the package built as a wheel and installed into a folder of its own."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO_ROOT / "nemo_dvpo", source / "nemo_dvpo", ignore=shutil.ignore_patterns("__pycache__"))
    for name in BUILD_INPUTS:
        if (REPO_ROOT / name).is_file():
            shutil.copy2(REPO_ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # No build isolation: setuptools comes from the environment, so the build needs no package index.
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", ".", "-w", str(root / "dist")],
                           cwd=source, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (root / "dist").glob("nemo_dvpo-*.whl")
    installed = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(root / "site"),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return wheel, root / "site"


def test_the_wheel_carries_every_conf_file_and_model_preset(installed_wheel):
    import zipfile

    from nemo_dvpo.utils.paths import CONF_DIR

    wheel, _ = installed_wheel
    in_wheel = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("nemo_dvpo/conf/")}
    in_checkout = {f"nemo_dvpo/{path.relative_to(CONF_DIR.parent).as_posix()}" for path in CONF_DIR.rglob("*.yaml")}
    assert {"nemo_dvpo/conf/gvm.yaml", "nemo_dvpo/conf/dvpo.yaml", "nemo_dvpo/conf/model/smollm2_135m.yaml",
            "nemo_dvpo/conf/model/tiny.yaml"} <= in_checkout
    assert in_wheel == in_checkout


@pytest.mark.slow
def test_configs_load_from_the_installed_package_and_an_entry_point_composes_there(installed_wheel, tmp_path):
    """Outside the checkout, with only the installed copy of nemo_dvpo on the path: the presets, a recipe's
    Hydra config, and examples/train_gvm.py's own composition (``--cfg job``: compose and print, no run)."""
    import json

    from nemo_dvpo.models.config import available_presets

    _, site = installed_wheel
    env = {**os.environ, "PYTHONPATH": str(site)}
    checked = subprocess.run([sys.executable, "-c", INSTALLED_CHECK], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    found = json.loads(checked.stdout.strip().splitlines()[-1])
    # The installed copy answered, not the checkout (which the editable install would otherwise provide).
    assert Path(found["package"]).is_relative_to(site) and Path(found["conf"]) == site / "nemo_dvpo" / "conf"
    assert found["presets"] == available_presets()
    assert (found["smollm2_layers"], found["gvm_model"]) == (30, "smollm2_135m")
    assert found["gvm_train"] == "data/smollm2_ifeval/pairs_train.jsonl"
    job = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "train_gvm.py"), "--cfg", "job", "model=tiny"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "name: tiny" in job.stdout and "run_dir: runs/gvm" in job.stdout
