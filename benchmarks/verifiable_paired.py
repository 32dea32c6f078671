"""Pool paired verifiable-score changes over several evaluations of the same two policies (docs/benchmarks.md).

Each ``--pair BEFORE AFTER`` names two ``summary.json`` files and which evaluation in each to use
(``file.json:verifiable_score_before`` or ``...:verifiable_score_after``); both must cover the same held-out
prompts in the same order, and no prompt may appear in two pairs. Prints the pooled mean change with its
95% confidence interval, the count of prompts that got better / worse, and a two-sided sign test.

    python benchmarks/verifiable_paired.py \\
        --pair runs/a/summary.json:verifiable_score_before runs/a/summary.json:verifiable_score_after \\
        --pair runs/base/summary.json:verifiable_score_before runs/new/summary.json:verifiable_score_before
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from nemo_dvpo.evaluation.verifiable import confidence_interval_95
from nemo_dvpo.utils.errors import run_and_exit


def load_evaluation(spec: str) -> dict:
    path, _, key = spec.rpartition(":")
    if not path or key not in ("verifiable_score_before", "verifiable_score_after"):
        raise SystemExit(f"{spec}: expected SUMMARY.json:verifiable_score_before or SUMMARY.json:verifiable_score_after")
    evaluation = json.loads(Path(path).read_text()).get(key)
    if not evaluation or "scores" not in evaluation:
        raise SystemExit(f"{path}: has no per-prompt scores under {key!r}")
    return evaluation


def per_prompt_changes(before: dict, after: dict, what: str) -> list[float]:
    """``after - before`` per prompt; refuses two evaluations of different prompts (``what`` names them)."""
    if before.get("prompt_ids") != after.get("prompt_ids"):
        raise SystemExit(f"{what}: scored on different held-out prompts ({len(before.get('prompt_ids') or [])} "
                         f"vs {len(after.get('prompt_ids') or [])} prompts, or a different selection)")
    return [a - b for a, b in zip(after["scores"], before["scores"])]


def sign_test_p(better: int, worse: int) -> float:
    """Two-sided exact sign test of ``better`` vs ``worse`` (ties dropped)."""
    total = better + worse
    tail = sum(math.comb(total, k) for k in range(max(better, worse), total + 1)) / 2 ** total
    return min(1.0, 2 * tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", nargs=2, action="append", required=True, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    changes: list[float] = []
    seen: set = set()
    for before_spec, after_spec in args.pair:
        before, after = load_evaluation(before_spec), load_evaluation(after_spec)
        pair_changes = per_prompt_changes(before, after, f"{before_spec} and {after_spec}")
        repeated = seen.intersection(after["prompt_ids"])
        if repeated:
            raise SystemExit(f"{after_spec}: prompts already counted in an earlier pair, e.g. {sorted(repeated)[:3]}")
        seen.update(after["prompt_ids"])
        mean, half_width = confidence_interval_95(pair_changes)
        print(f"{after_spec}: {mean:+.4f} +- {half_width:.4f} over {len(pair_changes)} prompts")
        changes += pair_changes
    mean, half_width = confidence_interval_95(changes)
    better, worse = sum(c > 0 for c in changes), sum(c < 0 for c in changes)
    print(f"pooled paired change {mean:+.4f} +- {half_width:.4f} (95% CI, n={len(changes)}); "
          f"{better} prompts better, {worse} worse; sign test p = {sign_test_p(better, worse):.4f}")


if __name__ == "__main__":
    run_and_exit(main)
