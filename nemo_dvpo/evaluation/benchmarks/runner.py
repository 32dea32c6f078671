"""One evaluation: answers, judgments and scores for each benchmark, cached so that a rerun does no work twice.

Layout of the output folder::

    DIR/<benchmark>/answers.jsonl     one record per question: id, prompt or turns, answer(s), generation settings
    DIR/<benchmark>/judgments.jsonl   one record per judge task: the judge's reply, what was read from it, the judge
    DIR/scores.json                   every benchmark's scores, with the judge and the answer source

Answers are appended one round (a batch per data-parallel replica) at a time and judgments one at a time,
each write flushed, so a killed run loses at most the round or judgment in progress. A rerun skips every
question with an answer and every task with a judgment; a judgment the endpoint could not deliver (it
stayed away through all retries) is not written, so the next run asks again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from nemo_dvpo.evaluation.benchmarks.alpaca import AlpacaEval
from nemo_dvpo.evaluation.benchmarks.arena_hard import ArenaHard
from nemo_dvpo.evaluation.benchmarks.base import Benchmark
from nemo_dvpo.evaluation.benchmarks.ifeval import IFEval
from nemo_dvpo.evaluation.benchmarks.judge import JudgeClient, plan_message
from nemo_dvpo.evaluation.benchmarks.mt_bench import MTBench
from nemo_dvpo.evaluation.benchmarks.store import RecordFile, record_key, write_json_atomic
from nemo_dvpo.utils.errors import NemoDvpoError

BENCHMARKS: dict[str, type[Benchmark]] = {"ifeval": IFEval, "mt_bench": MTBench, "arena_hard": ArenaHard,
                                          "alpaca_eval": AlpacaEval}


def parse_benchmarks(names: str) -> list[str]:
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown or not chosen:
        raise NemoDvpoError(f"--benchmarks: unknown benchmark(s) {', '.join(unknown) or '(none given)'}; "
                            f"choose from {', '.join(BENCHMARKS)}")
    return list(dict.fromkeys(chosen))


def check_judge(names: list[str], have_judge: bool) -> None:
    needing = [name for name in names if BENCHMARKS[name].needs_judge]
    if needing and not have_judge:
        raise NemoDvpoError(f"{', '.join(needing)} need(s) a judge: give --judge-base-url (an OpenAI-compatible "
                            "endpoint, e.g. examples/serve_policy.py), or --benchmarks ifeval")


def _log(message: str) -> None:
    print(message, flush=True)


def collect_answers(benchmark: Benchmark, items: list[dict], folder: Path, answerer, is_writer: bool) -> None:
    """Answer the questions without an answer yet (collective for Megatron answerers)."""
    answers_file = RecordFile(folder / "answers.jsonl", f"{benchmark.name} answers")
    done = answerer.broadcast(set(answers_file.load()) if is_writer else None)
    pending = [item for item in items if record_key(item["id"]) not in done]
    if is_writer:
        _log(f"[{benchmark.name}] answers: {len(items) - len(pending)} of {len(items)} already in "
             f"{answers_file.path}, {len(pending)} to generate with {answerer.source}")
    for start in range(0, len(pending), answerer.round_size):
        records = benchmark.answer(answerer, pending[start:start + answerer.round_size])
        if is_writer:
            answers_file.append(records)
            _log(f"[{benchmark.name}] answered {min(start + answerer.round_size, len(pending))} of {len(pending)}")


def collect_judgments(benchmark: Benchmark, items: list[dict], folder: Path, judge: JudgeClient) -> int:
    """Judge the tasks without a judgment yet; returns how many the endpoint could not deliver."""
    answers = RecordFile(folder / "answers.jsonl", f"{benchmark.name} answers").load()
    judgments_file = RecordFile(folder / "judgments.jsonl", f"{benchmark.name} judgments")
    done = judgments_file.load()
    tasks = benchmark.judge_tasks(items, answers)
    pending = [task for task in tasks if record_key(task["id"]) not in done]
    requests = sum(len(task["games"]) if "games" in task else 1 for task in pending)
    characters = sum(len(message["content"]) for task in pending
                     for messages in (task.get("games") or [task["messages"]]) for message in messages)
    max_tokens = judge.config.max_tokens or benchmark.judge_max_tokens
    _log(f"[{benchmark.name}] judgments: {len(tasks) - len(pending)} of {len(tasks)} already in {judgments_file.path}")
    if pending:
        _log(plan_message(benchmark.name, requests, characters, max_tokens, judge.config.parse_retries)
             + f" from {judge.config.model} at {judge.config.base_url}")
    unavailable = 0
    for count, (task, record, why) in enumerate(judge.map(lambda task: benchmark.judge(judge, task), pending), 1):
        if record is None:
            unavailable += 1
            _log(f"[{benchmark.name}] no judgment for {task['id']}: {why}")
            continue
        judgments_file.append([record])
        if count % 20 == 0 or count == len(pending):
            _log(f"[{benchmark.name}] judged {count} of {len(pending)}")
    return unavailable


def score_benchmark(benchmark: Benchmark, items: list[dict], folder: Path) -> dict:
    answers = RecordFile(folder / "answers.jsonl", f"{benchmark.name} answers").load()
    judgments = RecordFile(folder / "judgments.jsonl", f"{benchmark.name} judgments").load()
    return benchmark.score(items, answers, judgments)


def evaluate(names: list[str], output_dir: Path, answerer, judge: Optional[JudgeClient], limit: Optional[int],
             max_new_tokens: Optional[int], seed: int, model_name: str, is_writer: bool = True) -> Optional[dict]:
    """Answer, judge and score ``names``; returns (on the writer) what ``scores.json`` holds."""
    benchmarks = []
    for name in names:
        kwargs = {"model_name": model_name} if name == "alpaca_eval" else {}
        benchmark = BENCHMARKS[name](max_new_tokens=max_new_tokens, seed=seed, **kwargs)
        benchmarks.append((benchmark, benchmark.items(limit)))
    check_judge(names, judge is not None)
    for benchmark, items in benchmarks:
        collect_answers(benchmark, items, output_dir / benchmark.name, answerer, is_writer)
    if not is_writer:
        return None
    scores_path = output_dir / "scores.json"
    # Scores of benchmarks evaluated earlier into the same folder stay; those evaluated now are replaced.
    scores = _previous_scores(scores_path)
    scores.update({"model": model_name, "answers_from": answerer.source})
    missing = {}
    for benchmark, items in benchmarks:
        folder = output_dir / benchmark.name
        if benchmark.needs_judge:
            missing[benchmark.name] = collect_judgments(benchmark, items, folder, judge)
        result = score_benchmark(benchmark, items, folder)
        result["questions"] = len(items)  # the first --limit questions, or all of them
        if benchmark.needs_judge:
            result["judge"] = judge.describe()
            result["judgments_missing"] = missing[benchmark.name]
        scores[benchmark.name] = result
    if judge is not None:
        scores["judge_usage"] = {"requests": judge.requests, "prompt_tokens": judge.prompt_tokens,
                                 "completion_tokens": judge.completion_tokens}
    write_json_atomic(scores_path, scores)
    _log(f"scores written to {scores_path}")
    if any(missing.values()):
        raise NemoDvpoError("the judge could not deliver " + ", ".join(f"{count} {name}" for name, count in
                            missing.items() if count) + " judgment(s) through all retries; scores.json counts "
                            "them as missing - rerun the same command to judge them")
    return scores


def _previous_scores(path: Path) -> dict:
    import json

    if not path.exists():
        return {}
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise NemoDvpoError(f"{path} is not valid JSON ({error}); move it away to start the scores afresh") from None
    return {name: previous[name] for name in BENCHMARKS if name in previous}
