"""IFEval (Zhou et al. 2023): 541 prompts with verifiable instructions, scored by lm-eval's own code.

Each response goes through ``lm_eval/tasks/ifeval/utils.py``'s ``process_results`` (the strict and the
loose checkers) and the four accuracies are that task's aggregations: prompt level is the mean over
prompts of "followed every instruction", instruction level is ``agg_inst_level_acc`` (the fraction of all
instructions followed). Answers are greedy with lm-eval's 1280-token limit, through the chat template.
"""

from __future__ import annotations

import math
from typing import Optional

from nemo_dvpo.evaluation.benchmarks import assets
from nemo_dvpo.evaluation.benchmarks.base import Benchmark, generation_record
from nemo_dvpo.evaluation.verifiable import confidence_interval_95

# lm-eval's ifeval.yaml: do_sample false, temperature 0, max_gen_toks 1280.
MAX_NEW_TOKENS = 1280
METRICS = ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict", "instruction_level_loose")


def ifeval_scores(docs: list[dict], responses: list[str]) -> dict:
    """The four IFEval accuracies of ``responses`` to ``docs`` (IFEval records), each with a 95% interval.

    Intervals are normal approximations: over prompts for the prompt level, over instructions for the
    instruction level (which treats the instructions of one prompt as independent).
    """
    from nemo_dvpo.data.verifiable import ifeval_modules

    utils = ifeval_modules()[1]
    results = [utils.process_results(doc, [response]) for doc, response in zip(docs, responses)]
    scores: dict = {}
    ci95: dict = {}
    for metric, key in (("prompt_level_strict", "prompt_level_strict_acc"),
                        ("prompt_level_loose", "prompt_level_loose_acc")):
        values = [float(result[key]) for result in results]
        scores[metric] = sum(values) / len(values)
        ci95[metric] = _half_width(values)
    for metric, key in (("instruction_level_strict", "inst_level_strict_acc"),
                        ("instruction_level_loose", "inst_level_loose_acc")):
        scores[metric] = utils.agg_inst_level_acc([result[key] for result in results])
        ci95[metric] = _half_width([float(flag) for result in results for flag in result[key]])
    scores["n"] = len(results)
    scores["n_instructions"] = sum(len(result["inst_level_strict_acc"]) for result in results)
    scores["ci95"] = ci95
    return scores


def _half_width(values: list[float]) -> Optional[float]:
    half_width = confidence_interval_95(values)[1]
    return None if math.isnan(half_width) else half_width


class IFEval(Benchmark):
    name = "ifeval"
    needs_judge = False

    def items(self, limit):
        return [{**prompt, "id": prompt["key"]} for prompt in assets.ifeval_prompts(limit)]

    def answer(self, answerer, items):
        sampling = self.sampling(0.0, MAX_NEW_TOKENS)
        answers = answerer.answer([[{"role": "user", "content": item["prompt"]}] for item in items], sampling,
                                  [item["id"] for item in items])
        return [{"id": item["id"], "prompt": item["prompt"], "answer": answer.text,
                 "generation": generation_record(answerer, sampling, [answer])} for item, answer in zip(items, answers)]

    def score(self, items, answers, judgments):
        from nemo_dvpo.evaluation.benchmarks.store import record_key

        docs = [item for item in items if record_key(item["id"]) in answers]
        return ifeval_scores(docs, [answers[record_key(doc["id"])]["answer"] for doc in docs])
