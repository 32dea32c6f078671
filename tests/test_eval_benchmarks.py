"""Benchmark evaluation (tools/eval_benchmarks.py) and the OpenAI-compatible policy server (examples/serve_policy.py).

References are independent of our code: FastChat's and arena-hard-auto's own patterns and tables read from the
packaged sources, lm-eval's IFEval ``process_results`` and aggregations, alpaca_eval's GLM fit called directly,
Hugging Face greedy generation. End to end, the tiny preset answers and a served tiny preset judges (its replies
are noise, so those judgments are unparseable: they must be re-asked and counted).
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from nemo_dvpo.utils.errors import NemoDvpoError
from tests.conftest import REPO_ROOT, SMOLLM2_SOURCE, ServerProcess, entry_point_env

TOOL = [sys.executable, "tools/eval_benchmarks.py"]


class PolicyServer(ServerProcess):
    """``examples/serve_policy.py`` in a subprocess on a free loopback port; ``url`` is its OpenAI base URL."""

    def __init__(self, *overrides: str):
        super().__init__("examples/serve_policy.py", *overrides, ready_path="/health", url_path="/v1",
                         name="policy_server", env=_env())


def _env() -> dict:
    env = entry_point_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def tiny_server():
    # Long enough for Arena-Hard's judge prompts (two long answers); the tiny model's RoPE takes any length.
    server = PolicyServer("policy=tiny", "max_sequence_length=8192").wait_ready()
    yield server
    assert server.stop() == 0, server.output()


def _run_tool(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOL, *args], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


# --- judge output parsing ---------------------------------------------------------------------------------


def _fastchat_source() -> str:
    from nemo_dvpo.evaluation.benchmarks.assets import llm_judge_data_dir

    return (llm_judge_data_dir().parent / "common.py").read_text()


def _module_assignment(source: str, name: str):
    """The value of a top-level ``name = <literal or re.compile(literal)>`` in a module's source."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            value = node.value
            if isinstance(value, ast.Call):  # re.compile("...")
                return re.compile(ast.literal_eval(value.args[0]))
            return ast.literal_eval(value)
    raise AssertionError(f"{name} not found")


@pytest.mark.parametrize("reply, rating", [
    ("The answer is helpful. Rating: [[8]]", 8.0),
    ("Rating: [[7.5]]", 7.5),
    ("I would give it [6] out of ten.", 6.0),  # FastChat's fallback pattern
    ("First [[9]], then on reflection [[3]]", 9.0),  # FastChat takes the first match
    ("Rating: [[10/10]]", None),
    ("I rate it eight out of ten.", None),
    ("", None),
])
def test_mt_bench_ratings_are_read_as_fastchat_reads_them(reply, rating):
    from nemo_dvpo.evaluation.benchmarks.parsing import parse_rating

    source = _fastchat_source()
    primary = _module_assignment(source, "one_score_pattern")
    backup = _module_assignment(source, "one_score_pattern_backup")
    match = primary.search(reply) or backup.search(reply)
    expected = float(ast.literal_eval(match.group(1))) if match else None
    assert expected == rating  # the case is what FastChat's own patterns read
    assert parse_rating(reply) == rating


@pytest.mark.parametrize("reply, verdict", [
    ('My final verdict is: Assistant A is significantly better: [[A>>B]]', "A>>B"),
    ("At first [[A>B]], but all considered [[B>A]]", "B>A"),  # the last label counts
    ("my final verdict is tie: [[a=b]]", "A=B"),  # read upper-cased
    ("Verdict: [B>>A]", "B>>A"),  # the single-bracket fallback
    ("[[B<<A]]", "B<<A"),  # a mirrored spelling arena-hard-auto also scores
    ("[[C]] is best", None),
    ("[[A>B>A]]", None),  # bracketed, but not a verdict
    ("Both are fine.", None),
])
def test_arena_hard_verdicts(reply, verdict):
    from eval_framework.tasks import arena_hard_task as reference

    from nemo_dvpo.evaluation.benchmarks.parsing import VERDICT_PATTERNS, parse_verdict

    assert [pattern.pattern for pattern in VERDICT_PATTERNS] == reference.DEFAULT_REGEX_PATTERNS
    assert parse_verdict(reply) == verdict


def test_arena_hard_scores_follow_arena_hard_autos_label_table():
    from nemo_dvpo.evaluation.benchmarks.arena_hard import game_entries, win_rate_with_bootstrap

    # arena-hard-auto: scores = label_to_score[game2] + [1 - s for s in label_to_score[game1]], weight 3.
    assert game_entries("A>>B", "A=B") == [0.0, 0.0, 0.0, 0.5]  # baseline (A in game 1) much better, then a tie
    assert game_entries("B>A", "A>>B") == [1.0, 1.0, 1.0, 1.0]
    assert game_entries("B<<A", "B<A") == [0.0, 0.0, 0.0, 1.0]
    result = win_rate_with_bootstrap([[0.0, 0.0, 0.0, 0.5], [1.0, 1.0], [0.5, 0.5]])
    assert result["win_rate"] == pytest.approx(3.5 / 8)
    low, high = result["ci95_question_bootstrap"]
    assert 0 <= low <= result["win_rate"] <= high <= 1 and high - low > 0.1
    assert win_rate_with_bootstrap([[0.0, 0.0, 0.0, 0.5], [1.0, 1.0], [0.5, 0.5]]) == result  # seeded


@pytest.mark.parametrize("reply, identifier", [("M", "M"), (" m\n", "m"), ("Model M", None), ("mM", None), ("", None)])
def test_alpaca_eval_identifiers(reply, identifier):
    from nemo_dvpo.evaluation.benchmarks.parsing import parse_alpaca_preference

    assert parse_alpaca_preference(reply) == identifier


def test_mt_bench_generation_and_judging_tables_are_fastchats():
    from nemo_dvpo.evaluation.benchmarks.mt_bench import NEED_REF_CATS, TEMPERATURE_CONFIG, judge_prompt_name

    source = _fastchat_source()
    assert TEMPERATURE_CONFIG == _module_assignment(source, "temperature_config")
    assert list(NEED_REF_CATS) == _module_assignment(source, "NEED_REF_CATS")
    assert judge_prompt_name("math", 1) == "single-math-v1"
    assert judge_prompt_name("writing", 2) == "single-v1-multi-turn"


# --- the judge client -------------------------------------------------------------------------------------


class _FakeChat:
    """An ``openai.OpenAI`` stand-in that answers from a script (exceptions are raised)."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = 0
        self.lock = threading.Lock()
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    def create(self, **kwargs):
        with self.lock:
            self.calls += 1
            item = self.script.pop(0) if self.script else "[[5]]"
        if isinstance(item, Exception):
            raise item
        return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=item))],
                               usage=SimpleNamespace(prompt_tokens=10, completion_tokens=3))


def _status_error(status: int):
    import httpx
    import openai

    response = httpx.Response(status, request=httpx.Request("POST", "http://judge/v1/chat/completions"),
                              json={"error": {"message": f"status {status}"}})
    return openai.APIStatusError(f"status {status}", response=response, body={"error": {"message": f"status {status}"}})


def test_judge_retries_passing_failures_with_backoff_and_reasks_unparseable_replies():
    from nemo_dvpo.evaluation.benchmarks.judge import JudgeClient, JudgeConfig, JudgeUnavailable
    from nemo_dvpo.evaluation.benchmarks.parsing import parse_rating

    waits = []
    config = JudgeConfig(base_url="http://judge/v1", model="judge", max_retries=3, backoff_s=0.5, parse_retries=2)
    fake = _FakeChat([_status_error(503), _status_error(429), "no rating here", "Rating: [[7]]"])
    client = JudgeClient(config, client=fake, sleep=waits.append)
    outcome = client.judge([{"role": "user", "content": "rate"}], parse_rating, 16)
    assert outcome == {"judgment": "Rating: [[7]]", "parsed": 7.0, "requests": 4}
    assert waits == [0.5, 1.0]  # exponential backoff before each retry of a failed request

    fake = _FakeChat(["garbage"] * 3)
    outcome = JudgeClient(config, client=fake, sleep=waits.append).judge([{"role": "user", "content": "x"}],
                                                                          parse_rating, 16)
    assert outcome == {"judgment": "garbage", "parsed": None, "requests": 3} and fake.calls == 3

    fake = _FakeChat([_status_error(400)])
    outcome = JudgeClient(config, client=fake, sleep=waits.append).judge([{"role": "user", "content": "x"}],
                                                                          parse_rating, 16)
    assert outcome["error"] == "HTTP 400: status 400" and fake.calls == 1  # refused for good: not retried

    fake = _FakeChat([_status_error(500)] * 4)
    with pytest.raises(JudgeUnavailable):
        JudgeClient(config, client=fake, sleep=waits.append).complete([{"role": "user", "content": "x"}], 16)
    assert fake.calls == 4


# --- IFEval -----------------------------------------------------------------------------------------------

IFEVAL_RESPONSES = [
    # IFEval's first prompts; responses that follow some instructions, all, or none.
    "Raymond III was a count.\n*Early life* He was born.\n*Rule* He ruled Tripoli.\n*Death* He died in 1187.",
    "I am planning a trip to japan and i would like thee to write an itinerary for my journey in a "
    "shakespearean style. thou art not allowed to use any commas in thy response.",
    "A RESUME FOR A FRESH HIGH SCHOOL GRADUATE WHO IS SEEKING THEIR FIRST JOB.",
    "",
    "Here is a limerick about a guy, named Dave, from Gosh.\n\nP.S. It ends here.",
    "**Title** A short, plain reply with no markdown sections at all.",
]


def test_ifeval_scores_equal_lm_evals_own_scoring():
    import yaml

    from nemo_dvpo.data.verifiable import ifeval_modules
    from nemo_dvpo.evaluation.benchmarks.assets import ifeval_prompts
    from nemo_dvpo.evaluation.benchmarks.ifeval import ifeval_scores

    docs = ifeval_prompts(len(IFEVAL_RESPONSES))
    utils = ifeval_modules()[1]
    task = yaml.safe_load(re.sub(r"!function ", "", (Path(utils.__file__).parent / "ifeval.yaml").read_text()))
    aggregation = {entry["metric"]: entry["aggregation"] for entry in task["metric_list"]}
    assert aggregation == {"prompt_level_strict_acc": "mean", "inst_level_strict_acc": "utils.agg_inst_level_acc",
                           "prompt_level_loose_acc": "mean", "inst_level_loose_acc": "utils.agg_inst_level_acc"}
    results = [utils.process_results(doc, [response]) for doc, response in zip(docs, IFEVAL_RESPONSES)]

    def reference(metric):
        values = [result[metric] for result in results]
        if aggregation[metric] == "mean":  # lm_eval.api.metrics.mean: sum(arr) / len(arr)
            return sum(values) / len(values)
        return utils.agg_inst_level_acc(values)

    scores = ifeval_scores(docs, IFEVAL_RESPONSES)
    assert scores["prompt_level_strict"] == reference("prompt_level_strict_acc")
    assert scores["prompt_level_loose"] == reference("prompt_level_loose_acc")
    assert scores["instruction_level_strict"] == reference("inst_level_strict_acc")
    assert scores["instruction_level_loose"] == reference("inst_level_loose_acc")
    assert scores["n"] == 6
    # The fixture separates the levels (a test that cannot fail is no test).
    assert 0 < scores["prompt_level_strict"] < scores["instruction_level_strict"] < 1
    assert scores["prompt_level_loose"] >= scores["prompt_level_strict"]
    assert all(0 < half_width < 1 for half_width in scores["ci95"].values())


def _result(strict: list[bool], loose: list[bool]) -> dict:
    """A per-prompt result shaped like lm-eval's ``process_results``."""
    return {"prompt_level_strict_acc": all(strict), "inst_level_strict_acc": strict,
            "prompt_level_loose_acc": all(loose), "inst_level_loose_acc": loose}


def test_ifeval_paired_change_against_hand_computed_values():
    from nemo_dvpo.evaluation.benchmarks.ifeval import ifeval_paired_change

    before = [_result([True, False], [True, False]), _result([True], [True]),
              _result([False, False, True], [False, False, True])]
    after = [_result([True, True], [True, True]), _result([True], [True]),
             _result([True, False, False], [False, False, False])]
    change = ifeval_paired_change(before, after)
    # Prompt level strict: d = (1, 0, 0), mean 1/3, sd sqrt(1/3), half-width 1.96 sqrt(1/3) / sqrt(3) = 0.6533.
    assert change["prompt_level_strict"]["change"] == pytest.approx(1 / 3)
    assert change["prompt_level_strict"]["ci95"] == pytest.approx(1.96 * (1 / 3) ** 0.5 / 3 ** 0.5)
    assert (change["prompt_level_strict"]["better"], change["prompt_level_strict"]["worse"]) == (1, 0)
    # Instruction level strict: followed 1+1+1 of 6 -> 2+1+1 of 6: +1/6; d per prompt (1, 0, 0), so the
    # half-width is the prompt-level one times 3 prompts / 6 instructions.
    assert change["instruction_level_strict"]["change"] == pytest.approx(1 / 6)
    assert change["instruction_level_strict"]["ci95"] == pytest.approx(1.96 * (1 / 3) ** 0.5 / 3 ** 0.5 / 2)
    # Loose: prompt 1 gains an instruction, prompt 3 loses one: d = (1, 0, -1), no net change.
    assert change["instruction_level_loose"]["change"] == pytest.approx(0.0)
    assert (change["instruction_level_loose"]["better"], change["instruction_level_loose"]["worse"]) == (1, 1)
    assert change["instruction_level_loose"]["ci95"] == pytest.approx(1.96 * 1.0 / 3 ** 0.5 / 2)
    assert change["n"] == 3
    with pytest.raises(ValueError, match="same instructions"):
        ifeval_paired_change(before, [after[0], after[1], _result([True], [True])])


def _write_ifeval_answers(folder: Path, docs: list, responses: list, max_new_tokens: int = 1280) -> None:
    folder.joinpath("ifeval").mkdir(parents=True)
    folder.joinpath("ifeval", "answers.jsonl").write_text("".join(
        json.dumps({"id": doc["key"], "answer": response,
                    "generation": {"max_new_tokens": max_new_tokens, "temperature": 0.0}}) + "\n"
        for doc, response in zip(docs, responses)))
    folder.joinpath("scores.json").write_text(json.dumps({"model": folder.name}))


def test_the_report_pairs_ifeval_answers_and_its_changes_equal_the_difference_of_lm_evals_scores(tmp_path):
    from nemo_dvpo.evaluation.benchmarks.assets import ifeval_prompts
    from nemo_dvpo.evaluation.benchmarks.ifeval import ifeval_scores
    from nemo_dvpo.evaluation.benchmarks.report import ifeval_paired_lines

    docs = ifeval_prompts(len(IFEVAL_RESPONSES))
    worse = ["" for _ in IFEVAL_RESPONSES[:3]] + IFEVAL_RESPONSES[3:]  # the first three answers emptied
    _write_ifeval_answers(tmp_path / "base", docs, IFEVAL_RESPONSES)
    _write_ifeval_answers(tmp_path / "tuned", docs[::-1], worse[::-1])  # another order: paired by id
    lines = ifeval_paired_lines([tmp_path / "base", tmp_path / "tuned"], ["base", "tuned"])
    row = next(line for line in lines if line.startswith("| tuned |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == str(len(docs))
    before, after = ifeval_scores(docs, IFEVAL_RESPONSES), ifeval_scores(docs, worse)
    for cell, metric in zip(cells[2:], ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict",
                                        "instruction_level_loose")):
        # The mean paired change is the difference of lm-eval's aggregate scores.
        assert float(cell.split()[0].rstrip(",")) == pytest.approx(100 * (after[metric] - before[metric]), abs=0.01)
    assert float(cells[4].split()[0].rstrip(",")) < 0  # emptied answers follow fewer instructions

    _write_ifeval_answers(tmp_path / "capped", docs, IFEVAL_RESPONSES, max_new_tokens=128)
    with pytest.raises(NemoDvpoError, match="same settings"):
        ifeval_paired_lines([tmp_path / "base", tmp_path / "capped"], ["base", "capped"])


# --- shipped evaluations ------------------------------------------------------------------------------------

SHIPPED = sorted(path.parent for path in (REPO_ROOT / "docs" / "evals").glob("**/provenance.json"))
COMPARED = ("prompt_level_strict", "prompt_level_loose", "instruction_level_strict", "instruction_level_loose",
            "n", "n_instructions", "ci95")


def test_shipped_answers_are_the_same_bytes_everywhere_and_rescore_to_their_scores(tmp_path):
    from nemo_dvpo.evaluation.benchmarks.assets import ifeval_prompts
    from nemo_dvpo.evaluation.benchmarks.ifeval import ifeval_scores
    from nemo_dvpo.evaluation.benchmarks.shipped import read_gzip_jsonl, rescore, ship

    docs = ifeval_prompts(len(IFEVAL_RESPONSES))
    evaluation = tmp_path / "evaluation"
    _write_ifeval_answers(evaluation, docs[::-1], IFEVAL_RESPONSES[::-1])  # written in another order
    scores = ifeval_scores(docs, IFEVAL_RESPONSES)
    (evaluation / "scores.json").write_text(json.dumps({"model": "m", "answers_from": "megatron:m",
                                                        "ifeval": {**scores, "questions": len(docs)}}))
    repository = {"commit": "0" * 40, "tracked_changes": False}
    first = ship(evaluation, tmp_path / "one", ["ifeval"], ["python", "tools/eval_benchmarks.py"], {"model": "m"},
                 repository)
    second = ship(evaluation, tmp_path / "two", ["ifeval"], ["python", "tools/eval_benchmarks.py"], {"model": "m"},
                  repository)
    assert (first / "ifeval.answers.jsonl.gz").read_bytes() == (second / "ifeval.answers.jsonl.gz").read_bytes()
    assert [record["id"] for record in read_gzip_jsonl(first / "ifeval.answers.jsonl.gz")] == sorted(
        (doc["key"] for doc in docs), key=str)  # by id as text, whatever order they were answered in
    provenance = json.loads((first / "provenance.json").read_text())
    assert provenance["commit"] == "0" * 40 and provenance["model"] == {"model": "m"}
    assert {key: provenance["scores"]["ifeval"][key] for key in COMPARED} == {key: scores[key] for key in COMPARED}
    assert rescore(first)["ifeval"] == scores

    # The check can fail: an answer changed after shipping scores differently.
    records = read_gzip_jsonl(first / "ifeval.answers.jsonl.gz")
    records[0]["answer"] = ""
    import gzip

    with gzip.open(first / "ifeval.answers.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(record) + "\n" for record in records))
    assert rescore(first)["ifeval"] != scores


def test_compare_reads_shipped_evaluations_as_the_folders_they_came_from(tmp_path):
    """--compare on shipped folders (all that survives the machine) writes the report the evaluations gave."""
    from nemo_dvpo.evaluation.benchmarks.assets import ifeval_prompts
    from nemo_dvpo.evaluation.benchmarks.ifeval import ifeval_scores
    from nemo_dvpo.evaluation.benchmarks.report import write_report
    from nemo_dvpo.evaluation.benchmarks.shipped import ship

    docs = ifeval_prompts(len(IFEVAL_RESPONSES))
    worse = ["", *IFEVAL_RESPONSES[1:-1], IFEVAL_RESPONSES[0]]  # two answers changed
    evaluations, shipped = [], []
    for name, responses in (("start", IFEVAL_RESPONSES), ("policy", worse)):
        evaluation = tmp_path / "runs" / name
        _write_ifeval_answers(evaluation, docs, responses)
        (evaluation / "scores.json").write_text(json.dumps({"model": name, "answers_from": f"megatron:{name}",
                                                            "ifeval": ifeval_scores(docs, responses)}))
        evaluations.append(evaluation)
        shipped.append(ship(evaluation, tmp_path / "shipped" / name, ["ifeval"], ["python"], {"model": name},
                            {"commit": "0" * 40, "tracked_changes": False}))
    from_runs = write_report(evaluations, tmp_path / "report_runs").read_text()
    from_shipped = write_report(shipped, tmp_path / "report_shipped").read_text()
    assert "change against start" in from_runs
    assert f"| policy | {len(docs)} | +16.67 [-16.00, +49.33], 1 / 0" in from_runs
    assert from_shipped == from_runs.replace(str(tmp_path / "runs"), str(tmp_path / "shipped"))
    # IFEval alone: no MT-Bench chart (an empty one would say nothing), and none left from an earlier report.
    assert (tmp_path / "report_runs" / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "`mt_bench_categories.png`" not in from_runs
    assert not (tmp_path / "report_runs" / "mt_bench_categories.png").exists()
    (tmp_path / "report_runs" / "mt_bench_categories.png").write_bytes(b"from an earlier report")
    write_report(evaluations, tmp_path / "report_runs")
    assert not (tmp_path / "report_runs" / "mt_bench_categories.png").exists()


def test_the_model_identity_is_a_hash_of_the_weights_it_names(tmp_path):

    from nemo_dvpo.evaluation.benchmarks.shipped import model_identity

    checkpoint = tmp_path / "checkpoint"
    (checkpoint / "weights").mkdir(parents=True)
    (checkpoint / "nemo_dvpo_checkpoint.json").write_text(json.dumps({"kind": "policy"}))
    (checkpoint / "weights" / "shard.distcp").write_bytes(b"weights")
    identity = model_identity(str(checkpoint))
    assert identity["kind"] == "policy" and len(identity["weights_sha256"]) == 64
    (checkpoint / "weights" / "shard.distcp").write_bytes(b"other weights")
    assert model_identity(str(checkpoint))["weights_sha256"] != identity["weights_sha256"]
    assert model_identity("tiny") == {"model": "tiny", "source": None, "weights_sha256": None}  # random weights


@pytest.mark.parametrize("shipped", SHIPPED, ids=[str(path.relative_to(REPO_ROOT)) for path in SHIPPED])
def test_every_shipped_evaluation_rescores_to_the_numbers_it_reports(shipped):
    """docs/evals/*/: the answers behind the docs' IFEval figures, scored again with lm-eval's checkers."""
    from nemo_dvpo.evaluation.benchmarks.shipped import rescore

    reported = json.loads((shipped / "provenance.json").read_text())["scores"]["ifeval"]
    rescored = rescore(shipped)["ifeval"]
    assert {key: rescored[key] for key in COMPARED} == {key: reported[key] for key in COMPARED}
    assert reported["n"] == reported["questions"] == 541


# --- AlpacaEval ---------------------------------------------------------------------------------------------


def _alpaca_fixture(count: int = 40):
    """Annotations where the model wins mostly when its output is longer (a length-biased judge)."""
    import random

    rng = random.Random(7)
    annotations = []
    for index in range(count):
        baseline, model = "b" * rng.randint(100, 900), "m" * rng.randint(50, 1500)
        wins = rng.random() < (0.8 if len(model) > len(baseline) else 0.25)
        annotations.append({"index": index, "output_1": baseline, "output_2": model,
                            "preference": 2.0 if wins else 1.0})
    return annotations


def test_length_controlled_win_rate_is_alpaca_evals_glm():
    import numpy as np
    import pandas as pd

    from alpaca_eval.metrics import glm_winrate as glm

    from nemo_dvpo.evaluation.benchmarks.alpaca import alpaca_eval_scores

    annotations = _alpaca_fixture()
    scores = alpaca_eval_scores(annotations, "policy", "judge")
    wins = sum(annotation["preference"] == 2.0 for annotation in annotations)
    assert scores["win_rate"] == pytest.approx(100 * wins / 40) and scores["n_wins"] == wins  # hand count

    # alpaca_eval's GLM fit, called directly on features built by hand from the fixture (tests/test_eval_references.py
    # compares against alpaca_eval's whole get_length_controlled_winrate).
    frame = pd.DataFrame(annotations)
    delta = frame["output_1"].str.len() - frame["output_2"].str.len()
    features = pd.DataFrame({"preference": frame["preference"] - 1, "std_delta_len": delta / delta.std(),
                             "not_gamed_baseline": True})
    test = pd.DataFrame({"std_delta_len": 0.0, "not_gamed_baseline": [True] * len(frame)})
    formula = glm.GLM_INFO["length_controlled_minimal"]["formula"]
    train, test_matrix = glm.make_dmatrix_for_model(features, test, formula=formula)
    model = glm.fit_LogisticRegressionCV(train, "preference", is_ytrue_proba=True, n_splits=5)
    expected = 100 * np.mean(model.predict_proba(test_matrix)[:, 1])
    assert scores["length_controlled_winrate"] == pytest.approx(expected, rel=1e-12)
    # Wins that come from longer outputs are discounted.
    assert scores["length_controlled_winrate"] < scores["win_rate"] - 5

    few = alpaca_eval_scores(annotations[:3], "policy", "judge")
    assert few["length_controlled_winrate"] is None and "at least 5" in few["length_controlled_note"]


def test_alpaca_eval_preferences_follow_the_randomised_order():
    from nemo_dvpo.evaluation.benchmarks.alpaca import AlpacaEval

    benchmark = AlpacaEval(seed=3)
    items = benchmark.items(6)
    answers = {str(item["id"]): {"answer": "x" * (10 + item["id"])} for item in items}
    tasks = benchmark.judge_tasks(items, answers)
    assert {task["model_identifier"] for task in tasks} == {"m", "M"}  # both orders occur
    for task, item in zip(tasks, items):
        prompt = task["messages"][1]["content"]
        model_first = prompt.index(answers[str(item["id"])]["answer"]) < prompt.index(item["output"][:50])
        assert model_first == (task["model_identifier"] == "m")
    judge = SimpleNamespace(describe=lambda: {"model": "judge"},
                            judge=lambda messages, parse, max_tokens: {"judgment": "M", "parsed": "M", "requests": 1})
    records = {str(task["id"]): benchmark.judge(judge, task) for task in tasks}
    # The judge always picks the second output: the model wins exactly where it was placed second.
    assert [records[str(t["id"])]["preference"] for t in tasks] == [2.0 if t["model_identifier"] == "M" else 1.0
                                                                    for t in tasks]


# --- end to end -------------------------------------------------------------------------------------------


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_end_to_end_with_the_policy_server_as_judge_then_a_report(tiny_server, tmp_path):
    from nemo_dvpo.evaluation.benchmarks import assets

    out = tmp_path / "eval"
    completed = _run_tool("--model", "tiny", "--limit", "2", "--max-new-tokens", "6", "--output-dir", str(out),
                          "--judge-base-url", tiny_server.url, "--judge-model", "tiny", "--judge-max-tokens", "6",
                          "--judge-parse-retries", "1", "--name", "tiny-policy")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    assert "judging: 4 requests" in completed.stdout  # MT-Bench's plan, printed before judging

    expected_ids = {"ifeval": [p["key"] for p in assets.ifeval_prompts(2)],
                    "mt_bench": [q["question_id"] for q in assets.mt_bench_questions(2)],
                    "arena_hard": [q["uid"] for q in assets.arena_hard_questions(2)], "alpaca_eval": [0, 1]}
    for name, ids in expected_ids.items():
        answers = _records(out / name / "answers.jsonl")
        assert [record["id"] for record in answers] == ids
        for record in answers:
            assert record["generation"]["source"] == "megatron:tiny-policy"
            assert record["generation"]["max_new_tokens"] == 6
    mt_answers = _records(out / "mt_bench" / "answers.jsonl")
    assert all(len(record["answers"]) == 2 and record["turns"] for record in mt_answers)
    assert mt_answers[0]["generation"]["temperature"] == 0.7  # writing: FastChat's temperature

    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["ifeval"]) >= {"prompt_level_strict", "prompt_level_loose", "instruction_level_strict",
                                     "instruction_level_loose", "n"}
    # The tiny model's judgments are noise: unparseable ones are re-asked once, then counted.
    judgments = _records(out / "mt_bench" / "judgments.jsonl")
    assert sorted(record["id"] for record in judgments) == ["81:turn1", "81:turn2", "82:turn1", "82:turn2"]
    for record in judgments:
        assert record["judge"]["model"] == "tiny"
        assert record["requests"] == (1 if record["score"] is not None else 2)
    mt = scores["mt_bench"]
    assert mt["n_rated"] + mt["n_unparseable"] == 4 and mt["n_failed"] == 0 and mt["judge"]["model"] == "tiny"
    arena = _records(out / "arena_hard" / "judgments.jsonl")
    assert len(arena) == 2 and all(len(record["games"]) == 2 for record in arena)
    assert [g["game"] for g in arena[0]["games"]] == ["baseline_is_A", "model_is_A"]
    assert scores["arena_hard"]["n_questions"] + scores["arena_hard"]["n_unparseable"] == 2
    assert len(_records(out / "alpaca_eval" / "judgments.jsonl")) == 2
    assert scores["alpaca_eval"]["n_unparseable"] + scores["alpaca_eval"].get("n_total", 0) == 2

    report_dir = tmp_path / "report"
    completed = _run_tool("--compare", str(out), str(out), "--output-dir", str(report_dir))
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = (report_dir / "report.md").read_text()
    assert "IFEval prompt level strict (%)" in report and "tiny-policy" in report
    assert (report_dir / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The tiny judge may rate no turn; the category chart is drawn exactly when the report has categories.
    categories_chart = report_dir / "mt_bench_categories.png"
    if "## MT-Bench by category" in report:
        assert categories_chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not categories_chart.exists()


@pytest.mark.slow
def test_a_killed_evaluation_resumes_without_redoing_work(tmp_path):
    out = tmp_path / "eval"
    answers = out / "ifeval" / "answers.jsonl"
    command = [*TOOL, "--model", "tiny", "--benchmarks", "ifeval", "--limit", "4", "--batch-size", "1",
               "--max-new-tokens", "24", "--output-dir", str(out)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (answers.exists() and answers.read_text().count("\n") >= 1):
        assert process.poll() is None, "the evaluation ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    kept = [line for line in answers.read_text().splitlines(keepends=True) if line.endswith("\n")]
    assert 1 <= len(kept) < 4, "the run finished before the kill: nothing was tested"
    with open(answers, "a") as handle:  # what a write cut by the kill leaves
        handle.write('{"id": 1003, "prompt": "Wri')

    completed = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"{len(kept)} of 4 already in" in completed.stdout
    lines = answers.read_text().splitlines(keepends=True)
    assert lines[:len(kept)] == kept  # finished answers are neither redone nor rewritten
    from nemo_dvpo.evaluation.benchmarks.assets import ifeval_prompts

    assert sorted(json.loads(line)["id"] for line in lines) == sorted(p["key"] for p in ifeval_prompts(4))
    assert json.loads((out / "scores.json").read_text())["ifeval"]["n"] == 4

    # The same command with --ship-to answers nothing again and ships what it scored, re-scorable.
    from nemo_dvpo.evaluation.benchmarks.shipped import rescore

    shipped = tmp_path / "shipped"
    completed = subprocess.run([*command, "--ship-to", str(shipped)], cwd=REPO_ROOT, env=_env(), capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0 and "4 of 4 already in" in completed.stdout, completed.stderr[-3000:]
    provenance = json.loads((shipped / "provenance.json").read_text())
    assert provenance["command"] == ["python", "tools/eval_benchmarks.py", *command[2:], "--ship-to", str(shipped)]
    assert len(provenance["commit"]) == 40 and provenance["model"]["model"] == "tiny"
    assert provenance["scores"]["ifeval"] == json.loads((out / "scores.json").read_text())["ifeval"]
    assert rescore(shipped)["ifeval"] == {key: value for key, value in provenance["scores"]["ifeval"].items()
                                          if key != "questions"}


def test_judgments_already_written_are_not_asked_again(tmp_path):
    from nemo_dvpo.evaluation.benchmarks.judge import JudgeClient, JudgeConfig
    from nemo_dvpo.evaluation.benchmarks.mt_bench import MTBench
    from nemo_dvpo.evaluation.benchmarks.runner import collect_judgments
    from nemo_dvpo.evaluation.benchmarks.store import RecordFile

    benchmark = MTBench()
    items = benchmark.items(3)
    folder = tmp_path / "mt_bench"
    RecordFile(folder / "answers.jsonl", "answers").append(
        [{"id": item["id"], "category": item["category"], "turns": item["turns"], "answers": ["a", "b"]}
         for item in items])
    fake = _FakeChat(["Rating: [[6]]"] * 6)
    judge = JudgeClient(JudgeConfig(base_url="http://judge/v1", model="judge", concurrency=2), client=fake)
    assert collect_judgments(benchmark, items, folder, judge) == 0 and fake.calls == 6
    with open(folder / "judgments.jsonl", "a") as handle:
        handle.write('{"id": "81:tu')  # a cut last line
    assert collect_judgments(benchmark, items, folder, judge) == 0 and fake.calls == 6
    scores = benchmark.score(items, RecordFile(folder / "answers.jsonl", "a").load(),
                             RecordFile(folder / "judgments.jsonl", "j").load())
    assert scores["score"] == 6.0 and scores["n_rated"] == 6 and set(scores["categories"]) == {"writing"}
    # Reference answers go into the math prompts.
    math_item = [item for item in benchmark.items(None) if item["category"] == "math"][0]
    tasks = benchmark.judge_tasks([math_item], {str(math_item["id"]): {"answers": ["a", "b"]}})
    assert [task["judge_prompt"] for task in tasks] == ["single-math-v1", "single-math-v1-multi-turn"]
    from nemo_dvpo.evaluation.benchmarks.assets import mt_bench_reference_answers

    reference = mt_bench_reference_answers()[math_item["id"]]
    assert reference[0] in tasks[0]["messages"][1]["content"]
    assert reference[0] in tasks[1]["messages"][1]["content"] and reference[1] in tasks[1]["messages"][1]["content"]


# --- the policy server ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_openai_client_works_against_the_policy_server(tiny_server):
    import openai

    client = openai.OpenAI(base_url=tiny_server.url, api_key="unused")
    assert [model.id for model in client.models.list()] == ["tiny"]
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=7)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 7
    streamed = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=7, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == reply.choices[0].message.content
    several = client.completions.create(model="tiny", prompt=["Once upon", "The end"], max_tokens=4, n=2,
                                        temperature=0.8, seed=1)
    assert [choice.index for choice in several.choices] == [0, 1, 2, 3]
    stopped = client.completions.create(model="tiny", prompt="Once upon", max_tokens=12, temperature=0,
                                        stop=[several.choices[0].text[:1] or " "])
    assert stopped.choices[0].finish_reason == "stop"
    for kwargs, status, message in [({"model": "other"}, 404, "does not exist"),
                                    ({"logprobs": True}, 400, "'logprobs' is not supported"),
                                    ({"temperature": 3}, 400, "'temperature' must be in [0.0, 2.0]")]:
        with pytest.raises(openai.APIStatusError) as raised:
            client.chat.completions.create(**{"model": "tiny", "messages": messages, **kwargs})
        assert raised.value.status_code == status and message in str(raised.value)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 8192"):
        client.completions.create(model="tiny", prompt="word " * 9000, max_tokens=4)


@pytest.mark.slow
def test_served_greedy_answer_equals_transformers_greedy_generation(smollm2_hf_folder):
    import openai
    import torch

    from nemo_dvpo.inference.chat import apply_chat_template
    from nemo_dvpo.models.sources import load_hf_model, load_tokenizer

    server = PolicyServer("policy=smollm2_135m", "served_model_name=smollm2").wait_ready()
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused")
        prompts = ["What is 2+2?", "Name three colours of the rainbow."]
        replies = {}

        def ask(prompt):  # concurrently: the two requests may share a batch
            replies[prompt] = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=12)

        threads = [threading.Thread(target=ask, args=(prompt,)) for prompt in prompts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        assert server.stop() == 0, server.output()
    tokenizer = load_tokenizer(SMOLLM2_SOURCE)
    hf_model = load_hf_model(SMOLLM2_SOURCE)
    for prompt in prompts:
        ids = torch.tensor([apply_chat_template(tokenizer, prompt)])
        with torch.no_grad():
            output = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[0, ids.shape[1]:].tolist()
        assert replies[prompt].choices[0].message.content == tokenizer.decode(new_tokens, skip_special_tokens=True)
        assert replies[prompt].usage.completion_tokens == len(new_tokens)


@pytest.mark.slow
def test_answers_from_an_openai_compatible_server(tiny_server, tmp_path):
    out = tmp_path / "served"
    completed = _run_tool("--answers-from", tiny_server.url, "--benchmarks", "ifeval", "--limit", "2",
                          "--max-new-tokens", "5", "--output-dir", str(out))
    assert completed.returncode == 0, completed.stderr[-3000:]
    answers = _records(out / "ifeval" / "answers.jsonl")
    assert len(answers) == 2
    for record in answers:
        assert record["generation"]["source"] == f"http:{tiny_server.url} model=tiny"
        assert record["generation"]["finish_reason"] == "length" and record["generation"]["completion_tokens"] == 5
        assert record["answer"]
    assert json.loads((out / "scores.json").read_text())["ifeval"]["n"] == 2


def test_the_vllm_engine_is_refused_where_it_cannot_answer(tmp_path, capsys):
    """--engine vllm draws --model's answers in one process: with another answer source, or with a Megatron
    layout it would not use, the tool stops at its arguments; a preset without a Hugging Face config (random
    weights) has nothing to start the engine on, and is named."""
    from nemo_dvpo.inference.policy import Policy, use_vllm_engine
    from nemo_dvpo.inference.vllm_engine import VllmEngineConfig
    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.utils.errors import ConfigError
    from tests.conftest import load_script

    tool = load_script("tools/eval_benchmarks.py")
    out = str(tmp_path / "out")
    for arguments, message in [
            (["--answers-from", "http://127.0.0.1:1/v1", "--engine", "vllm"],
             "--engine vllm draws the answers of --model"),
            (["--model", "tiny", "--engine", "vllm", "--tensor-parallel", "2"], "leave --tensor-parallel"),
            (["--model", "tiny", "--engine", "vllm", "--vllm-tensor-parallel", "0"],
             "--vllm-tensor-parallel must be >= 1")]:
        with pytest.raises(SystemExit):
            tool.parse_args([*arguments, "--output-dir", out])
        assert message in capsys.readouterr().err
    random_preset = Policy(model=None, model_cfg=load_model_config("tiny"), tokenizer=None, name="tiny",
                           eos_token_ids=[2], max_length=64)
    with pytest.raises(ConfigError, match="'tiny' has no Hugging Face config to start a vLLM engine on"):
        use_vllm_engine(random_preset, "tiny", VllmEngineConfig())
