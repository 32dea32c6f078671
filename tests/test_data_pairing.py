"""The one pairing rule (nemo_dvpo.data.pairing): the pairs the builder makes keep it, the shipped pairs are exactly
what it makes, and every reader of a pairs file - the GVM, reward-model and DPO recipes' training and evaluation
files - refuses the first pair that breaks it with its file and line."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from nemo_dvpo.data.pairing import PairingViolation, PairLedger, check_pair, make_pairs
from nemo_dvpo.data.preference import PreferenceDataConfig, load_preference_data, read_preference_records
from nemo_dvpo.utils.errors import NemoDvpoError
from tests.conftest import REPO_ROOT, entry_point_env

SHIPPED = REPO_ROOT / "data" / "smollm2_ifeval"
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "ultrafeedback_binarized_mini.jsonl"


def samples(scores, texts=None) -> list[dict]:
    """One prompt's scored samples as the builder's scored files hold them."""
    texts = texts or [f"r{i}" for i in range(len(scores))]
    return [{"prompt_id": "p1", "prompt": "P", "response": text, "score": score, "sample": i,
             "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "split": "train"}
            for i, (score, text) in enumerate(zip(scores, texts))]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ------------------------------------------------------------------------------------------------ the rule

def test_a_pair_needs_two_different_responses_and_the_higher_score_chosen():
    check_pair("a", "b")  # no scores: only the responses are compared
    check_pair("a", "b", {"chosen_score": 1.0, "rejected_score": 0.5})
    check_pair("a", "b", {"score_chosen": 9, "score_rejected": 1.5})  # UltraFeedback's field names
    cases = [
        (("a ", " a", {}), "identical_responses", "rejected"),
        (("a", "b", {"chosen_score": 0.5, "rejected_score": 0.5}), "score_order", "chosen_score"),
        (("a", "b", {"chosen_score": 0.0, "rejected_score": 1.0}), "score_order", "chosen_score"),
        (("a", "b", {"score_chosen": 3.0, "score_rejected": 7.0}), "score_order", "score_chosen"),
        (("a", "b", {"chosen_score": float("nan"), "rejected_score": 0.0}), "bad_score", "chosen_score"),
        (("a", "b", {"chosen_score": 1.0, "rejected_score": True}), "bad_score", "rejected_score"),
    ]
    for (chosen, rejected, fields), reason, field_name in cases:
        with pytest.raises(PairingViolation) as error:
            check_pair(chosen, rejected, fields)
        assert (error.value.reason, error.value.field_name) == (reason, field_name)


def test_no_response_is_in_two_pairs_of_one_prompt():
    ledger = PairLedger()
    ledger.add("q1", "good", "bad", where="line 1")
    ledger.add("q2", "good", "bad", where="line 2")  # another prompt: its own responses
    for chosen, rejected, side, earlier in (("good", "worse", "chosen", "'chosen'"),
                                            ("better", " bad ", "rejected", "'rejected'"),
                                            ("bad", "worst", "chosen", "'rejected'")):
        violation = ledger.conflict("q1", chosen, rejected)
        assert violation.reason == "response_reused" and violation.field_name == side
        assert f"already the {earlier} response of a pair of the same prompt (line 1)" in violation.detail
        with pytest.raises(PairingViolation):
            ledger.add("q1", chosen, rejected, where="line 3")
    ledger.add("q1", "better", "worse", where="line 4")  # the refused pairs recorded nothing


# ------------------------------------------------------------------------------------------------ building

def test_pairs_match_best_with_worst_under_the_rule():
    pairs = make_pairs(samples([0.5, 1.0, 0.5, 0.0]))
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("r1", "r3")]  # r0 vs r2: equal scores
    pairs = make_pairs(samples([0.0, 1.0, 0.5, 0.0]))
    assert [(p["chosen"], p["rejected"], p["chosen_score"], p["rejected_score"]) for p in pairs] == \
        [("r1", "r3", 1.0, 0.0), ("r2", "r0", 0.5, 0.0)]
    assert make_pairs(samples([1.0, 1.0, 1.0, 1.0])) == []
    # Two samples can be the same text (a short answer drawn twice): it joins one pair only.
    pairs = make_pairs(samples([1.0, 1.0, 0.0, 0.0], texts=["Yes.", "Yes.", "No.", "Maybe."]))
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("Yes.", "Maybe.")]


def test_built_pairs_always_keep_the_rule_the_reader_checks(tmp_path):
    """Random score patterns (ties, repeated texts, odd sample counts): every built pair set reads back cleanly,
    and against a direct statement of the build order - the i-th best with the i-th worst - nothing is lost."""
    rng = random.Random(0)
    rows = []
    for prompt in range(300):
        count = rng.randint(2, 7)
        scores = [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(count)]
        texts = [rng.choice(["A", "B", "C", "D", "E", "F", "G"]) for _ in range(count)]
        # The builder's scores are a function of the text; keep that so a repeated text repeats its score.
        score_of = {}
        scores = [score_of.setdefault(text, score) for text, score in zip(texts, scores)]
        built = make_pairs([dict(s, prompt_id=f"p{prompt}", prompt=f"Prompt {prompt}")
                            for s in samples(scores, texts)])
        ranked = sorted(range(count), key=lambda i: (-scores[i], i))
        candidates = list(zip(ranked[:count // 2], reversed(ranked[count - count // 2:])))
        used, expected = set(), []
        for best, worst in candidates:
            if scores[best] > scores[worst] and texts[best] not in used and texts[worst] not in used:
                used |= {texts[best], texts[worst]}
                expected.append((best, worst))
        assert [(p["chosen_sample"], p["rejected_sample"]) for p in built] == expected
        rows += built
    records, stats = read_preference_records(str(write_jsonl(tmp_path / "built.jsonl", rows)), PreferenceDataConfig())
    assert len(records) == len(rows) > 300 and stats.records_invalid == {}


def _shipped(name: str) -> list[dict]:
    return [json.loads(line) for line in (SHIPPED / name).read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_the_shipped_pairs_are_what_the_rule_builds_from_the_shipped_scores(split):
    """Byte for byte: pairs_<split>.jsonl is make_pairs over scored_<split>.jsonl, prompts in pool order."""
    by_prompt = defaultdict(list)
    for record in _shipped(f"scored_{split}.jsonl"):
        by_prompt[record["prompt_id"]].append(record)
    pairs = [pair for record in _shipped("prompts.jsonl") if record["prompt_id"] in by_prompt
             for pair in make_pairs(by_prompt[record["prompt_id"]])]
    assert "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs) == \
        (SHIPPED / f"pairs_{split}.jsonl").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------ reading

@pytest.mark.parametrize("path", [SHIPPED / "pairs_train.jsonl", SHIPPED / "pairs_heldout.jsonl", FIXTURE],
                         ids=["shipped train", "shipped held-out", "ultrafeedback fixture"])
def test_the_shipped_pairs_files_pass_the_start_up_check(path):
    records, stats = read_preference_records(str(path), PreferenceDataConfig())
    assert len(records) == stats.records_read == len(path.read_text().splitlines()) and not stats.records_invalid


def _pair(prompt: str, chosen: str, rejected: str, **scores) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **scores}


BROKEN = {
    # name -> (the offending record on line 3, the message after "line 3 (row 2): ")
    "scores in the wrong order": (_pair("Q2?", "x", "y", chosen_score=0.0, rejected_score=1.0),
                                  "field 'chosen_score': 0.0 is not above rejected_score=1.0"),
    "equal scores": (_pair("Q2?", "x", "y", chosen_score=0.5, rejected_score=0.5),
                     "field 'chosen_score': 0.5 is not above rejected_score=0.5"),
    "a response reused": (_pair("Q1?", "c", "a"), "field 'rejected': this response is already the 'chosen' response "
                                                   "of a pair of the same prompt ({path}:line 1 (row 0))"),
    "identical responses": (_pair("Q2?", "x", "x "), "field 'rejected': equals 'chosen'"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_the_first_violation_stops_the_load_with_file_and_line(tmp_path, name):
    bad, message = BROKEN[name]
    rows = [_pair("Q1?", "a", "b", chosen_score=1.0, rejected_score=0.0), _pair("Q3?", "a", "b"), bad,
            _pair("Q1?", "a", "z")]  # line 4 breaks the rule too: only the first violation is named
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(NemoDvpoError) as error:
        read_preference_records(str(path), PreferenceDataConfig())
    assert str(error.value).startswith(f"{path}:line 3 (row 2): " + message.format(path=path)), str(error.value)


def test_skip_invalid_drops_and_counts_the_pairs_that_break_the_rule(tmp_path):
    rows = [_pair("Q1?", "a", "b"), _pair("Q1?", "b", "c"), _pair("Q2?", "a", "b", chosen_score=0, rejected_score=1),
            _pair("Q2?", "a", "b"), _pair("Q1?", "c", "d")]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    records, stats = read_preference_records(str(path), PreferenceDataConfig(skip_invalid=True))
    # Row 1 reuses "b" and row 2 has its scores the wrong way round; a refused row claims no response, so row 3
    # may pair Q2's "a" and "b" and row 4 may use Q1's "c".
    assert [r.index for r in records] == [0, 3, 4]
    assert stats.records_invalid == {"response_reused": 1, "score_order": 1}


def test_the_recipes_load_checks_before_any_token(tmp_path):
    """The GVM, reward-model and DPO recipes load their training and their evaluation file with
    load_preference_data: the rule is checked while reading, so no tokenizer is even reached (None here)."""
    path = write_jsonl(tmp_path / "eval.jsonl", [_pair("Q?", "a", "b"), _pair("Q?", "a", "c")])
    with pytest.raises(NemoDvpoError, match=re.escape(f"{path}:line 2 (row 1): field 'chosen': this response is "
                                                      "already the 'chosen' response")):
        load_preference_data(str(path), PreferenceDataConfig(), tokenizer=None)


@pytest.mark.slow
def test_a_gvm_run_with_a_broken_evaluation_file_fails_at_start_up_in_one_line(tmp_path):
    """The entry point: a valid training file and an evaluation file that breaks the rule on line 2."""
    bad = write_jsonl(tmp_path / "heldout.jsonl", [_pair("Q?", "a", "b", chosen_score=1, rejected_score=0),
                                                   _pair("Q?", "c", "d", chosen_score=0, rejected_score=1)])
    command = [sys.executable, "examples/train_gvm.py", "model=tiny", f"run_dir={tmp_path / 'run'}",
               f"data.train={FIXTURE}", f"data.eval={bad}", "train.steps=1"]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=entry_point_env(), capture_output=True, text=True,
                               timeout=600)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert f"error: {bad}:line 2 (row 1): field 'chosen_score': 0 is not above rejected_score=1" in output
