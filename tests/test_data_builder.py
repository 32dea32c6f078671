"""tools/build_preference_data.py as a thin command line over the library: the policy comes from the one loader
(nemo_dvpo.inference.policy) with the one EOS rule, and a small end-to-end build writes pairs that keep the pairing
rule, re-derived identically by --finalize-only."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from types import SimpleNamespace

import pytest

from nemo_dvpo.data.pairing import PAIRING_RULE, make_pairs
from nemo_dvpo.data.preference import PreferenceDataConfig, read_preference_records
from nemo_dvpo.inference.policy import policy_model_config, stop_token_ids
from nemo_dvpo.models.config import load_model_config
from nemo_dvpo.utils.errors import NemoDvpoError
from tests.conftest import REPO_ROOT, entry_point_env


def test_a_reply_ends_at_the_eos_of_the_one_rule_and_at_the_tokenizers_own():
    import dataclasses

    preset = load_model_config("tiny")  # eos_token_id: 2
    assert stop_token_ids(SimpleNamespace(eos_token_id=2, pad_token_id=None), preset) == [2]
    # A chat preset's EOS differs from its tokenizer's: both end a reply, the preset's is the rule's EOS.
    assert stop_token_ids(SimpleNamespace(eos_token_id=0, pad_token_id=None), preset) == [0, 2]
    no_preset_eos = dataclasses.replace(preset, eos_token_id=None)
    assert stop_token_ids(SimpleNamespace(eos_token_id=7, pad_token_id=None), no_preset_eos) == [7]
    with pytest.raises(NemoDvpoError, match="names an end-of-sequence token: set model.eos_token_id"):
        stop_token_ids(SimpleNamespace(eos_token_id=None, pad_token_id=None), no_preset_eos)


def test_the_loader_takes_a_preset_name_or_a_composed_model_config():
    preset = load_model_config("tiny", num_layers=2)  # as a Hydra model node with an override composes it
    assert policy_model_config(preset) is preset
    assert policy_model_config("tiny") == load_model_config("tiny")


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_a_small_build_writes_rule_keeping_pairs_and_finalize_only_rederives_them(tmp_path):
    out = tmp_path / "built"
    command = [sys.executable, "tools/build_preference_data.py", "--output-dir", str(out), "--model", "tiny",
               "--num-prompts", "8", "--generate-prompts", "4", "--samples-per-prompt", "4", "--batch-prompts", "2",
               "--max-new-tokens", "12", "--heldout-fraction", "0.5", "--skip-eval-check", "--threads", "1"]
    built = subprocess.run(command, cwd=REPO_ROOT, env=entry_point_env(), capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["model"]["preset"] == "tiny"
    assert PAIRING_RULE in manifest["pair_rule"]
    pool = _jsonl(out / "prompts.jsonl")
    scored = {split: _jsonl(out / f"scored_{split}.jsonl") for split in ("train", "heldout")}
    assert sum(len(records) for records in scored.values()) == 4 * 4
    # A response that stopped before --max-new-tokens stopped on one of the policy's stop ids: not truncated.
    assert not any(record["truncated"] for records in scored.values() for record in records
                   if record["response_tokens"] < 12)
    for split, records in scored.items():
        by_prompt = defaultdict(list)
        for record in records:
            by_prompt[record["prompt_id"]].append(record)
        expected = [pair for record in pool if record["prompt_id"] in by_prompt
                    for pair in make_pairs(by_prompt[record["prompt_id"]])]
        assert _jsonl(out / f"pairs_{split}.jsonl") == expected
        if expected:
            records_read, stats = read_preference_records(str(out / f"pairs_{split}.jsonl"), PreferenceDataConfig())
            assert len(records_read) == len(expected) and not stats.records_invalid
    before = {split: (out / f"pairs_{split}.jsonl").read_bytes() for split in ("train", "heldout")}
    again = subprocess.run(command + ["--finalize-only"], cwd=REPO_ROOT, env=entry_point_env(), capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert {split: (out / f"pairs_{split}.jsonl").read_bytes() for split in ("train", "heldout")} == before
