"""The CPU allocator of entry points (nemo_dvpo/utils/allocator.py): which processes execute themselves again with
tcmalloc preloaded, with what, and the one-line error for a bad choice. A real run's allocator is checked where a
run's summary is (tests/test_dvpo_recipe.py, the main job)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from nemo_dvpo.utils import allocator
from nemo_dvpo.utils.errors import ConfigError
from tests.conftest import REPO_ROOT, entry_point_env

ENTRY_POINT = str(REPO_ROOT / "examples" / "train_gvm.py")


@pytest.fixture
def library_dir(tmp_path):
    """A folder holding (empty) files named as tcmalloc's and jemalloc's libraries."""
    for filename in ("libtcmalloc_minimal.so.4", "libjemalloc.so.2"):
        (tmp_path / filename).write_bytes(b"")
    return str(tmp_path)


def test_an_entry_point_gets_tcmalloc_prepended_to_what_the_caller_preloads(library_dir):
    env = allocator.preload_plan(ENTRY_POINT, {"LD_PRELOAD": "/opt/libother.so", "HOME": "/root"},
                                 gpu_machine=False, directories=[library_dir])
    assert env["LD_PRELOAD"] == os.pathsep.join([os.path.join(library_dir, "libtcmalloc_minimal.so.4"),
                                                 "/opt/libother.so"])
    assert env["HOME"] == "/root"  # the rest of the environment as it was
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40


@pytest.mark.parametrize("script, environ, gpu_machine, why", [
    ("-c", {}, False, "python -c: not an entry point"),
    (str(REPO_ROOT / "tests" / "test_allocator.py"), {}, False, "a test module: not an entry point"),
    ("/home/user/my_script.py", {}, False, "a script outside the repository"),
    (ENTRY_POINT, {"NEMO_DVPO_CPU_ALLOCATOR": "system"}, False, "glibc's asked for"),
    (ENTRY_POINT, {}, True, "a GPU machine: system by default"),
    (ENTRY_POINT, {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, False, "an allocator preloaded already"),
    (ENTRY_POINT, {"LD_PRELOAD": "/x/libtcmalloc_minimal.so.4"}, False, "after our own re-execution"),
])
def test_processes_left_as_they_are(library_dir, script, environ, gpu_machine, why):
    assert allocator.preload_plan(script, environ, gpu_machine, directories=[library_dir]) is None, why


def test_a_named_allocator_is_used_on_a_gpu_machine_too_and_its_absence_is_an_error(library_dir, tmp_path):
    env = allocator.preload_plan(ENTRY_POINT, {"NEMO_DVPO_CPU_ALLOCATOR": "jemalloc"}, gpu_machine=True,
                                 directories=[library_dir])
    assert env["LD_PRELOAD"] == os.path.join(library_dir, "libjemalloc.so.2")
    assert "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" not in env
    empty = tmp_path / "empty"
    empty.mkdir()
    # Not found by default: glibc's, silently (the run's summary says which ran).
    assert allocator.preload_plan(ENTRY_POINT, {}, gpu_machine=False, directories=[str(empty)]) is None
    with pytest.raises(ConfigError, match=r"NEMO_DVPO_CPU_ALLOCATOR=tcmalloc: none of libtcmalloc_minimal.so.4, "
                                          r"libtcmalloc.so.4 in .*empty.*libtcmalloc-minimal4"):
        allocator.preload_plan(ENTRY_POINT, {"NEMO_DVPO_CPU_ALLOCATOR": "TCMalloc"}, gpu_machine=False,
                               directories=[str(empty)])


def test_the_process_executes_itself_again_with_its_own_interpreter_options(library_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "LIBRARY_DIRS", (library_dir,))
    monkeypatch.setattr(sys, "argv", [ENTRY_POINT, "train.steps=3"])
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-u", ENTRY_POINT, "train.steps=3"])
    monkeypatch.delenv("NEMO_DVPO_CPU_ALLOCATOR", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(os.path, "exists", lambda path: False if path == "/dev/nvidiactl" else os.path.lexists(path))
    monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
    allocator.preload_for_entry_point()
    ((executable, argv, env),) = calls
    assert executable == sys.executable and argv == [sys.executable, "-u", ENTRY_POINT, "train.steps=3"]
    assert env["LD_PRELOAD"] == os.path.join(library_dir, "libtcmalloc_minimal.so.4")


def test_a_bad_choice_stops_an_entry_point_with_one_line_before_torch_is_imported():
    env = {**entry_point_env(), "NEMO_DVPO_CPU_ALLOCATOR": "mimalloc"}
    completed = subprocess.run([sys.executable, "-X", "importtime", "examples/train_gvm.py"], cwd=REPO_ROOT,
                               env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in completed.stderr.splitlines() if not line.startswith("import time:")]
    assert completed.returncode == 2
    assert errors == ["error: NEMO_DVPO_CPU_ALLOCATOR='mimalloc': expected one of tcmalloc, jemalloc, system"]
    assert not re.search(r"\|\s+torch$", completed.stderr, re.MULTILINE)  # it stopped before torch was imported


def test_in_use_names_the_allocator_mapped_into_a_process():
    assert allocator.in_use() == ("tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else
                                  "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system")
    tcmalloc = allocator.find_library("tcmalloc")
    if tcmalloc is None:
        pytest.skip("no tcmalloc on this machine (apt-get install libtcmalloc-minimal4)")
    completed = subprocess.run([sys.executable, "-c", "from nemo_dvpo.utils import allocator; print(allocator.in_use())"],
                               env={**entry_point_env(), "LD_PRELOAD": tcmalloc}, capture_output=True, text=True,
                               timeout=300)
    assert completed.stdout.split() == ["tcmalloc"], completed.stderr[-3000:]
