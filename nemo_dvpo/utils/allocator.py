"""The CPU memory allocator of nemo_dvpo's entry points: tcmalloc where the machine has it.

glibc's malloc keeps much of what a training step frees - activations and gradients in blocks of 128 KiB to 1 MiB -
and maps fresh pages for it again on the next step. In the peer setting of ``benchmarks/dvpo_step_time.py``
(2 AVX2 cores, docs/benchmarks.md "Peak memory: tcmalloc by default") tcmalloc took the peak from 4,426 to
4,175 MiB, the step from 58.2 to 54.4 s and the system time from 44 to 16 s, against the official code's 4,173 MiB.

An allocator has to be in place before a process allocates anything (``LD_PRELOAD``), so an entry point of ours - a
script under ``examples/``, ``tools/`` or ``benchmarks/`` - executes itself again once, as early as ``import
nemo_dvpo`` and before torch is imported, with the library preloaded: same pid, arguments and environment, plus
``LD_PRELOAD``. Other programs that import nemo_dvpo (pytest, a notebook, a user's script) are left as they are.

``NEMO_DVPO_CPU_ALLOCATOR`` chooses: ``tcmalloc`` (the default without NVIDIA GPUs; used if found, else glibc's),
``jemalloc``, or ``system`` (glibc's; the default on GPU machines, where only CPU runs measured the difference). A
library asked for by name and not found is an error. Debian / Ubuntu: ``apt-get install libtcmalloc-minimal4``
(``./setup.sh`` does, as root).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from nemo_dvpo.utils.errors import EXIT_USER_ERROR, ConfigError, report_failure

ENV = "NEMO_DVPO_CPU_ALLOCATOR"
CHOICES = ("tcmalloc", "jemalloc", "system")
LIBRARIES = {"tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), "jemalloc": ("libjemalloc.so.2",)}
DEBIAN_PACKAGES = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                "/usr/local/lib", os.path.join(sys.prefix, "lib"))
ENTRY_POINT_DIRS = ("examples", "tools", "benchmarks")
REPO_ROOT = Path(__file__).resolve().parents[2]
# tcmalloc reports every allocation above 1 GiB on stderr by default; a model's weights or Adam's moments are that.
_TCMALLOC_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def find_library(name: str, directories: Optional[Sequence[str]] = None) -> Optional[str]:
    """The path of allocator ``name``'s shared library in ``directories`` (the usual places), or None."""
    for directory in LIBRARY_DIRS if directories is None else directories:
        for filename in LIBRARIES[name]:
            path = os.path.join(directory, filename)
            if os.path.isfile(path):
                return path
    return None


def requested(environ: Mapping[str, str], gpu_machine: bool) -> tuple[str, bool]:
    """``(allocator, explicit)``: the one ``NEMO_DVPO_CPU_ALLOCATOR`` names, or the machine's default."""
    value = environ.get(ENV, "").strip().lower()
    if not value:
        return ("system" if gpu_machine else "tcmalloc"), False
    if value not in CHOICES:
        raise ConfigError(f"{ENV}={environ[ENV]!r}: expected one of {', '.join(CHOICES)}")
    return value, True


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
    ``system`` asked for, the allocator already preloaded (by us or the caller), or none found by default."""
    if not is_entry_point(script):
        return None
    name, explicit = requested(environ, gpu_machine)
    if name == "system":
        return None
    preloaded = environ.get("LD_PRELOAD", "")
    if any(filename in preloaded for filenames in LIBRARIES.values() for filename in filenames):
        return None
    path = find_library(name, directories)
    if path is None:
        if explicit:
            searched = ", ".join(LIBRARY_DIRS if directories is None else directories)
            raise ConfigError(f"{ENV}={name}: none of {', '.join(LIBRARIES[name])} in {searched}; "
                              f"install it (Debian/Ubuntu: apt-get install {DEBIAN_PACKAGES[name]}) or set "
                              f"{ENV}=system")
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = os.pathsep.join(filter(None, [path, preloaded]))
    if name == "tcmalloc":
        for key, value in _TCMALLOC_QUIET.items():
            env.setdefault(key, value)
    return env


def preload_for_entry_point() -> None:
    """Execute this process again with the allocator preloaded, if :func:`preload_plan` says so. Called by ``import
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


def in_use() -> str:
    """The allocator this process runs with: ``tcmalloc``, ``jemalloc`` or ``system``, from its mapped libraries."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name, filenames in LIBRARIES.items():
        if any(filename in maps for filename in filenames):
            return name
    return "system"
