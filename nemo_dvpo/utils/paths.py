"""Output paths checked before any work starts: a file where a folder is needed, a folder that cannot be
written, or an existing folder that would be replaced all fail at once with one line, not after an hour."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from nemo_dvpo.utils.errors import NemoDvpoError


def _check_creatable(path: Path, what: str) -> None:
    """``path`` can be created: its nearest existing ancestor is a writable folder."""
    for ancestor in path.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise NemoDvpoError(f"cannot create {what} {path}: {ancestor} is a file, not a folder")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise NemoDvpoError(f"cannot create {what} {path}: {ancestor} is not writable")
            return


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """A folder we may write into (it exists and is writable, or it can be created)."""
    path = Path(path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NemoDvpoError(f"{what} {path} is a file; expected a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise NemoDvpoError(f"{what} {path} is not writable")
        return path
    _check_creatable(path, what)
    return path


def check_output_file(path: str | Path, what: str = "output file", overwrite: Optional[bool] = None) -> Path:
    """A file we may write (its folder exists or can be created; it is not a folder).

    ``overwrite=False`` also refuses an existing file (the tool's ``--overwrite`` replaces it).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise NemoDvpoError(f"{what} {path} is a folder; expected a file path")
    if path.exists() and overwrite is False:
        raise NemoDvpoError(f"{what} {path} exists; pass --overwrite to replace it")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise NemoDvpoError(f"{what} {path} is not writable")
        return path
    _check_creatable(path, what)
    return path


def check_replaceable_dir(path: str | Path, overwrite: bool, is_ours: Callable[[Path], bool],
                          what: str = "output folder", option: str = "--overwrite",
                          ours_description: Optional[str] = None) -> Path:
    """An output folder that is new or empty; with ``overwrite``, one of our own layouts may be replaced.

    Never a folder holding files nemo_dvpo did not write: those are the user's.
    """
    path = check_output_dir(path, what)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise NemoDvpoError(f"{what} {path} exists and is not empty; pass {option} to replace it "
                                f"(only {ours_description or 'a folder nemo_dvpo wrote'} is replaced)")
        if not is_ours(path):
            raise NemoDvpoError(f"{what} {path} holds files that nemo_dvpo did not write; refusing to replace "
                                f"it even with {option} - choose another path or empty it yourself")
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader (or a crash) sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


# The entry points' Hydra configs and the model presets ship inside the package (package data), so an installed
# wheel finds them where a checkout does: every reader takes this constant instead of a path of its own.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def installed_package_dir(name: str) -> Optional[Path]:
    """The folder of the installed top-level package ``name``, found without importing it; None when it is not
    installed (data-only packages, e.g. evaluation sets, are read as files and never imported)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])
