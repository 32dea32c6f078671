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
# Our name of each accuracy -> the key of lm-eval's per-prompt result it aggregates.
RESULT_KEYS = {"prompt_level_strict": "prompt_level_strict_acc", "prompt_level_loose": "prompt_level_loose_acc",
               "instruction_level_strict": "inst_level_strict_acc", "instruction_level_loose": "inst_level_loose_acc"}


def ifeval_scores(docs: list[dict], responses: list[str]) -> dict:
    """The four IFEval accuracies of ``responses`` to ``docs`` (IFEval records), each with a 95% interval.

    Intervals are normal approximations: over prompts for the prompt level, over instructions for the
    instruction level (which treats the instructions of one prompt as independent).
    """
    from nemo_dvpo.data.verifiable import ifeval_modules

    utils = ifeval_modules()[1]
    results = ifeval_results(docs, responses)
    scores: dict = {}
    ci95: dict = {}
    for metric, key in RESULT_KEYS.items():
        if metric.startswith("prompt"):
            values = [float(result[key]) for result in results]
            scores[metric] = sum(values) / len(values)
            ci95[metric] = _half_width(values)
        else:
            scores[metric] = utils.agg_inst_level_acc([result[key] for result in results])
            ci95[metric] = _half_width([float(flag) for result in results for flag in result[key]])
    scores["n"] = len(results)
    scores["n_instructions"] = sum(len(result["inst_level_strict_acc"]) for result in results)
    scores["ci95"] = ci95
    return scores


def ifeval_results(docs: list[dict], responses: list[str]) -> list[dict]:
    """lm-eval's per-prompt IFEval results: prompt-level flags and one flag per instruction, strict and loose."""
    from nemo_dvpo.data.verifiable import deterministic_checks, ifeval_modules

    utils = ifeval_modules()[1]
    results = []
    for doc, response in zip(docs, responses):
        with deterministic_checks():
            results.append(utils.process_results(doc, [response]))
    return results


def ifeval_paired_change(before: list[dict], after: list[dict]) -> dict:
    """The change of each IFEval accuracy from ``before`` to ``after`` (per-prompt results of the same prompts,
    in the same order), with a paired 95% interval and the number of prompts that got better and worse.

    Prompt level: d_i = followed_all_after_i - followed_all_before_i, change = mean(d), interval
    1.96 sd(d) / sqrt(N). Instruction level: d_i = instructions of prompt i followed after - before, change
    = sum(d) / sum(n_i); both models answer the same instructions, so sum(n_i) is a constant and the
    interval is the prompt-level one scaled by N / sum(n_i) (prompts, not instructions, are the independent
    units: one answer decides all of a prompt's instructions).
    """
    if len(before) != len(after) or not before:
        raise ValueError(f"paired IFEval results need the same non-empty prompts, got {len(before)} and {len(after)}")
    change: dict = {"n": len(before)}
    for metric, key in RESULT_KEYS.items():
        differences = [_followed(a[key]) - _followed(b[key]) for b, a in zip(before, after)]
        mean, half_width = confidence_interval_95(differences)
        scale = 1.0
        if metric.startswith("instruction"):
            counts = [len(b[key]) for b in before]
            if counts != [len(a[key]) for a in after]:
                raise ValueError("paired IFEval results must score the same instructions of each prompt")
            scale = len(counts) / sum(counts)
        change[metric] = {"change": mean * scale,
                          "ci95": None if math.isnan(half_width) else half_width * scale,
                          "better": sum(d > 0 for d in differences), "worse": sum(d < 0 for d in differences)}
    return change


def _followed(value) -> float:
    """How many instructions a result followed: a prompt-level result is one flag, an instruction-level
    result a list of them."""
    return float(sum(map(float, value))) if isinstance(value, list) else float(value)


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
