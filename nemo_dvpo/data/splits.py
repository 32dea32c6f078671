"""Deterministic splits by key and resumable epoch orderings.

Both depend only on their inputs and a seed - never on Python's per-process ``hash()`` salt, the
order records were read in, or the machine - so every data-parallel rank and every restart computes
the same thing without communicating.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Iterable, Mapping, Sequence


def split_counts(total: int, fractions: Sequence[float]) -> list[int]:
    """Split ``total`` items into parts proportional to ``fractions`` (which sum to 1), exactly.

    Largest-remainder rounding: every part gets ``floor(total * fraction)``, and the items left over
    go to the parts with the largest fractional remainders (earlier parts win ties), so the counts
    always add up to ``total``.
    """
    if any(not 0.0 <= f <= 1.0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be in [0, 1] and sum to 1, got {list(fractions)}")
    exact = [total * f for f in fractions]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(fractions)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _rank(key: str, seed: int) -> bytes:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).digest()


def assign_by_key(keys: Iterable[str], counts: Mapping[str, int], seed: int) -> dict[str, str]:
    """Map each distinct key to a split name; ``counts`` says how many keys each split gets, in order.

    Keys are ordered by a seeded SHA-256 of the key and cut into consecutive blocks, so a key's split
    depends on the key and the seed, not on where it appears in the data.
    """
    distinct = sorted(set(keys), key=lambda key: _rank(key, seed))
    if sum(counts.values()) != len(distinct):
        raise ValueError(f"split counts {dict(counts)} do not add up to the {len(distinct)} distinct keys")
    assignment: dict[str, str] = {}
    start = 0
    for name, count in counts.items():
        for key in distinct[start:start + count]:
            assignment[key] = name
        start += count
    return assignment


def epoch_order(groups: Sequence[Sequence[int]], epoch: int, seed: int) -> list[int]:
    """Item indices for one epoch: the groups in a seeded random order, each group's items together.

    The permutation is a pure function of ``(len(groups), epoch, seed)``; a trainer that records
    ``(epoch, position)`` resumes mid-epoch with ``epoch_order(groups, epoch, seed)[position:]``.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    permutation = list(range(len(groups)))
    # random.Random seeded with a str hashes it with SHA-512: identical on every platform and run.
    random.Random(f"nemo_dvpo.epoch_order:{seed}:{epoch}").shuffle(permutation)
    return [index for group in permutation for index in groups[group]]


class EpochStream:
    """An endless stream of epochs over ``groups`` of item indices, each epoch in :func:`epoch_order`.

    ``positions(start, stop)`` are the items at stream positions ``[start, stop)``: a trainer that takes
    ``[step * B, (step + 1) * B)`` at each step sees the same data after a restart, since the position is
    a function of the step alone. The current epoch's order is cached (steps walk through it in order).
    """

    def __init__(self, groups: Sequence[Sequence[int]], seed: int):
        self.groups = groups
        self.seed = seed
        self.size = sum(len(group) for group in groups)
        if self.size == 0:
            raise ValueError("an epoch stream needs at least one item")
        self._cached: tuple[int, list[int]] = (-1, [])

    def order(self, epoch: int) -> list[int]:
        if self._cached[0] != epoch:
            self._cached = (epoch, epoch_order(self.groups, epoch, self.seed))
        return self._cached[1]

    def positions(self, start: int, stop: int) -> list[int]:
        return [self.order(position // self.size)[position % self.size] for position in range(start, stop)]
