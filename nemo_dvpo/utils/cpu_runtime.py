"""The CPU runtime libraries of nemo_dvpo's entry points: tcmalloc and Intel's OpenMP, where the machine has them.

**Memory allocator.** glibc's malloc keeps much of what a training step frees - activations and gradients in blocks
of 128 KiB to 1 MiB - and maps fresh pages for it again on the next step. In the peer setting of
``benchmarks/dvpo_step_time.py`` (2 AVX2 cores, docs/benchmarks.md "Peak memory: tcmalloc by default") tcmalloc took
the peak from 4,426 to 4,175 MiB, the step from 58.2 to 54.4 s and the system time from 44 to 16 s.

**OpenMP runtime.** torch's wheels run their intra-op threads on GNU OpenMP (their bundled libgomp). libgomp keeps
its idle workers spinning between parallel regions - unless it manages more threads than the machine has CPUs, and
then each worker sleeps at once and every operator pays a futex wake-up (~40 us). A CPU run of ours always crosses
that line: gloo's worker threads run torch copies for the collectives of a checkpoint load or save (the pickled
metadata of ``all_gather_object``), and each such thread keeps a pool of its own for the rest of the process. In the
DVPO process on 2 cores the same forward + backward took 0.41 s instead of 0.32 s, with 5x the context switches
(docs/benchmarks.md "Intel OpenMP: the gloo threads' pools"). Intel's OpenMP (``libiomp5.so``, PyPI's
``intel-openmp``), preloaded, serves the same GOMP calls and does not put the busy team to sleep; it is what torch's
own CPU launcher (``torch.backends.xeon.run_cpu``) preloads.

A library has to be in place before a process starts (``LD_PRELOAD``), so an entry point of ours - a script under
``examples/``, ``tools/`` or ``benchmarks/`` - executes itself again once, as early as ``import nemo_dvpo`` and before
torch is imported, with the libraries preloaded: same pid, arguments and environment, plus ``LD_PRELOAD``. Other
programs that import nemo_dvpo (pytest, a notebook, a user's script) are left as they are.

``NEMO_DVPO_CPU_ALLOCATOR`` chooses ``tcmalloc``, ``jemalloc`` or ``system`` (glibc's); ``NEMO_DVPO_CPU_OPENMP``
chooses ``intel`` or ``gnu`` (torch's own). Without NVIDIA GPUs the defaults are tcmalloc and intel, each used if
found; on GPU machines, where only CPU runs measured the difference, system and gnu. A library asked for by name
and not found is an error. ``./setup.sh`` installs both on a CPU machine.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from nemo_dvpo.utils.errors import EXIT_USER_ERROR, ConfigError, report_failure


@dataclass(frozen=True)
class RuntimeChoice:
    """One preloadable runtime: the variable that chooses it, its choices' library file names (``None``: the
    process's own, nothing preloaded), the defaults and how to install each library."""
    env: str
    libraries: dict[str, Optional[tuple[str, ...]]]
    cpu_default: str
    gpu_default: str
    install: dict[str, str]

    def requested(self, environ: Mapping[str, str], gpu_machine: bool) -> tuple[str, bool]:
        """``(choice, explicit)``: the one the variable names, or the machine's default."""
        value = environ.get(self.env, "").strip().lower()
        if not value:
            return (self.gpu_default if gpu_machine else self.cpu_default), False
        if value not in self.libraries:
            raise ConfigError(f"{self.env}={environ[self.env]!r}: expected one of {', '.join(self.libraries)}")
        return value, True

    @property
    def own(self) -> str:
        """The choice that preloads nothing: the process's own runtime."""
        return next(choice for choice, filenames in self.libraries.items() if filenames is None)

    def preloaded(self, ld_preload: str) -> bool:
        """True when one of this runtime's libraries is in ``ld_preload`` already (ours or the caller's)."""
        return any(filename in ld_preload for filenames in self.libraries.values() if filenames
                   for filename in filenames)


ALLOCATOR = RuntimeChoice(
    env="NEMO_DVPO_CPU_ALLOCATOR",
    libraries={"tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), "jemalloc": ("libjemalloc.so.2",),
               "system": None},
    cpu_default="tcmalloc", gpu_default="system",
    install={"tcmalloc": "Debian/Ubuntu: apt-get install libtcmalloc-minimal4",
             "jemalloc": "Debian/Ubuntu: apt-get install libjemalloc2"})
OPENMP = RuntimeChoice(
    env="NEMO_DVPO_CPU_OPENMP",
    libraries={"intel": ("libiomp5.so",), "gnu": None},
    cpu_default="intel", gpu_default="gnu",
    install={"intel": "pip install intel-openmp (x86-64)"})
RUNTIMES = (OPENMP, ALLOCATOR)  # the order of their libraries in LD_PRELOAD

# The virtual environment's lib/ first: pip's intel-openmp puts libiomp5.so there.
LIBRARY_DIRS = (os.path.join(sys.prefix, "lib"), "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                "/usr/lib64", "/usr/lib", "/usr/local/lib")
ENTRY_POINT_DIRS = ("examples", "tools", "benchmarks")
REPO_ROOT = Path(__file__).resolve().parents[2]
# tcmalloc reports every allocation above 1 GiB on stderr by default; a model's weights or Adam's moments are that.
_TCMALLOC_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def find_library(runtime: RuntimeChoice, choice: str, directories: Optional[Sequence[str]] = None) -> Optional[str]:
    """The path of ``choice``'s shared library in ``directories`` (the usual places), or None."""
    for directory in LIBRARY_DIRS if directories is None else directories:
        for filename in runtime.libraries[choice] or ():
            path = os.path.join(directory, filename)
            if os.path.isfile(path):
                return path
    return None


def is_entry_point(script: str) -> bool:
    """True for a Python file under the repository's ``examples/``, ``tools/`` or ``benchmarks/``."""
    if not script.endswith(".py"):
        return False
    try:
        relative = Path(script).resolve().relative_to(REPO_ROOT)
    except ValueError:
        return False
    return relative.parts[0] in ENTRY_POINT_DIRS


def preload_plan(script: str, environ: Mapping[str, str], gpu_machine: bool,
                 directories: Optional[Sequence[str]] = None) -> Optional[dict]:
    """The environment to execute this process again with, or None to go on as it is: not an entry point of ours,
    or nothing to add - each runtime is its process's own by choice, preloaded already (by us or the caller), or
    not found by default."""
    if not is_entry_point(script):
        return None
    preloaded = environ.get("LD_PRELOAD", "")
    paths, choices = [], []
    for runtime in RUNTIMES:
        choice, explicit = runtime.requested(environ, gpu_machine)
        if choice == runtime.own or runtime.preloaded(preloaded):
            continue
        path = find_library(runtime, choice, directories)
        if path is None:
            if explicit:
                searched = ", ".join(LIBRARY_DIRS if directories is None else directories)
                raise ConfigError(f"{runtime.env}={choice}: none of {', '.join(runtime.libraries[choice])} in "
                                  f"{searched}; install it ({runtime.install[choice]}) or set "
                                  f"{runtime.env}={runtime.own}")
            continue
        paths.append(path)
        choices.append(choice)
    if not paths:
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = os.pathsep.join(filter(None, [*paths, preloaded]))
    if "tcmalloc" in choices:
        for key, value in _TCMALLOC_QUIET.items():
            env.setdefault(key, value)
    return env


def preload_for_entry_point() -> None:
    """Execute this process again with the libraries preloaded, if :func:`preload_plan` says so. Called by ``import
    nemo_dvpo`` before torch is imported, so an entry point pays only for the imports before its first
    ``nemo_dvpo`` import (Hydra's, ~0.2 s)."""
    script = sys.argv[0] if sys.argv else ""
    try:
        env = preload_plan(script, os.environ, gpu_machine=os.path.exists("/dev/nvidiactl"))
    except ConfigError as error:  # at import time, before an entry point's own error handling: the same one line
        report_failure(f"error: {error}")
        sys.exit(EXIT_USER_ERROR)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv keeps the interpreter's own options (-u, -X ...); the executable is named by its full path.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _mapped_libraries() -> str:
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:
        return ""


def _in_use(runtime: RuntimeChoice) -> str:
    maps = _mapped_libraries()
    for choice, filenames in runtime.libraries.items():
        if filenames and any(filename in maps for filename in filenames):
            return choice
    return runtime.own


def allocator_in_use() -> str:
    """The allocator this process runs with: ``tcmalloc``, ``jemalloc`` or ``system``, from its mapped libraries."""
    return _in_use(ALLOCATOR)


def openmp_in_use() -> str:
    """The OpenMP runtime this process's torch runs on: ``intel`` when libiomp5 is mapped (preloaded, its GOMP entry
    points come first), else ``gnu``."""
    return _in_use(OPENMP)
