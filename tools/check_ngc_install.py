"""Does ./setup.sh resolve inside nvcr.io/nvidia/pytorch:25.09-py3? Checked here, without Docker or a GPU.

    python tools/check_ngc_install.py            # live: pip resolves against PyPI now (about a minute, network)
    python tools/check_ngc_install.py --record   # ... and writes the answer to constraints/ngc-pytorch-25.09-resolution.json

What it does, step by step:

1. The container's pins (constraints/ngc-pytorch-25.09.txt, with their sources) become metadata-only wheels in a
   scratch folder: inside the container those packages are installed already, and torch's version there
   (2.9.0a0+...nv25.9) exists on no index, so this is how pip's resolver sees them as present.
2. requirements.txt is filtered by setup.sh's own code (the Python block it runs on CUDA machines, read out of
   setup.sh, so the check cannot drift from it): our pins give way to every name the container pins.
3. pip resolves the filtered requirements for CPython 3.12 on manylinux x86_64, binary wheels only, with the
   container's pins as constraints (``pip install --dry-run --report``). A package that ships only a source
   archive (e.g. langdetect) is built into a wheel here first; it must be pure Python, or the check fails.
   requirements-nodeps.txt is resolved on its own with --no-deps, as setup.sh installs it.
4. The result fails on any resolver conflict, on any container package that pip would replace (torch above all),
   on CUDA libraries pulled from PyPI (nvidia-*: only a PyPI torch needs them), and on any package that asks for
   "apex" (an unrelated PyPI project of that name would be installed).

tests/test_ngc_install.py re-checks the recorded answer offline and independently (every resolved package's
dependencies, evaluated for Python 3.12 / Linux x86_64, are met by the resolved set and the container's pins) and
fails when requirements*.txt, setup.sh or the pins changed since it was recorded.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
PINS_FILE = REPO_ROOT / "constraints" / "ngc-pytorch-25.09.txt"
RECORD_FILE = REPO_ROOT / "constraints" / "ngc-pytorch-25.09-resolution.json"
INPUT_FILES = ("requirements.txt", "requirements-nodeps.txt", "setup.sh", "constraints/ngc-pytorch-25.09.txt")
PYTHON_VERSION = "3.12"
PYTHON_FULL_VERSION = "3.12.3"
# Ubuntu 24.04 has glibc 2.39. pip 23 does not expand a manylinux_2_X platform to the older ones, so all are listed.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 16, -1)] + ["manylinux2014_x86_64"]
MARKER_ENVIRONMENT = {
    "python_version": PYTHON_VERSION, "python_full_version": PYTHON_FULL_VERSION, "os_name": "posix",
    "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
    "platform_python_implementation": "CPython", "implementation_name": "cpython",
    "implementation_version": PYTHON_FULL_VERSION, "platform_release": "", "platform_version": "", "extra": ""}
MAX_SOURCE_BUILDS = 20
# The CUDA runtime wheels a PyPI torch depends on (nvidia-cudnn-cu12, nvidia-nccl-cu13, ...); the container has its own.
CUDA_LIBRARY_WHEEL = re.compile(r"nvidia-(cuda|cudnn|cublas|cufft|cufile|curand|cusolver|cusparse|cusparselt|nccl|nvtx|"
                                r"nvjitlink|nvshmem)[a-z0-9-]*$")


class InstallCheckError(Exception):
    """The install would not work in the container; the message says why."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path = PINS_FILE) -> dict[str, str]:
    """``{canonical name: version}`` of a constraints file of ``name==version`` lines."""
    pins = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*==\s*(\S+)", text)
        if not match:
            raise InstallCheckError(f"{path}:{number}: expected 'name==version', got {text!r}")
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def input_hashes() -> dict[str, str]:
    return {name: hashlib.sha256((REPO_ROOT / name).read_bytes()).hexdigest() for name in INPUT_FILES}


# -- step 1: the container's packages as installed wheels -----------------------------------------------------

def write_stub_wheel(name: str, version: str, folder: Path) -> Path:
    """A wheel holding only metadata for ``name==version``: what the resolver needs to treat it as present."""
    dist = re.sub(r"[-_.]+", "_", name)
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: check_ngc_install\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record_lines = []
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            data = text.encode()
            archive.writestr(member, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record_lines.append(f"{member},sha256={digest},{len(data)}")
        archive.writestr(f"{info}/RECORD", "\n".join(record_lines + [f"{info}/RECORD,,"]) + "\n")
    return path


# -- step 2: setup.sh's own filter ----------------------------------------------------------------------------

def setup_filter_source(setup_sh: Path = REPO_ROOT / "setup.sh") -> str:
    """The Python block setup.sh runs to let the container's pins win (between ``<<'PY'`` and ``PY``)."""
    text = setup_sh.read_text()
    match = re.search(r'"\$PY" - requirements\.txt "\$REQUIREMENTS" <<\'PY\'\n(.*?)\nPY\n', text, re.S)
    if not match:
        raise InstallCheckError(f"{setup_sh}: the block that filters requirements.txt by the container's pip "
                                "constraints was not found; update tools/check_ngc_install.py with setup.sh")
    return match.group(1)


def filter_requirements(requirements: Path, constraint_file: Path, output: Path) -> str:
    """Run setup.sh's filter on ``requirements`` as it runs in the container (PIP_CONSTRAINT set); returns what it
    printed (the names it gave way on)."""
    env = dict(os.environ, PIP_CONSTRAINT=str(constraint_file))
    completed = subprocess.run([sys.executable, "-", str(requirements), str(output)], input=setup_filter_source(),
                               capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if completed.returncode != 0:
        raise InstallCheckError(f"setup.sh's requirements filter failed: {completed.stderr[-2000:]}")
    return completed.stdout.strip()


# -- step 3: pip's resolver ----------------------------------------------------------------------------------

def pip_command(*args: str) -> list[str]:
    # --isolated: this machine's pip configuration (its constraints, its local mirrors) must not colour the answer.
    return [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", *args]


def target_args(target: Path) -> list[str]:
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    return ["install", "--dry-run", "--ignore-installed", "--target", str(target), "--python-version", PYTHON_VERSION,
            "--implementation", "cp", *platforms]


def missing_distribution(stderr: str) -> Optional[str]:
    match = re.search(r"No matching distribution found for (\S+)", stderr)
    return match.group(1) if match else None


def build_source_only(requirement: str, wheels: Path, log: list[str]) -> None:
    """Build a wheel of ``requirement`` from its source archive; refuse one that is not pure Python."""
    before = set(wheels.iterdir())
    completed = subprocess.run(pip_command("wheel", "--no-deps", "--no-binary", ":all:", "-w", str(wheels),
                                           requirement), capture_output=True, text=True)
    if completed.returncode != 0:
        raise InstallCheckError(f"{requirement} has no wheel for CPython {PYTHON_VERSION} manylinux x86_64 and its "
                                f"source archive did not build:\n{completed.stderr[-2000:]}")
    built = [path for path in set(wheels.iterdir()) - before if path.suffix == ".whl"]
    if not built or any(not path.name.endswith("-py3-none-any.whl") and not path.name.endswith("-py2.py3-none-any.whl")
                        for path in built):
        raise InstallCheckError(f"{requirement} ships only a source archive that builds a platform-specific wheel "
                                f"({[path.name for path in built]}): it would compile inside the container")
    log.append(f"built {built[0].name} from its source archive (no wheel on the index)")


def resolve(requirement_file: Path, constraint_file: Path, wheels: Path, work: Path, no_deps: bool,
            log: list[str]) -> dict:
    """pip's dry-run report for ``requirement_file`` in the simulated container."""
    for _ in range(MAX_SOURCE_BUILDS):
        report_path = work / ("report-nodeps.json" if no_deps else "report.json")
        command = pip_command(*target_args(work / "target"), "--only-binary", ":all:", "--find-links", str(wheels),
                              "-c", str(constraint_file), "-r", str(requirement_file), "--report", str(report_path),
                              *(["--no-deps"] if no_deps else []))
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode == 0:
            return json.loads(report_path.read_text())
        missing = missing_distribution(completed.stderr)
        if missing and "conflict" not in completed.stderr.lower():
            build_source_only(missing, wheels, log)
            continue
        raise InstallCheckError(f"pip cannot resolve {requirement_file.name} in the container:\n"
                                + "\n".join(line for line in completed.stderr.splitlines() if line.strip())[-4000:])
    raise InstallCheckError(f"more than {MAX_SOURCE_BUILDS} packages without wheels: giving up")


def resolved_packages(report: dict) -> dict[str, dict]:
    packages = {}
    for item in report.get("install", []):
        metadata = item["metadata"]
        packages[canonical(metadata["name"])] = {
            "version": metadata["version"], "requires_dist": metadata.get("requires_dist") or [],
            "requested_extras": item.get("requested_extras") or []}
    return packages


def run_live_check() -> dict:
    """Steps 1-3; returns the record (what the offline test checks)."""
    pins = read_pins()
    hashes = input_hashes()  # before resolving: a file edited meanwhile makes the record stale, not wrong
    log: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ngc_check_") as scratch:
        work, wheels = Path(scratch), Path(scratch) / "wheels"
        wheels.mkdir()
        for name, version in pins.items():
            write_stub_wheel(name, version, wheels)
        filtered = work / "requirements-filtered.txt"
        given_way = filter_requirements(REPO_ROOT / "requirements.txt", PINS_FILE, filtered)
        main = resolve(filtered, PINS_FILE, wheels, work, no_deps=False, log=log)
        nodeps = resolve(REPO_ROOT / "requirements-nodeps.txt", PINS_FILE, wheels, work, no_deps=True, log=log)
    return {"python": PYTHON_FULL_VERSION, "platforms": PLATFORMS[:1] + ["..."] + PLATFORMS[-1:],
            "pip": pip_version(), "inputs_sha256": hashes, "container_pins": pins,
            "setup_sh_output": given_way, "notes": log,
            "requirements": resolved_packages(main), "nodeps": resolved_packages(nodeps)}


def pip_version() -> str:
    completed = subprocess.run(pip_command("--version"), capture_output=True, text=True)
    return completed.stdout.split(" from ")[0].strip()


# -- step 4: the verdict (also what the offline test runs on the record) ---------------------------------------

def check_record(record: dict) -> list[str]:
    """Every reason the recorded resolution would not install cleanly in the container; empty when it would."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    problems: list[str] = []
    pins = record["container_pins"]
    installed = record["requirements"]
    available = {name: entry["version"] for name, entry in installed.items()}
    for name, version in pins.items():
        available.setdefault(name, version)
    for name, entry in {**installed, **record.get("nodeps", {})}.items():
        if name in pins and Version(entry["version"]) != Version(pins[name]):
            problems.append(f"{name} {entry['version']} would replace the container's {name} {pins[name]}")
        if CUDA_LIBRARY_WHEEL.match(name):
            problems.append(f"{name} {entry['version']} would come from PyPI: CUDA libraries a PyPI torch needs, "
                            "not the container's")
        if name == "apex" and pins.get("apex") != entry["version"]:
            problems.append("something asks for 'apex': the PyPI project of that name is not NVIDIA's apex")
    if "torch" in pins and Version(available.get("torch", pins["torch"])) != Version(pins["torch"]):
        problems.append(f"torch {available['torch']} instead of the container's {pins['torch']}")
    # Extras asked for by anyone, to a fixed point (an extra can ask for further extras).
    extras = {name: set(entry["requested_extras"]) for name, entry in installed.items()}
    changed = True
    while changed:
        changed = False
        for name, entry in installed.items():
            for text in entry["requires_dist"]:
                requirement = Requirement(text)
                if _applies(requirement, extras.get(name, set())):
                    wanted = extras.setdefault(canonical(requirement.name), set())
                    if not set(requirement.extras) <= wanted:
                        wanted |= set(requirement.extras)
                        changed = True
    for name, entry in installed.items():
        for text in entry["requires_dist"]:
            requirement = Requirement(text)
            if not _applies(requirement, extras.get(name, set())):
                continue
            dependency = canonical(requirement.name)
            if dependency not in available:
                problems.append(f"{name} {entry['version']} needs {text}, which the resolution does not hold")
            elif not requirement.specifier.contains(Version(available[dependency]), prereleases=True):
                problems.append(f"{name} {entry['version']} needs {text}, the resolution has {dependency} "
                                f"{available[dependency]}")
    return problems


def _applies(requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**MARKER_ENVIRONMENT, "extra": extra}) for extra in ("", *extras))


def stale_inputs(record: dict) -> list[str]:
    """The inputs that changed since ``record`` was made."""
    current = input_hashes()
    return [name for name in INPUT_FILES if record.get("inputs_sha256", {}).get(name) != current[name]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help=f"write the resolution to {RECORD_FILE.relative_to(REPO_ROOT)}")
    args = parser.parse_args()
    try:
        record = run_live_check()
    except InstallCheckError as error:
        print(f"[ngc-check] FAIL: {error}", file=sys.stderr)
        sys.exit(1)
    problems = check_record(record)
    for note in record["notes"]:
        print(f"[ngc-check] {note}")
    if record["setup_sh_output"]:
        print(f"[ngc-check] setup.sh: {record['setup_sh_output']}")
    print(f"[ngc-check] resolved {len(record['requirements'])} packages (+{len(record['nodeps'])} installed --no-deps) "
          f"for CPython {PYTHON_FULL_VERSION} manylinux x86_64 with the container's torch "
          f"{record['container_pins'].get('torch')}")
    if problems:
        print("[ngc-check] FAIL:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)
    if args.record:
        RECORD_FILE.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"[ngc-check] recorded {RECORD_FILE}")
    print("[ngc-check] OK")


if __name__ == "__main__":
    main()
