"""Prompts for RL rollouts and held-out evaluation: JSONL records with a ``prompt``, tokenized once.

A record needs ``prompt`` (a string, or a list of chat messages; ``messages`` is accepted too); every other field is carried along
untouched, so verifiable records (``instruction_id_list`` and ``kwargs``, see
:mod:`nemo_dvpo.data.verifiable`) can score the responses drawn for them. ``split`` filters on a
record's ``split`` field, so one pool file serves training and evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from nemo_dvpo.inference.chat import encode_prompt
from nemo_dvpo.utils.errors import ConfigError


@dataclass
class PromptSet:
    records: list[dict[str, Any]]
    token_ids: list[list[int]]
    # Records left out, by reason (e.g. "over max_prompt_tokens").
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)


def load_prompts(path: str | Path, tokenizer, max_prompt_tokens: int, split: Optional[str] = None,
                 chat_template: bool = True, limit: Optional[int] = None) -> PromptSet:
    """Read and tokenize prompt records; prompts longer than ``max_prompt_tokens`` are skipped and counted."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file {path} does not exist")
    records, token_ids, skipped = [], [], {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not ("prompt" in record or "messages" in record):
                raise ConfigError(f"{path}:{line_number}: expected an object with a 'prompt' (or 'messages') field")
            prompt = record["prompt"] if "prompt" in record else record["messages"]
            if not (isinstance(prompt, str) and prompt.strip()) and not isinstance(prompt, list):
                raise ConfigError(f"{path}:{line_number}: field 'prompt' must be a non-empty string or a "
                                  f"list of chat messages, got {type(prompt).__name__}")
            if split is not None and record.get("split") != split:
                continue
            ids = encode_prompt(tokenizer, prompt, use_chat_template=chat_template)
            if len(ids) > max_prompt_tokens:
                skipped["over max_prompt_tokens"] = skipped.get("over max_prompt_tokens", 0) + 1
                continue
            records.append(record)
            token_ids.append(ids)
            if limit is not None and len(records) >= limit:
                break
    if not records:
        where = f" with split={split!r}" if split is not None else ""
        raise ConfigError(f"{path} holds no usable prompts{where} (skipped: {skipped or 'none'})")
    return PromptSet(records, token_ids, skipped)
