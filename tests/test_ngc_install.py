"""The NGC install (nvcr.io/nvidia/pytorch:25.09-py3) resolves: tools/check_ngc_install.py.

The live resolution asks PyPI (one to three minutes, network), so the quick tests check the recorded one
(constraints/ngc-pytorch-25.09-resolution.json) offline and independently of pip, in every run; the live run is
opt-in (NEMO_DVPO_NETWORK_TESTS=1), keeping the suite within its time and off PyPI's availability.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import urllib.request
import zipfile

import pytest

from tests.conftest import REPO_ROOT, load_script

ngc = load_script("tools/check_ngc_install.py")


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(ngc.RECORD_FILE.read_text())


def test_the_recorded_resolution_is_of_the_current_requirements(record):
    stale = ngc.stale_inputs(record)
    assert not stale, (f"{', '.join(stale)} changed since the NGC resolution was recorded: run "
                       "`python tools/check_ngc_install.py --record` (network) and commit "
                       "constraints/ngc-pytorch-25.09-resolution.json")


def test_the_recorded_resolution_installs_cleanly_in_the_container(record):
    assert ngc.check_record(record) == []
    pins = record["container_pins"]
    # The container's torch is what every torch requirement met, and it is a pre-release build of NVIDIA's.
    assert record["requirements"]["torch"]["version"] == pins["torch"] == "2.9.0a0+50eac811a6.nv25.9"
    assert record["requirements"]["megatron-core"]["version"] == "0.16.1"
    assert record["python"].startswith("3.12")


def test_a_dependency_on_a_newer_torch_is_a_failure(record):
    changed = copy.deepcopy(record)
    changed["requirements"]["accelerate"]["requires_dist"].append("torch>=2.10")
    problems = ngc.check_record(changed)
    assert any("accelerate" in problem and "torch>=2.10" in problem for problem in problems), problems


def test_replacing_a_container_package_or_pulling_cuda_wheels_is_a_failure(record):
    changed = copy.deepcopy(record)
    changed["requirements"]["safetensors"]["version"] = "0.8.0"
    changed["requirements"]["nvidia-cudnn-cu12"] = {"version": "9.10.2.21", "requires_dist": [], "requested_extras": []}
    problems = ngc.check_record(changed)
    assert any("would replace the container's safetensors" in problem for problem in problems), problems
    assert any("nvidia-cudnn-cu12" in problem for problem in problems), problems
    # NVIDIA's own Python packages that are not CUDA runtime wheels are not flagged.
    assert not any("nvidia-mtbench-evaluator" in problem for problem in ngc.check_record(record))


def test_markers_and_extras_are_evaluated_for_python_3_12_on_linux(record):
    changed = copy.deepcopy(record)
    requires = changed["requirements"]["accelerate"]["requires_dist"]
    requires.append('not-a-package>=1; python_version < "3.11"')  # not for 3.12: ignored
    requires.append('pywin32>=1; sys_platform == "win32"')  # not for Linux: ignored
    requires.append('another-missing>=1; extra == "never-requested"')
    assert ngc.check_record(changed) == []
    requires.append('missing-on-linux>=1; sys_platform == "linux"')
    assert any("missing-on-linux" in problem for problem in ngc.check_record(changed))


def test_setup_sh_gives_way_to_the_container_pins(tmp_path):
    """The filter the check runs is setup.sh's own: a pinned name leaves requirements.txt, the rest stays."""
    constraints = tmp_path / "constraint.txt"
    constraints.write_text("safetensors==0.6.2\nNumPy==1.26.4\n")
    output = tmp_path / "filtered.txt"
    printed = ngc.filter_requirements(REPO_ROOT / "requirements.txt", constraints, output)
    kept = [line.split("==")[0].strip().lower() for line in output.read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert "safetensors" not in kept and "numpy" not in kept
    assert "megatron-core" in kept and "transformers" in kept
    assert "safetensors" in printed and "numpy" in printed.lower()


def test_container_packages_become_installable_metadata_only_wheels(tmp_path):
    path = ngc.write_stub_wheel("torch", "2.9.0a0+50eac811a6.nv25.9", tmp_path)
    with zipfile.ZipFile(path) as archive:
        metadata = archive.read("torch-2.9.0a0+50eac811a6.nv25.9.dist-info/METADATA").decode()
        assert "Version: 2.9.0a0+50eac811a6.nv25.9" in metadata
        assert all(name.startswith("torch-2.9.0a0+50eac811a6.nv25.9.dist-info/") for name in archive.namelist())


def test_a_malformed_pin_names_the_file_and_line(tmp_path):
    pins = tmp_path / "pins.txt"
    pins.write_text("# comment\ntorch==2.9\ntorch>=2\n")
    with pytest.raises(ngc.InstallCheckError, match=r"pins.txt:3: expected 'name==version'"):
        ngc.read_pins(pins)


def _pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=5):
            return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NEMO_DVPO_NETWORK_TESTS") != "1",
                    reason="asks PyPI for 140 packages (1.5-3 minutes): set NEMO_DVPO_NETWORK_TESTS=1 to run it; "
                           "the recorded resolution is checked offline above in every run")
def test_live_resolution_against_pypi():
    if not _pypi_reachable():
        pytest.skip("PyPI is not reachable from this machine")
    completed = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "check_ngc_install.py")],
                               capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "[ngc-check] OK" in completed.stdout
