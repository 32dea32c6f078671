"""The one pairing rule: what makes a (chosen, rejected) pair, for the pairs we build and every pairs file we read.

The rule (:data:`PAIRING_RULE`), for each pair of one prompt:

1. the two responses differ (compared without surrounding whitespace);
2. where the pair carries both responses' scores (``chosen_score``/``rejected_score``, or UltraFeedback's
   ``score_chosen``/``score_rejected``), both are finite numbers and the chosen one's is strictly higher;
3. no response is in two pairs of the same prompt.

Why 3: DVPO's Global Value Model regresses each sequence onto +1 (chosen) or -1 (rejected). A response that is
chosen in one pair and rejected in another would be pulled to both and learn their average - nothing - and a
response in two pairs on the same side counts twice; pairing "every two samples" does both to a middle score.

:func:`make_pairs` builds pairs from scored samples under this rule (tools/build_preference_data.py), and
``nemo_dvpo.data.preference`` checks every pairwise record it reads against it - the training and the
evaluation file of the GVM, reward-model and DPO recipes alike - stopping at the first violation with the file
and line (``data.skip_invalid`` skips and counts such records instead).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Hashable, Mapping, Optional, Sequence

PAIRING_RULE = ("a pair's two responses differ; where both scores are given they are finite and the chosen one's "
                "is higher; no response is in two pairs of the same prompt")
BUILD_ORDER = ("per prompt, samples ranked by score (ties: lower sample index first); the i-th best paired with the "
               "i-th worst where the pairing rule allows it; chosen = the higher score")
# (chosen field, rejected field): our builder's names, then the UltraFeedback (binarized) layout's.
SCORE_FIELDS = (("chosen_score", "rejected_score"), ("score_chosen", "score_rejected"))


class PairingViolation(ValueError):
    """A pair that breaks the rule. ``reason`` is the short key skipped records are counted by; ``field_name``
    the record field it concerns."""

    def __init__(self, reason: str, field_name: str, detail: str):
        self.reason = reason
        self.field_name = field_name
        self.detail = detail
        super().__init__(f"field {field_name!r}: {detail}")


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def pair_scores(fields: Mapping[str, Any]) -> Optional[tuple[str, str]]:
    """The names of the score fields a record carries (both present), or None when it carries none."""
    for chosen_field, rejected_field in SCORE_FIELDS:
        if fields.get(chosen_field) is not None and fields.get(rejected_field) is not None:
            return chosen_field, rejected_field
    return None


def check_pair(chosen: str, rejected: str, fields: Optional[Mapping[str, Any]] = None) -> None:
    """Rules 1 and 2 for one pair (``fields``: the record, for its scores); raises :class:`PairingViolation`."""
    if chosen.strip() == rejected.strip():
        raise PairingViolation("identical_responses", "rejected", "equals 'chosen': a pair needs two different "
                               "responses")
    names = pair_scores(fields or {})
    if names is None:
        return
    for name in names:
        if not _is_finite_number(fields[name]):
            raise PairingViolation("bad_score", name, f"expected a finite number, got {fields[name]!r}")
    chosen_field, rejected_field = names
    if not fields[chosen_field] > fields[rejected_field]:
        raise PairingViolation("score_order", chosen_field,
                               f"{fields[chosen_field]!r} is not above {rejected_field}={fields[rejected_field]!r}: "
                               "the chosen response must have the higher score")


class PairLedger:
    """Rule 3 across the pairs of a file (or of a build): which responses of each prompt are already in a pair."""

    def __init__(self) -> None:
        self._used: dict[tuple[Hashable, str], tuple[str, str]] = {}  # (prompt, response) -> (where, side)

    def conflict(self, prompt_key: Hashable, chosen: str, rejected: str) -> Optional[PairingViolation]:
        """Why the pair cannot join (a response already in a pair of ``prompt_key``), or None."""
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            earlier = self._used.get((prompt_key, response.strip()))
            if earlier is not None:
                where, earlier_side = earlier
                return PairingViolation("response_reused", side, f"this response is already the {earlier_side!r} "
                                        f"response of a pair of the same prompt ({where}); no response may be in two "
                                        "pairs of one prompt")
        return None

    def add(self, prompt_key: Hashable, chosen: str, rejected: str, where: str) -> None:
        """Record an admitted pair; raises :class:`PairingViolation` when it breaks rule 3 (nothing recorded)."""
        violation = self.conflict(prompt_key, chosen, rejected)
        if violation is not None:
            raise violation
        self._used[(prompt_key, chosen.strip())] = (where, "chosen")
        self._used[(prompt_key, rejected.strip())] = (where, "rejected")


def make_pairs(samples: Sequence[dict]) -> list[dict]:
    """Pairs of one prompt's scored samples under the rule: the best response with the worst, the second best
    with the second worst, ... (:data:`BUILD_ORDER`).

    ``samples`` are records of one prompt with ``prompt_id``, ``prompt``, ``response``, ``score``, ``sample``
    (its index), ``instruction_id_list``, ``kwargs`` and ``split``. Pairing the ends of the ranking gives each
    pair the widest score gap the samples allow while no sample is used twice.
    """
    ranked = sorted(samples, key=lambda r: (-r["score"], r["sample"]))
    half = len(ranked) // 2
    ledger = PairLedger()
    pairs = []
    for chosen, rejected in zip(ranked[:half], reversed(ranked[len(ranked) - half:])):
        pair = {
            "prompt_id": chosen["prompt_id"], "prompt": chosen["prompt"],
            "chosen": chosen["response"], "rejected": rejected["response"],
            "chosen_score": chosen["score"], "rejected_score": rejected["score"],
            "instruction_id_list": chosen["instruction_id_list"], "kwargs": chosen["kwargs"],
            "chosen_sample": chosen["sample"], "rejected_sample": rejected["sample"], "split": chosen["split"],
        }
        try:
            check_pair(pair["chosen"], pair["rejected"], pair)
            ledger.add(chosen["prompt_id"], pair["chosen"], pair["rejected"], f"sample {chosen['sample']}")
        except PairingViolation:
            continue  # equal scores, or a text already paired (two samples can be the same text)
        pairs.append(pair)
    return pairs
