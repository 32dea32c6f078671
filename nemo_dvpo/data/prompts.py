"""Prompts for RL rollouts, evaluation and generation: JSONL records with a ``prompt``, tokenized once.

A record needs ``prompt`` (a string, or a list of chat messages; ``messages`` is accepted too); every
other field is carried along untouched, so verifiable records (``instruction_id_list`` and ``kwargs``,
see :mod:`nemo_dvpo.data.verifiable`) can score the responses drawn for them. ``split`` filters on a
record's ``split`` field, so one pool file serves training and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from nemo_dvpo.data.jsonl import iter_jsonl
from nemo_dvpo.inference.chat import Prompt, encode_prompt
from nemo_dvpo.utils.errors import ConfigError


@dataclass
class PromptSet:
    records: list[dict[str, Any]]
    token_ids: list[list[int]]
    # Records left out, by reason (e.g. "over max_prompt_tokens").
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)


def read_prompt_file(path: str | Path, split: Optional[str] = None) -> list[tuple[dict[str, Any], Prompt]]:
    """``(record, prompt)`` for every record of the file (with ``split``: of that split), validated."""
    path = Path(path)
    prompts = []
    for line in iter_jsonl(path, "prompt file"):
        where, record = f"{path}:{line.number}", line.value
        if line.error is not None:
            raise ConfigError(f"{where}: {line.error}")
        if not isinstance(record, dict) or not ("prompt" in record or "messages" in record):
            raise ConfigError(f"{where}: expected an object with a 'prompt' (or 'messages') field")
        prompt = record["prompt"] if "prompt" in record else record["messages"]
        if not (isinstance(prompt, str) and prompt.strip()) and not (
                isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)):
            raise ConfigError(f"{where}: field 'prompt' must be a non-empty string or a list of chat messages, "
                              f"got {type(prompt).__name__}")
        if split is None or record.get("split") == split:
            prompts.append((record, prompt))
    return prompts


def read_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a prompt file (strings or message lists), in file order."""
    prompts = [prompt for _, prompt in read_prompt_file(path)]
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return prompts


def load_prompts(path: str | Path, tokenizer, max_prompt_tokens: int, split: Optional[str] = None,
                 chat_template: bool = True, limit: Optional[int] = None) -> PromptSet:
    """Read and tokenize prompt records; prompts longer than ``max_prompt_tokens`` are skipped and counted."""
    records, token_ids, skipped = [], [], {}
    for record, prompt in read_prompt_file(path, split):
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
