"""MT-Bench (Zheng et al. 2023): 80 two-turn questions, single-answer grading by a judge, as FastChat's llm_judge.

Answers (``gen_model_answer.py``): the category's temperature (``temperature_config``; 0 is greedy),
up to 1024 new tokens, the second turn asked in the same conversation after the model's own first answer.
Judging (``gen_judgment.py --mode single``): turn 1 with the prompt ``single-v1``, turn 2 with
``single-v1-multi-turn`` (the whole conversation, the judge rating the second answer); for math, reasoning
and coding the ``single-math-v1`` variants with GPT-4's reference answers. The judge runs at temperature 0
with up to 2048 tokens. The rating is ``[[x]]`` (or ``[x]``); an unparseable reply is asked again
(``judge.parse_retries``), then counted and left out of the means, as FastChat's ``show_result.py`` drops
ratings of -1. Scores: the mean over all rated turns, per turn and per category.
"""

from __future__ import annotations

import math

from nemo_dvpo.evaluation.benchmarks import assets
from nemo_dvpo.evaluation.benchmarks.base import Benchmark, generation_record, judge_messages
from nemo_dvpo.evaluation.benchmarks.parsing import parse_rating
from nemo_dvpo.evaluation.benchmarks.store import record_key
from nemo_dvpo.evaluation.verifiable import confidence_interval_95

# FastChat llm_judge/common.py (temperature_config, NEED_REF_CATS); categories it does not list get 0.7.
TEMPERATURE_CONFIG = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                      "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
DEFAULT_TEMPERATURE = 0.7
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
MAX_NEW_TOKENS = 1024
JUDGE_MAX_TOKENS = 2048


def judge_prompt_name(category: str, turn: int) -> str:
    name = "single-math-v1" if category in NEED_REF_CATS else "single-v1"
    return name + ("-multi-turn" if turn == 2 else "")


def judge_user_prompt(template: dict, question: dict, answers: list[str], turn: int,
                      reference: list[str] | None) -> str:
    """FastChat's ``create_conv_single``: the template filled with the question(s), answer(s), reference(s)."""
    kwargs = {}
    if reference is not None:
        kwargs["ref_answer_1"] = reference[0]
        if turn == 2:
            kwargs["ref_answer_2"] = reference[1]
    if turn == 2:
        return template["prompt_template"].format(question_1=question["turns"][0], question_2=question["turns"][1],
                                                  answer_1=answers[0], answer_2=answers[1], **kwargs)
    return template["prompt_template"].format(question=question["turns"][0], answer=answers[0], **kwargs)


class MTBench(Benchmark):
    name = "mt_bench"
    judge_max_tokens = JUDGE_MAX_TOKENS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._prompts = None
        self._references = None

    def items(self, limit):
        return [{**question, "id": question["question_id"]} for question in assets.mt_bench_questions(limit)]

    def answer(self, answerer, items):
        by_temperature: dict[float, list[dict]] = {}
        for item in items:
            by_temperature.setdefault(TEMPERATURE_CONFIG.get(item["category"], DEFAULT_TEMPERATURE), []).append(item)
        records = {}
        for temperature, group in by_temperature.items():
            sampling = self.sampling(temperature, MAX_NEW_TOKENS)
            ids = [item["id"] for item in group]
            chats = [[{"role": "user", "content": item["turns"][0]}] for item in group]
            first = answerer.answer(chats, sampling, ids)
            chats = [chat + [{"role": "assistant", "content": answer.text},
                             {"role": "user", "content": item["turns"][1]}]
                     for chat, answer, item in zip(chats, first, group)]
            second = answerer.answer(chats, sampling, [f"{record_id}:2" for record_id in ids])
            for item, answer_1, answer_2 in zip(group, first, second):
                records[item["id"]] = {"id": item["id"], "category": item["category"], "turns": item["turns"],
                                       "answers": [answer_1.text, answer_2.text],
                                       "generation": generation_record(answerer, sampling, [answer_1, answer_2])}
        return [records[item["id"]] for item in items]

    def _assets(self):
        if self._prompts is None:
            self._prompts = assets.mt_bench_judge_prompts()
            self._references = assets.mt_bench_reference_answers()
        return self._prompts, self._references

    def judge_tasks(self, items, answers):
        prompts, references = self._assets()
        tasks = []
        for item in items:
            answer = answers.get(record_key(item["id"]))
            if answer is None:
                continue
            for turn in (1, 2):
                name = judge_prompt_name(item["category"], turn)
                reference = references[item["id"]] if item["category"] in NEED_REF_CATS else None
                template = prompts[name]
                user_prompt = judge_user_prompt(template, item, answer["answers"], turn, reference)
                tasks.append({"id": f"{item['id']}:turn{turn}", "question_id": item["id"], "turn": turn,
                              "category": item["category"], "judge_prompt": name,
                              "messages": judge_messages(template["system_prompt"], user_prompt)})
        return tasks

    def judge(self, client, task):
        outcome = client.judge(task["messages"], parse_rating, self.judge_max_tokens)
        record = {key: task[key] for key in ("id", "question_id", "turn", "category", "judge_prompt")}
        record["judge"] = client.describe()
        if "error" in outcome:
            return {**record, "error": outcome["error"], "requests": outcome["requests"]}
        return {**record, "judgment": outcome["judgment"], "score": outcome["parsed"], "requests": outcome["requests"]}

    def score(self, items, answers, judgments):
        wanted = {record_key(item["id"]) for item in items}
        records = [record for record in judgments.values() if record_key(record["question_id"]) in wanted]
        rated = [record for record in records if record.get("score") is not None]
        result = {"score": _mean([r["score"] for r in rated]),
                  "ci95": _half_width([r["score"] for r in rated]),
                  "turn_1": _mean([r["score"] for r in rated if r["turn"] == 1]),
                  "turn_2": _mean([r["score"] for r in rated if r["turn"] == 2]),
                  "categories": {},
                  "n_questions": len({record_key(r["question_id"]) for r in records}),
                  "n_rated": len(rated),
                  "n_unparseable": sum(1 for r in records if "error" not in r and r.get("score") is None),
                  "n_failed": sum(1 for r in records if "error" in r)}
        for category in sorted({r["category"] for r in rated}):
            result["categories"][category] = _mean([r["score"] for r in rated if r["category"] == category])
        return result


def _mean(values: list[float]):
    return sum(values) / len(values) if values else None


def _half_width(values: list[float]):
    if len(values) < 2:
        return None
    half_width = confidence_interval_95(values)[1]
    return None if math.isnan(half_width) else half_width
