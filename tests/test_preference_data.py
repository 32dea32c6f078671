"""The GVM's preference-data pipeline: reading, validation, tokenization, splits, ordering, batching,
and tools/prepare_ultrafeedback.py.

``tests/fixtures/ultrafeedback_binarized_mini.jsonl`` holds 40 records in the
``HuggingFaceH4/ultrafeedback_binarized`` layout (prompt, prompt_id, chosen/rejected conversations,
messages, score_chosen, score_rejected) with 38 distinct prompts: two prompts appear twice, so
splitting by prompt is observable.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from nemo_dvpo.data.preference import (
    PreferenceDataConfig,
    collate_value_batch,
    load_preference_data,
    load_preference_splits,
    read_preference_records,
    split_by_prompt,
    tokenize_preference_records,
)
from nemo_dvpo.data.prompts import read_prompts
from nemo_dvpo.utils.config import from_dict
from nemo_dvpo.utils.errors import ConfigError, NemoDvpoError

from .conftest import REPO_ROOT

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "ultrafeedback_binarized_mini.jsonl"
# SmolLM2's chat template, written out: an independent check of what apply_chat_template produces.
SMOLLM2_PROMPT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                  "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def tokenizer(smollm2_hf_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_hf_folder)


def fixture_rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines()]


def write_jsonl(path: Path, rows: list, blank_line_after: int | None = None) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    if blank_line_after is not None:
        lines.insert(blank_line_after + 1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def records_of(path, **config) -> list[tuple]:
    records, _ = read_preference_records(str(path), PreferenceDataConfig(**config))
    return [(r.prompt, r.responses, r.labels) for r in records]


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------

def _write_source(kind: str, tmp_path: Path) -> tuple[Path, dict]:
    rows = fixture_rows()
    if kind == "json":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(rows))
        return path, {}
    if kind == "jsonl_named_json":
        return write_jsonl(tmp_path / "data.json", rows), {}
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path, {}
    if kind == "hub_snapshot_folder":
        import pyarrow as pa
        import pyarrow.parquet as pq

        (tmp_path / "snapshot" / "data").mkdir(parents=True)
        (tmp_path / "snapshot" / "README.md").write_text("---\nlicense: mit\n---\n")
        (tmp_path / "snapshot" / "dataset_infos.json").write_text("{}")  # metadata, not data
        pq.write_table(pa.Table.from_pylist(rows[:25]), tmp_path / "snapshot/data/train_prefs-00000-of-00002.parquet")
        pq.write_table(pa.Table.from_pylist(rows[25:]), tmp_path / "snapshot/data/train_prefs-00001-of-00002.parquet")
        pq.write_table(pa.Table.from_pylist(rows[:3]), tmp_path / "snapshot/data/test_prefs-00000-of-00001.parquet")
        return tmp_path / "snapshot", {"split": "train_prefs"}
    import datasets

    if kind == "saved_dataset":
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
        return tmp_path / "saved", {}
    if kind == "saved_dataset_dict":
        datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows),
                              "test_prefs": datasets.Dataset.from_list(rows[:3])}).save_to_disk(str(tmp_path / "dd"))
        return tmp_path / "dd", {"split": "train_prefs"}
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["json", "jsonl_named_json", "parquet", "hub_snapshot_folder", "saved_dataset",
                                  "saved_dataset_dict"])
def test_every_input_format_reads_the_same_records(tmp_path, kind):
    path, options = _write_source(kind, tmp_path)
    expected = records_of(FIXTURE)
    assert len(expected) == 40
    assert records_of(path, **options) == expected


def test_a_source_with_several_splits_needs_one(tmp_path):
    for kind in ("saved_dataset_dict", "hub_snapshot_folder"):
        path, _ = _write_source(kind, tmp_path / kind)
        with pytest.raises(NemoDvpoError, match=r"several splits \(test_prefs, train_prefs\); set split to one"):
            read_preference_records(str(path), PreferenceDataConfig())
        with pytest.raises(NemoDvpoError, match="no split 'validation'|no data files for split 'validation'"):
            read_preference_records(str(path), PreferenceDataConfig(split="validation"))
        # The split argument overrides the config's: train and eval from one source, one config.
        records, _ = read_preference_records(str(path), PreferenceDataConfig(split="validation"), split="test_prefs")
        assert len(records) == 3


def test_missing_paths_and_unreachable_hub_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(NemoDvpoError, match="data path .*missing.jsonl' does not exist"):
        read_preference_records(str(tmp_path / "missing.jsonl"), PreferenceDataConfig())
    with pytest.raises(NemoDvpoError, match="cannot tell the data format"):
        read_preference_records(str(write_jsonl(tmp_path / "data.txt", ["{}"])), PreferenceDataConfig())
    # No hub here: force datasets' offline mode so the failure is immediate instead of 5 retries.
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(NemoDvpoError, match="could not load 'someone/preferences' from the Hugging Face hub"
                                            ".*pass a local copy"):
        read_preference_records("someone/preferences", PreferenceDataConfig(split="train"))


def test_ultrafeedback_binarized_layout(tmp_path):
    row = fixture_rows()[0]
    records, stats = read_preference_records(str(FIXTURE), PreferenceDataConfig())
    first = records[0]
    assert first.prompt == [{"role": "user", "content": row["prompt"]}]
    assert first.responses == (row["chosen"][-1]["content"], row["rejected"][-1]["content"])
    assert first.labels == (1.0, -1.0) and first.is_pair and first.index == 0
    assert stats.records_read == 40 and stats.records_skipped_invalid == 0
    # The same pairs as plain strings, and as a system + user conversation without a prompt column.
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    write_jsonl(tmp_path / "mixed.jsonl", [
        pair(row["prompt"], row["chosen"][-1]["content"], row["rejected"][-1]["content"]),
        {"chosen": conversation + [{"role": "assistant", "content": "Hello."}],
         "rejected": conversation + [{"role": "assistant", "content": "Go away."}], "extra": [1, 2]},
    ])
    plain, with_system = records_of(tmp_path / "mixed.jsonl")
    assert plain == (first.prompt, first.responses, first.labels)
    assert with_system == (conversation, ("Hello.", "Go away."), (1.0, -1.0))


def test_scored_schema_and_schema_detection(tmp_path):
    write_jsonl(tmp_path / "scored.jsonl", [
        {"prompt": "2+2?", "response": "4", "score": 3.5, "model": "x"},
        {"prompt": "Name a colour.", "response": [{"role": "user", "content": "Name a colour."},
                                                  {"role": "assistant", "content": "Blue."}], "score": -1},
    ])
    first, second = records_of(tmp_path / "scored.jsonl")
    assert first == ([{"role": "user", "content": "2+2?"}], ("4",), (3.5,))
    assert second == ([{"role": "user", "content": "Name a colour."}], ("Blue.",), (-1.0,))
    with pytest.raises(NemoDvpoError, match=r"scored.jsonl:line 1 \(row 0\): field 'chosen': missing"):
        read_preference_records(str(tmp_path / "scored.jsonl"), PreferenceDataConfig(schema="pairwise"))
    write_jsonl(tmp_path / "unknown.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(NemoDvpoError, match=r"cannot tell the schema .*\['answer', 'question'\].*set data.schema"):
        read_preference_records(str(tmp_path / "unknown.jsonl"), PreferenceDataConfig())


# ---------------------------------------------------------------------------------------------------
# Validation errors and skip_invalid
# ---------------------------------------------------------------------------------------------------

GOOD = pair("What is 1 + 1?", "2", "3")


def good(number: int) -> dict:
    """A valid pair of its own prompt (records of one prompt may not share a response: the pairing rule)."""
    return pair(f"Question {number}: what is 1 + 1?", "2", "3")

BAD_RECORDS = {
    "not_messages": (dict(GOOD, chosen=3), "field 'chosen': expected a string or a list of {role, content} messages, "
                                           "got 3"),
    "bad_message": (dict(GOOD, chosen=[{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant"}]),
                    "field 'chosen[1]': expected a {role, content} message with string values"),
    "no_assistant_last": (dict(GOOD, chosen=[{"role": "user", "content": "What is 1 + 1?"}]),
                          "field 'chosen': the last message is the response and must have role 'assistant'"),
    "identical": (dict(GOOD, rejected="2 "), "field 'rejected': equals 'chosen'"),
    "empty_response": (dict(GOOD, chosen="  "), "field 'chosen': the response is empty"),
    "missing": ({"prompt": "q", "chosen": "a"}, "field 'rejected': missing"),
    "prompt_mismatch": (dict(GOOD, chosen=[{"role": "user", "content": "Another question"},
                                           {"role": "assistant", "content": "2"}]),
                        "field 'prompt': does not match the conversation in 'chosen'"),
    "conversations_differ": ({"chosen": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "x"}],
                              "rejected": [{"role": "user", "content": "B?"}, {"role": "assistant", "content": "y"}]},
                             "field 'rejected': the conversation before the response differs from the one in 'chosen'"),
    "not_json": ('{"prompt": "q", "chosen": ', "not valid JSON"),
    "not_an_object": ("[1, 2]", "expected a record with named fields, got [1, 2]"),
}


@pytest.mark.parametrize("name", list(BAD_RECORDS))
def test_bad_record_errors_name_file_line_row_and_field(tmp_path, name):
    bad, message = BAD_RECORDS[name]
    # Rows 0-2 are good, a blank line follows row 1, so the bad record (row 3) is on line 5.
    path = write_jsonl(tmp_path / "train.jsonl", [good(0), good(1), good(2), bad, good(4)], blank_line_after=1)
    with pytest.raises(NemoDvpoError) as error:
        read_preference_records(str(path), PreferenceDataConfig())
    assert str(error.value).startswith(f"{path}:line 5 (row 3): {message}"), str(error.value)


def test_bad_scores_and_parquet_rows_are_named(tmp_path):
    scored = {"prompt": "q", "response": "a", "score": 1.0}
    path = write_jsonl(tmp_path / "scored.jsonl", [scored, dict(scored, score=float("nan"))])
    with pytest.raises(NemoDvpoError, match=r"scored.jsonl:line 2 \(row 1\): field 'score': expected a finite number, "
                                            r"got nan"):
        read_preference_records(str(path), PreferenceDataConfig())
    path = write_jsonl(tmp_path / "scored2.jsonl", [dict(scored, score="high")])
    with pytest.raises(NemoDvpoError, match="field 'score': expected a finite number, got 'high'"):
        read_preference_records(str(path), PreferenceDataConfig())
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([good(0), good(1), dict(GOOD, chosen="")]), path)
    with pytest.raises(NemoDvpoError, match=re.escape(f"{path} (row 2): field 'chosen': the response is empty")):
        read_preference_records(str(path), PreferenceDataConfig())


def test_skip_invalid_counts_each_reason_and_reports_them(tmp_path, tokenizer, capsys):
    rows = [GOOD, dict(GOOD, chosen=3), '{"broken', dict(GOOD, rejected="2"), pair("Say hi.", "Hi!", "No."),
            pair("Stop here.", "Done<|im_end|> and more", "Fine."), dict(GOOD, chosen=""), pair("Q?", "A", "B")]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(NemoDvpoError, match=r"line 2 \(row 1\): field 'chosen'"):
        load_preference_data(str(path), PreferenceDataConfig(), tokenizer)
    data = load_preference_data(str(path), PreferenceDataConfig(skip_invalid=True), tokenizer)
    assert data.stats.records_read == 8
    # eos_in_response is found when tokenizing: the policy's response would have ended there.
    assert data.stats.records_invalid == {"wrong_type": 1, "invalid_json": 1, "identical_responses": 1,
                                          "empty_response": 1, "eos_in_response": 1}
    assert data.stats.records_kept == 3 and len(data) == 6
    assert sorted({s.record_index for s in data}) == [0, 4, 7]
    printed = capsys.readouterr().out
    assert "read 8 records, skipped 5 invalid (empty_response: 1, eos_in_response: 1, identical_responses: 1, " \
           "invalid_json: 1, wrong_type: 1); kept 3 records (6 sequences)" in printed


# ---------------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------------

def test_sequences_are_the_policys_prompt_then_response_then_eos(tmp_path, tokenizer):
    prompt, long_response = "Name a colour.", "Blue is a calm colour, often used for skies and seas."
    path = write_jsonl(tmp_path / "pairs.jsonl", [pair(prompt, long_response, "Red."),
                                                  {"prompt": prompt, "chosen": "Green.", "rejected": "Seven."}])
    data = load_preference_data(str(path), PreferenceDataConfig(), tokenizer)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected_prompt = tokenizer(SMOLLM2_PROMPT.format(prompt), add_special_tokens=False).input_ids
    for sample, response, label, is_chosen in zip(data, [long_response, "Red.", "Green.", "Seven."],
                                                  [1.0, -1.0, 1.0, -1.0], [True, False, True, False]):
        expected_response = tokenizer(response, add_special_tokens=False).input_ids + [eos]
        assert sample.input_ids.tolist() == expected_prompt + expected_response
        assert sample.prompt_length == len(expected_prompt)
        assert tokenizer.decode(sample.input_ids[sample.prompt_length:].tolist()) == response + "<|im_end|>"
        assert (sample.label, sample.is_chosen) == (label, is_chosen)
    assert [s.pair_id for s in data] == [0, 0, 1, 1]

    pad = 17  # any id other than EOS, so that padding cannot pass for a response's EOS
    batch = collate_value_batch(data.samples, pad_token_id=pad)
    lengths = [len(s.input_ids) for s in data]
    assert batch.tokens.shape == (4, max(lengths)) and batch.tokens.dtype == torch.long
    for row, sample in enumerate(data):
        start, end = sample.prompt_length, lengths[row]
        assert batch.tokens[row, :end].tolist() == sample.input_ids.tolist()
        assert (batch.tokens[row, end:] == pad).all()
        assert batch.response_mask[row].nonzero().squeeze(-1).tolist() == list(range(start, end))
        assert batch.tokens[row, end - 1] == eos  # the label's position
    assert batch.labels.dtype == torch.float32 and batch.labels.tolist() == [1.0, -1.0, 1.0, -1.0]
    assert batch.pair_ids.tolist() == [0, 0, 1, 1] and batch.is_chosen.tolist() == [True, False, True, False]
    assert batch.response_lengths.tolist() == [n - s.prompt_length for n, s in zip(lengths, data)]
    assert collate_value_batch(data.samples[:1], pad, pad_to_multiple_of=64).tokens.shape == (1, 64)
    assert collate_value_batch(data.samples[2:], pad, pad_to=max(lengths)).tokens.shape == (2, max(lengths))
    with pytest.raises(ValueError, match="shorter than the longest sample"):
        collate_value_batch(data.samples, pad, pad_to=max(lengths) - 1)


def test_plain_text_prompts_and_an_explicit_eos(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "scored.jsonl", [{"prompt": "2+2=", "response": " 4", "score": 0.5}])
    (sample,) = load_preference_data(str(path), PreferenceDataConfig(chat_template=False), tokenizer,
                                     eos_token_id=7).samples
    # As examples/generate.py encodes a plain-text prompt: the tokenizer's own special tokens included.
    expected = tokenizer("2+2=").input_ids + tokenizer(" 4", add_special_tokens=False).input_ids + [7]
    assert sample.input_ids.tolist() == expected
    assert (sample.label, sample.pair_id, sample.is_chosen) == (0.5, None, None)
    batch = collate_value_batch([sample], pad_token_id=0)
    assert batch.pair_ids.tolist() == [-1] and batch.is_chosen.tolist() == [False]
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                    {"role": "assistant", "content": "Hello."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"response": conversation, "score": 1.0}])
    with pytest.raises(NemoDvpoError, match="line 1 \\(row 0\\): field 'prompt': a conversation of several messages "
                                            "needs the chat template"):
        load_preference_data(str(path), PreferenceDataConfig(chat_template=False), tokenizer)


# ---------------------------------------------------------------------------------------------------
# Over-long sequences
# ---------------------------------------------------------------------------------------------------

LONG_PROMPT = "Please read this carefully. " * 12 + "What is 1 + 1?"


def _overlong_data(tmp_path, tokenizer, **config):
    rows = [pair(LONG_PROMPT, "The answer is two, since one plus one makes two.", "Three."),
            pair("Hi?", "Hello!", "Bye.")]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    full = load_preference_data(str(path), PreferenceDataConfig(max_length=None), tokenizer)
    return full, load_preference_data(str(path), PreferenceDataConfig(**config), tokenizer)


def test_overlong_drop_removes_whole_pairs(tmp_path, tokenizer):
    full, _ = _overlong_data(tmp_path, tokenizer, max_length=None)
    chosen_length, rejected_length = len(full[0].input_ids), len(full[1].input_ids)
    max_length = (chosen_length + rejected_length) // 2
    assert rejected_length < max_length < chosen_length  # only one side is too long
    _, data = _overlong_data(tmp_path, tokenizer, max_length=max_length, overlong="drop")
    assert [s.pair_id for s in data] == [1, 1]  # yet both sides are dropped
    assert data.stats.records_dropped_over_long == 1 and data.stats.records_truncated == 0


def test_truncate_prompt_cuts_from_the_left_never_the_response(tmp_path, tokenizer):
    full, data = _overlong_data(tmp_path, tokenizer, max_length=80, overlong="truncate_prompt")
    assert data.stats.records_truncated == 1 and data.stats.records_dropped_over_long == 0
    chosen, rejected = data[0], data[1]
    for cut, whole in ((chosen, full[0]), (rejected, full[1])):
        assert len(cut.input_ids) <= 80
        assert cut.input_ids[cut.prompt_length:].tolist() == whole.input_ids[whole.prompt_length:].tolist()
        whole_prompt = whole.input_ids[:whole.prompt_length].tolist()
        assert cut.input_ids[:cut.prompt_length].tolist() == whole_prompt[len(whole_prompt) - cut.prompt_length:]
    # The longest side fills max_length; the pair keeps identical prompt tokens.
    assert len(chosen.input_ids) == 80
    assert chosen.input_ids[:chosen.prompt_length].tolist() == rejected.input_ids[:rejected.prompt_length].tolist()
    assert [s.input_ids.tolist() for s in data.samples[2:]] == [s.input_ids.tolist() for s in full.samples[2:]]

    # A response that leaves fewer than min_prompt_tokens of room is dropped, never cut.
    response_length = full[0].response_length
    _, data = _overlong_data(tmp_path, tokenizer, max_length=response_length + 7, overlong="truncate_prompt")
    assert [s.pair_id for s in data] == [1, 1] and data.stats.records_dropped_over_long == 1
    _, data = _overlong_data(tmp_path, tokenizer, max_length=response_length + 7, overlong="truncate_prompt",
                             min_prompt_tokens=7)
    assert data[0].prompt_length == 7 and data[0].response_length == response_length


def test_nothing_left_to_train_on_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    with pytest.raises(NemoDvpoError, match="no sequence is left to train on .*dropped 1 over-long"):
        load_preference_data(str(path), PreferenceDataConfig(max_length=10), tokenizer)


# ---------------------------------------------------------------------------------------------------
# Trajectory context
# ---------------------------------------------------------------------------------------------------

def _turns(tokenizer, sample) -> list[tuple[str, str]]:
    text = tokenizer.decode(sample.input_ids[:sample.prompt_length].tolist())
    return re.findall(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", text, flags=re.S)


def test_trajectory_context_prepends_other_prompts_pairs(tokenizer):
    records, _ = read_preference_records(str(FIXTURE), PreferenceDataConfig())
    responses_of: dict[str, set] = {}
    for record in records:
        responses_of.setdefault(record.prompt[-1]["content"], set()).update(record.responses)

    config = PreferenceDataConfig(trajectory_context=2, seed=3)
    data = tokenize_preference_records(records, tokenizer, config)
    for chosen, rejected in zip(data.samples[::2], data.samples[1::2]):
        record = records[chosen.record_index]
        turns = _turns(tokenizer, chosen)
        assert chosen.input_ids[:chosen.prompt_length].tolist() == rejected.input_ids[:rejected.prompt_length].tolist()
        assert [role for role, _ in turns] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert turns[-1][1] == record.prompt[-1]["content"]
        context_prompts = [turns[1][1], turns[3][1]]
        assert record.prompt[-1]["content"] not in context_prompts and len(set(context_prompts)) == 2
        # Each context turn pair is a real (prompt, response) pair of the data set.
        assert turns[2][1] in responses_of[turns[1][1]] and turns[4][1] in responses_of[turns[3][1]]

    again = tokenize_preference_records(records, tokenizer, config)
    other_seed = tokenize_preference_records(records, tokenizer, PreferenceDataConfig(trajectory_context=2, seed=4))
    assert all((a.input_ids == b.input_ids).all() for a, b in zip(data, again))
    assert any(a.input_ids.tolist() != b.input_ids.tolist() for a, b in zip(data, other_seed))

    with pytest.raises(ConfigError, match="trajectory_context=38 needs at least 39 distinct prompts; the data has 38"):
        tokenize_preference_records(records, tokenizer, PreferenceDataConfig(trajectory_context=38))


# ---------------------------------------------------------------------------------------------------
# Splits and ordering
# ---------------------------------------------------------------------------------------------------

def test_split_by_prompt_is_deterministic_and_disjoint(tokenizer):
    records, _ = read_preference_records(str(FIXTURE), PreferenceDataConfig())
    train, held_out = split_by_prompt(records, 0.25, seed=0)
    train_keys, held_keys = {r.prompt_key for r in train}, {r.prompt_key for r in held_out}
    assert not train_keys & held_keys and len(train) + len(held_out) == 40
    assert len(train_keys) + len(held_keys) == 38 and len(held_keys) in (9, 10)
    # Where a record lands depends on its prompt and the seed only, not on the order of the data.
    again_train, _ = split_by_prompt(list(reversed(records)), 0.25, seed=0)
    assert {r.index for r in again_train} == {r.index for r in train}
    other_train, _ = split_by_prompt(records, 0.25, seed=1)
    assert {r.index for r in other_train} != {r.index for r in train}

    splits = load_preference_splits(str(FIXTURE), PreferenceDataConfig(seed=0), tokenizer, held_out_fraction=0.25)
    assert {s.record_index for s in splits.train} == {r.index for r in train}
    assert {s.record_index for s in splits.held_out} == {r.index for r in held_out}
    assert splits.read_stats.records_read == 40 and splits.held_out.stats.records_read == len(held_out)


def test_epoch_order_is_deterministic_pair_aware_and_resumable(tokenizer):
    data = load_preference_data(str(FIXTURE), PreferenceDataConfig(), tokenizer)
    order = data.order(epoch=1, seed=5)
    assert sorted(order) == list(range(80))
    for first, second in zip(order[::2], order[1::2]):  # every pair adjacent, chosen first
        assert data[first].pair_id == data[second].pair_id and data[first].is_chosen and not data[second].is_chosen
    assert order != data.order(epoch=2, seed=5) and order != data.order(epoch=1, seed=6)

    # A run that stops after 3 batches of epoch 1 and restarts from (epoch=1, position=18) in a fresh
    # process (here: freshly loaded data) sees exactly the batches of an uninterrupted run.
    batch_size = 6
    uninterrupted = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    before = [order[i:i + batch_size] for i in range(0, 18, batch_size)]
    resumed_order = load_preference_data(str(FIXTURE), PreferenceDataConfig(), tokenizer).order(epoch=1, seed=5)
    after = [resumed_order[i:i + batch_size] for i in range(18, len(resumed_order), batch_size)]
    assert before + after == uninterrupted


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------

def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="data.overlong: expected 'drop' or 'truncate_prompt', got 'cut'"):
        from_dict(PreferenceDataConfig, {"overlong": "cut"}, "data")
    with pytest.raises(ConfigError, match="data.max_length must be at least 2"):
        from_dict(PreferenceDataConfig, {"max_length": 1}, "data")
    with pytest.raises(ConfigError, match="data.trajectory_context > 0 needs data.chat_template: true"):
        from_dict(PreferenceDataConfig, {"trajectory_context": 2, "chat_template": False}, "data")
    with pytest.raises(ConfigError, match="data: unknown field\\(s\\) path"):
        from_dict(PreferenceDataConfig, {"path": "x.jsonl"}, "data")


# ---------------------------------------------------------------------------------------------------
# tools/prepare_ultrafeedback.py
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepare_ultrafeedback():
    path = REPO_ROOT / "tools" / "prepare_ultrafeedback.py"
    spec = importlib.util.spec_from_file_location("prepare_ultrafeedback", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _prompts_per_split(folder: Path) -> dict[str, list[str]]:
    prompts = {name: [row["prompt"] for row in map(json.loads, (folder / f"{name}.jsonl").read_text().splitlines())]
               for name in ("test", "sft", "value")}
    prompts["rl"] = list(read_prompts(folder / "rl.jsonl"))
    return prompts


def test_prepare_ultrafeedback_splits_by_prompt_deterministically(tmp_path, prepare_ultrafeedback, capsys):
    manifest = prepare_ultrafeedback(["--source", str(FIXTURE), "--output-dir", str(tmp_path / "a"), "--seed", "1"])
    assert "value:     18 prompts" in capsys.readouterr().out
    counts = manifest["counts"]
    assert sum(c["prompts"] for c in counts.values()) == 38 and sum(c["records"] for c in counts.values()) == 40
    assert counts["test"]["prompts"] == 2  # 5% of 38, rounded, taken first
    for stage, fraction in (("sft", 0.3), ("value", 0.5), ("rl", 0.2)):
        assert abs(counts[stage]["prompts"] - fraction * 36) < 1
    assert json.loads((tmp_path / "a" / "manifest.json").read_text()) == manifest
    assert manifest["seed"] == 1 and manifest["fractions"] == {"sft": 0.3, "value": 0.5, "rl": 0.2}

    prompts = _prompts_per_split(tmp_path / "a")
    assert {name: len(set(p)) for name, p in prompts.items()} == {name: c["prompts"] for name, c in counts.items()}
    names = list(prompts)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            assert not set(prompts[first]) & set(prompts[second]), (first, second)
    # The SFT / value / test files keep the source records unchanged, in source order.
    source = fixture_rows()
    value_rows = [json.loads(line) for line in (tmp_path / "a" / "value.jsonl").read_text().splitlines()]
    assert value_rows == [row for row in source if row["prompt"] in set(prompts["value"])]
    assert len(records_of(tmp_path / "a" / "value.jsonl")) == counts["value"]["records"]

    prepare_ultrafeedback(["--source", str(FIXTURE), "--output-dir", str(tmp_path / "b"), "--seed", "1"])
    prepare_ultrafeedback(["--source", str(FIXTURE), "--output-dir", str(tmp_path / "c"), "--seed", "2"])
    for name in ("test", "sft", "value", "rl", "manifest"):
        suffix = "json" if name == "manifest" else "jsonl"
        assert (tmp_path / "a" / f"{name}.{suffix}").read_bytes() == (tmp_path / "b" / f"{name}.{suffix}").read_bytes()
    assert _prompts_per_split(tmp_path / "c") != prompts


def test_prepare_ultrafeedback_user_errors_exit_2(tmp_path, prepare_ultrafeedback, capsys):
    def run(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            prepare_ultrafeedback(list(args))
        assert exit_info.value.code == 2
        stderr = capsys.readouterr().err
        assert "Traceback" not in stderr
        return stderr

    out = str(tmp_path / "out")
    assert "error: data path" in run("--source", str(tmp_path / "nope.jsonl"), "--output-dir", out)
    assert "must sum to 1" in run("--source", str(FIXTURE), "--output-dir", out, "--sft-fraction", "0.4")
    bad = write_jsonl(tmp_path / "bad.jsonl", fixture_rows()[:5] + [dict(GOOD, rejected="2")])
    message = run("--source", str(bad), "--output-dir", out)
    assert f"error: {bad}:line 6 (row 5): field 'rejected': equals 'chosen'" in message
    manifest = prepare_ultrafeedback(["--source", str(bad), "--output-dir", out, "--skip-invalid"])
    assert manifest["records_invalid"] == {"identical_responses": 1} and manifest["records_read"] == 6
    assert "--overwrite" in run("--source", str(bad), "--output-dir", out, "--skip-invalid")
