"""Seeds derived from named parts: the same on every rank, run and machine (never Python's salted ``hash``)."""

from __future__ import annotations

import hashlib


def derive_seed(*parts) -> int:
    """A 64-bit seed from ``parts`` (e.g. ``(seed, "rollout", step, rank)``); distinct parts, unrelated seeds."""
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "little")
