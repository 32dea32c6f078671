"""User-facing errors: a clear message naming what was wrong, without a traceback wall."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class NemoDvpoError(Exception):
    """An error caused by the user's input (a path, a config field, a data record)."""


class ConfigError(NemoDvpoError):
    """A configuration field has a missing, wrong-typed or inconsistent value."""


class CheckpointError(NemoDvpoError):
    """A checkpoint is missing, incomplete or does not match the requested model."""


def exit_on_user_error(main: F) -> F:
    """Wrap an entry point so that user errors print one line and exit with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except NemoDvpoError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
