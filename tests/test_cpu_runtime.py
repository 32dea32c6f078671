"""The CPU runtime libraries of entry points (nemo_dvpo/utils/cpu_runtime.py): which processes execute themselves
again with tcmalloc and Intel's OpenMP preloaded, with what, the one-line error for a bad choice, and the reason for
Intel's OpenMP - a libgomp team that sleeps at every operator once another thread of the process has used OpenMP. A
real run's libraries are checked where a run's summary is (tests/test_dvpo_recipe.py, the main job)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from nemo_dvpo.utils import cpu_runtime
from nemo_dvpo.utils.cpu_runtime import ALLOCATOR, OPENMP
from nemo_dvpo.utils.errors import ConfigError
from tests.conftest import REPO_ROOT, entry_point_env

ENTRY_POINT = str(REPO_ROOT / "examples" / "train_gvm.py")


@pytest.fixture
def library_dir(tmp_path):
    """A folder holding (empty) files named as tcmalloc's, jemalloc's and Intel OpenMP's libraries."""
    for filename in ("libtcmalloc_minimal.so.4", "libjemalloc.so.2", "libiomp5.so"):
        (tmp_path / filename).write_bytes(b"")
    return str(tmp_path)


def test_an_entry_point_gets_intel_openmp_and_tcmalloc_prepended_to_what_the_caller_preloads(library_dir):
    env = cpu_runtime.preload_plan(ENTRY_POINT, {"LD_PRELOAD": "/opt/libother.so", "HOME": "/root"},
                                   gpu_machine=False, directories=[library_dir])
    assert env["LD_PRELOAD"] == os.pathsep.join([os.path.join(library_dir, "libiomp5.so"),
                                                 os.path.join(library_dir, "libtcmalloc_minimal.so.4"),
                                                 "/opt/libother.so"])
    assert env["HOME"] == "/root"  # the rest of the environment as it was
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40


@pytest.mark.parametrize("script, environ, gpu_machine, why", [
    ("-c", {}, False, "python -c: not an entry point"),
    (str(REPO_ROOT / "tests" / "test_cpu_runtime.py"), {}, False, "a test module: not an entry point"),
    ("/home/user/my_script.py", {}, False, "a script outside the repository"),
    (ENTRY_POINT, {"NEMO_DVPO_CPU_ALLOCATOR": "system", "NEMO_DVPO_CPU_OPENMP": "gnu"}, False, "their own asked for"),
    (ENTRY_POINT, {}, True, "a GPU machine: glibc's malloc and torch's libgomp by default"),
    (ENTRY_POINT, {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2:/opt/intel/lib/libiomp5.so"}, False,
     "both preloaded already"),
    (ENTRY_POINT, {"LD_PRELOAD": "/x/libiomp5.so:/x/libtcmalloc_minimal.so.4"}, False, "after our own re-execution"),
])
def test_processes_left_as_they_are(library_dir, script, environ, gpu_machine, why):
    assert cpu_runtime.preload_plan(script, environ, gpu_machine, directories=[library_dir]) is None, why


@pytest.mark.parametrize("environ, gpu_machine, added", [
    ({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, False, ["libiomp5.so"]),  # the caller's allocator kept
    ({"NEMO_DVPO_CPU_OPENMP": "gnu"}, False, ["libtcmalloc_minimal.so.4"]),
    ({"NEMO_DVPO_CPU_OPENMP": "Intel"}, True, ["libiomp5.so"]),  # named: used on a GPU machine too
    ({"NEMO_DVPO_CPU_ALLOCATOR": "jemalloc", "NEMO_DVPO_CPU_OPENMP": "gnu"}, True, ["libjemalloc.so.2"]),
])
def test_each_runtime_is_chosen_on_its_own(library_dir, environ, gpu_machine, added):
    env = cpu_runtime.preload_plan(ENTRY_POINT, environ, gpu_machine, directories=[library_dir])
    expected = [os.path.join(library_dir, name) for name in added] + ([environ["LD_PRELOAD"]] if "LD_PRELOAD" in environ
                                                                      else [])
    assert env["LD_PRELOAD"].split(os.pathsep) == expected
    assert ("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" in env) == ("libtcmalloc_minimal.so.4" in added)


def test_a_missing_library_is_skipped_by_default_and_an_error_when_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    # Not found by default: the process's own, silently (the run's summary says which ran).
    assert cpu_runtime.preload_plan(ENTRY_POINT, {}, gpu_machine=False, directories=[str(empty)]) is None
    with pytest.raises(ConfigError, match=r"NEMO_DVPO_CPU_ALLOCATOR=tcmalloc: none of libtcmalloc_minimal.so.4, "
                                          r"libtcmalloc.so.4 in .*empty.*libtcmalloc-minimal4.*=system$"):
        cpu_runtime.preload_plan(ENTRY_POINT, {"NEMO_DVPO_CPU_ALLOCATOR": "TCMalloc"}, gpu_machine=False,
                                 directories=[str(empty)])
    with pytest.raises(ConfigError, match=r"NEMO_DVPO_CPU_OPENMP=intel: none of libiomp5.so in .*empty.*"
                                          r"pip install intel-openmp.*NEMO_DVPO_CPU_OPENMP=gnu$"):
        cpu_runtime.preload_plan(ENTRY_POINT, {"NEMO_DVPO_CPU_OPENMP": "intel"}, gpu_machine=True,
                                 directories=[str(empty)])


def test_the_process_executes_itself_again_with_its_own_interpreter_options(library_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_runtime, "LIBRARY_DIRS", (library_dir,))
    monkeypatch.setattr(sys, "argv", [ENTRY_POINT, "train.steps=3"])
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-u", ENTRY_POINT, "train.steps=3"])
    for name in ("NEMO_DVPO_CPU_ALLOCATOR", "NEMO_DVPO_CPU_OPENMP", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os.path, "exists", lambda path: False if path == "/dev/nvidiactl" else os.path.lexists(path))
    monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
    cpu_runtime.preload_for_entry_point()
    ((executable, argv, env),) = calls
    assert executable == sys.executable and argv == [sys.executable, "-u", ENTRY_POINT, "train.steps=3"]
    assert env["LD_PRELOAD"] == os.pathsep.join(os.path.join(library_dir, name)
                                                for name in ("libiomp5.so", "libtcmalloc_minimal.so.4"))


@pytest.mark.parametrize("variable, value, choices", [
    ("NEMO_DVPO_CPU_ALLOCATOR", "mimalloc", "tcmalloc, jemalloc, system"),
    ("NEMO_DVPO_CPU_OPENMP", "llvm", "intel, gnu"),
])
def test_a_bad_choice_stops_an_entry_point_with_one_line_before_torch_is_imported(variable, value, choices):
    env = {**entry_point_env(), variable: value}
    completed = subprocess.run([sys.executable, "-X", "importtime", "examples/train_gvm.py"], cwd=REPO_ROOT,
                               env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in completed.stderr.splitlines() if not line.startswith("import time:")]
    assert completed.returncode == 2
    assert errors == [f"error: {variable}={value!r}: expected one of {choices}"]
    assert not re.search(r"\|\s+torch$", completed.stderr, re.MULTILINE)  # it stopped before torch was imported


def _libraries_or_skip() -> dict[str, str]:
    paths = {"tcmalloc": cpu_runtime.find_library(ALLOCATOR, "tcmalloc"),
             "intel": cpu_runtime.find_library(OPENMP, "intel")}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        pytest.skip(f"not on this machine: {', '.join(missing)} (./setup.sh installs both on a CPU machine)")
    return paths


def test_in_use_names_the_libraries_mapped_into_a_process():
    paths = _libraries_or_skip()
    probe = "from nemo_dvpo.utils import cpu_runtime as r; import torch; print(r.allocator_in_use(), r.openmp_in_use())"
    for preload, expected in [("", ["system", "gnu"]), (paths["tcmalloc"], ["tcmalloc", "gnu"]),
                              (os.pathsep.join([paths["intel"], paths["tcmalloc"]]), ["tcmalloc", "intel"])]:
        completed = subprocess.run([sys.executable, "-c", probe], env={**entry_point_env(), "LD_PRELOAD": preload},
                                   capture_output=True, text=True, timeout=300)
        assert completed.stdout.split() == expected, completed.stderr[-3000:]


# A second host thread runs one parallel operator (as a gloo worker does for a big collective's copy) and stays
# alive; then the main thread, with a thread for each CPU, runs 400 small parallel operators. Counted: the process's
# voluntary context switches (a thread going to sleep) during those 400.
_SLEEPS_PROBE = """
import os, resource, threading, torch
torch.set_num_threads(len(os.sched_getaffinity(0)))  # as torch's default: a thread for each CPU
other_done, release = threading.Event(), threading.Event()
def other():
    torch.ones(1 << 22).add_(1)
    other_done.set()
    release.wait()
threading.Thread(target=other, daemon=True).start()
other_done.wait()
x = torch.ones(1 << 17)
for _ in range(50):
    x.mul_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
for _ in range(400):
    x.mul_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before)
release.set()
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: torch runs no parallel region")
def test_intel_openmp_keeps_the_team_awake_where_libgomp_puts_it_to_sleep_at_every_operator():
    """With torch's libgomp the team sleeps and is woken at each of the 400 operators (libgomp manages more threads
    than there are CPUs, so it stops spinning); with Intel's OpenMP preloaded, as our entry points run, it does not."""
    paths = _libraries_or_skip()
    counts = {}
    for name, preload in [("gnu", ""), ("intel", paths["intel"])]:
        completed = subprocess.run([sys.executable, "-c", _SLEEPS_PROBE], capture_output=True, text=True,
                                   env={**entry_point_env(), "LD_PRELOAD": preload},
                                   timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
        counts[name] = int(completed.stdout.split()[-1])
    assert counts["gnu"] >= 400, counts  # at least one sleep per operator: what Intel's OpenMP is preloaded against
    assert counts["intel"] < 40, counts
