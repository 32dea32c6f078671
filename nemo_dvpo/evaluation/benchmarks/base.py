"""What every benchmark provides to the runner (:mod:`nemo_dvpo.evaluation.benchmarks.runner`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

from nemo_dvpo.evaluation.benchmarks.answers import Answer, Sampling


class Benchmark(ABC):
    """One benchmark: its questions, how they are answered, judged and scored.

    Records are plain JSON objects keyed by ``id``: ``answers.jsonl`` holds one per question,
    ``judgments.jsonl`` one per judge task (an MT-Bench question has two, one per turn).
    """

    name: str = ""
    needs_judge: bool = True
    # The judge's reply limit that the benchmark's own harness uses (JudgeConfig.max_tokens overrides it).
    judge_max_tokens: int = 2048

    def __init__(self, max_new_tokens: Optional[int] = None, seed: int = 0):
        # A cap on every reply's length (tests, quick looks); null keeps the benchmark's own.
        self.max_new_tokens_cap = max_new_tokens
        self.seed = seed

    def sampling(self, temperature: float, max_new_tokens: int) -> Sampling:
        if self.max_new_tokens_cap is not None:
            max_new_tokens = min(max_new_tokens, self.max_new_tokens_cap)
        return Sampling(temperature=temperature, max_new_tokens=max_new_tokens)

    @abstractmethod
    def items(self, limit: Optional[int]) -> list[dict]:
        """The benchmark's questions (the first ``limit``, or all)."""

    @abstractmethod
    def answer(self, answerer, items: list[dict]) -> list[dict]:
        """Answer records for ``items`` (collective for Megatron answerers)."""

    def judge_tasks(self, items: list[dict], answers: dict[str, dict]) -> list[dict]:
        return []

    def judge(self, client, task: dict) -> dict:
        """One judgment record for ``task``; only benchmarks with ``needs_judge`` make judge tasks."""
        raise TypeError(f"{self.name} has no judge: it makes no judge tasks")

    @abstractmethod
    def score(self, items: list[dict], answers: dict[str, dict], judgments: dict[str, dict]) -> dict:
        """The benchmark's scores from its answers and judgments."""


def generation_record(answerer, sampling: Sampling, answers: list[Answer]) -> dict:
    """The generation settings and outcome recorded with an answer (several turns: lists)."""
    record = answerer.describe(sampling)
    record["finish_reason"] = [answer.finish_reason for answer in answers] if len(answers) > 1 \
        else answers[0].finish_reason
    record["completion_tokens"] = [answer.completion_tokens for answer in answers] if len(answers) > 1 \
        else answers[0].completion_tokens
    errors = [answer.error for answer in answers if answer.error]
    if errors:
        record["error"] = errors[0]
    return record


def judge_messages(system_prompt: str, user_prompt: str) -> list[dict]:
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user_prompt}]
