"""Arena-Hard's score and interval as arena-hard-auto v2's ``show_result.py`` computes them.

arena-hard-auto (no style control): the per-game entries of a model are resampled with replacement 100 times
(``groupby("model").sample(frac=1.0, replace=True)``), the leaderboard score is the mean of the 100 resample
means and the interval their 5th and 95th percentiles (pandas' ``quantile``, linear interpolation). References
here: hand arithmetic, pandas' own ``quantile``, the exact binomial distribution of a resample mean, and a
Bradley-Terry fit set up as arena-hard-auto's style-controlled path sets it up (one-hot features with the
baseline at -1, a summed logistic loss, L-BFGS).
"""

from __future__ import annotations

import math

import pytest

from nemo_dvpo.evaluation.benchmarks.arena_hard import (
    ARENA_HARD_AUTO_ROUNDS,
    arena_hard_auto_interval,
    arena_hard_auto_summary,
    arena_hard_scores,
    game_entries,
)


def test_summary_of_resample_means_by_hand_and_by_pandas():
    import pandas as pd

    means = [0.1 * k for k in range(1, 11)]  # 0.1 ... 1.0
    summary = arena_hard_auto_summary(means)
    # Mean 0.55; the 5th percentile sits at position 0.05 * 9 = 0.45 between 0.1 and 0.2, the 95th at 8.55
    # between 0.9 and 1.0.
    assert summary["score"] == pytest.approx(0.55, abs=1e-15)
    assert summary["interval90"] == pytest.approx([0.145, 0.955], abs=1e-15)
    series = pd.Series(means)
    assert summary["interval90"] == pytest.approx([series.quantile(0.05), series.quantile(0.95)], abs=1e-15)


def _binomial_quantile(n: int, p: float, q: float) -> int:
    """The smallest k with P(Binomial(n, p) <= k) >= q."""
    total = 0.0
    for k in range(n + 1):
        total += math.comb(n, k) * p ** k * (1 - p) ** (n - k)
        if total >= q:
            return k
    return n


def test_entries_not_questions_are_resampled_and_the_interval_is_the_binomials():
    # 5 questions of 4 identical entries each (a strong verdict and its mirror), 10 wins in 20 entries. Pooled
    # entries make a resample mean Binomial(20, 1/2) / 20: its 5th and 95th percentiles are 6/20 and 14/20
    # (P(X <= 5) = 0.021, P(X <= 6) = 0.058). With 20,000 resamples the empirical CDF at those points is within
    # +-0.0015 (one standard deviation) of the exact one, 5 of them from 0.05, so both neighbours of the
    # interpolated percentile are the binomial's quantile.
    questions = [[1.0] * 4, [1.0] * 4, [0.0] * 4, [0.0] * 4, [1.0, 1.0, 0.0, 0.0]]
    assert (_binomial_quantile(20, 0.5, 0.05), _binomial_quantile(20, 0.5, 0.95)) == (6, 14)
    result = arena_hard_auto_interval(questions, rounds=20_000)
    assert result["interval90"] == [6 / 20, 14 / 20]
    assert result["n_entries"] == 20 and result["score"] == pytest.approx(0.5, abs=3 * 0.5 / math.sqrt(20 * 20_000))
    # Resampling whole questions instead would move the entries of a question together: 5 draws, not 20.
    ours = arena_hard_scores(questions)
    low, high = ours["ci95_question_bootstrap"]
    assert high - low > 0.5 and ours["win_rate"] == 0.5


def test_defaults_are_arena_hard_autos_and_seeded():
    questions = [game_entries("A>>B", "A=B"), game_entries("B>A", "A>>B"), game_entries("A>B", "B>A")]
    result = arena_hard_auto_interval(questions)
    assert ARENA_HARD_AUTO_ROUNDS == 100 and result["rounds"] == 100
    assert result == arena_hard_auto_interval(questions)  # seeded: a rerun prints the same numbers
    low, high = result["interval90"]
    assert 0 <= low <= result["score"] <= high <= 1
    assert arena_hard_auto_interval([])["score"] is None


def _bradley_terry_win_probability(entries: list[float], lr: float = 0.1, max_iter: int = 50) -> tuple[float, float]:
    """arena-hard-auto's style-controlled fit with no style features: coefficients for (baseline, model)
    initialised at 0.5, features +1 for the model and -1 for the baseline, the summed logistic loss with the
    entries as soft outcomes, L-BFGS (its defaults: lr 0.1, 50 iterations, tolerances 1e-9); the win probability
    is exp(c_model) / (exp(c_model) + exp(c_baseline)). Returns it and the loss's derivative in c_model there."""
    import torch

    features = torch.tensor([[-1.0, 1.0]] * len(entries), dtype=torch.float64)
    outcomes = torch.tensor(entries, dtype=torch.float64)
    coefficients = torch.nn.Parameter(torch.full((2,), 0.5, dtype=torch.float64))
    optimizer = torch.optim.LBFGS([coefficients], lr=lr, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-9)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(features @ coefficients, outcomes,
                                                                    reduction="sum")
        loss.backward()
        return loss

    optimizer.step(closure)
    closure()
    baseline, model = coefficients.detach().exp()
    return float(model / (model + baseline)), float(coefficients.grad[1])


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.mark.parametrize("entries", [
    [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 0.5, 0.5],
    [0.0, 0.0, 0.0, 0.0, 1.0],
    # The size of one category of Arena-Hard v2.0 (500 questions, 2 to 6 entries each).
    [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 0.5, 0.5, 1.0, 0.0, 0.0] * 150,
])
def test_the_bradley_terry_win_probability_is_the_mean_of_the_entries(entries):
    mean = sum(entries) / len(entries)
    # The loss's derivative in the model's coefficient is n (p - mean): at the likelihood's stationary point p is
    # the mean. Fitted with full L-BFGS steps, p is the mean to |derivative| / n where the solver stops, and
    # that derivative is near 0 (float64 rounding of the sums aside).
    converged, derivative = _bradley_terry_win_probability(entries, lr=1.0, max_iter=200)
    assert converged - mean == pytest.approx(derivative / len(entries), abs=1e-12)
    assert abs(derivative) < 1e-5
    # With arena-hard-auto's settings each quasi-Newton step covers a tenth of the way, so 50 of them stop short
    # of it by about 0.9 ** 50 = 0.5% of its logit (checked at 1%): under 0.1 points for any score in 5-95%.
    shrunk, _ = _bradley_terry_win_probability(entries)
    assert abs(_logit(shrunk) - _logit(mean)) <= 0.01 * abs(_logit(mean))


def _judged(uid: str, category: str, first: str, second: str) -> dict:
    return {"id": uid, "category": category, "baseline": "b", "judge": {"model": "j"},
            "games": [{"game": "baseline_is_A", "verdict": first}, {"game": "model_is_A", "verdict": second}]}


def test_scores_and_report_rows_carry_both_intervals_per_category():
    from nemo_dvpo.evaluation.benchmarks.arena_hard import ArenaHard
    from nemo_dvpo.evaluation.benchmarks.report import score_rows

    verdicts = {"q1": ("hard_prompt", "A>>B", "A=B"), "q2": ("hard_prompt", "B>A", "A>>B"),
                "q3": ("hard_prompt", "A>B", "B>A"), "q4": ("creative_writing", "B>>A", "A>B"),
                "q5": ("creative_writing", "A=B", "B>>A")}
    judgments = {uid: _judged(uid, *triple) for uid, triple in verdicts.items()}
    result = ArenaHard().score([{"id": uid} for uid in verdicts], {}, judgments)
    hard = [game_entries(*verdicts[uid][1:]) for uid in ("q1", "q2", "q3")]
    # 0,0,0,0.5 | 1,1,1,1 | 0,0 -> 4.5 / 10 by hand
    assert result["categories"]["hard_prompt"]["win_rate"] == pytest.approx(0.45, abs=1e-15)
    assert result["categories"]["hard_prompt"]["arena_hard_auto"] == arena_hard_auto_interval(hard)
    assert result["arena_hard_auto"] == arena_hard_auto_interval([game_entries(*v[1:]) for v in verdicts.values()])
    assert result["categories"]["hard_prompt"]["baseline"] == "o3-mini-2025-01-31"  # arena-hard-auto's v2.0 setting

    rows = {metric: values for metric, *values in score_rows({"arena_hard": result})}
    auto = result["categories"]["hard_prompt"]["arena_hard_auto"]
    assert rows["Arena-Hard hard_prompt: score (%), arena-hard-auto 90% interval"] == pytest.approx(
        [100 * auto["score"], *(100 * bound for bound in auto["interval90"])], abs=1e-12)
    assert "Arena-Hard creative_writing: score (%), arena-hard-auto 90% interval" in rows
    ours = rows["Arena-Hard all categories: win rate (%), question-bootstrap 95% interval (ours)"]
    assert ours == pytest.approx([100 * result["win_rate"], *(100 * b for b in result["ci95_question_bootstrap"])],
                                 abs=1e-12)
    # A scores.json written before this change (ours under "ci95", no arena-hard-auto numbers) still reads.
    old = {"win_rate": 0.5, "ci95": [0.25, 0.75], "categories": {"hard_prompt": {"win_rate": 0.5}}}
    rows = {metric: values for metric, *values in score_rows({"arena_hard": old})}
    assert rows["Arena-Hard all categories: win rate (%), question-bootstrap 95% interval (ours)"] == [50, 25, 75]
    assert rows["Arena-Hard hard_prompt: score (%), arena-hard-auto 90% interval"] == [None, None, None]
