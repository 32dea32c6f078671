"""Prompts as token ids: chat messages through the tokenizer's chat template, or plain text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from nemo_dvpo.utils.errors import NemoDvpoError

Prompt = Union[str, list[dict]]


def apply_chat_template(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of ``prompt`` formatted for the model to answer as the assistant.

    A string is one user turn. ``add_generation_prompt`` appends the assistant header, so the
    response starts right after the returned ids - the layout :func:`generate` expects.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise NemoDvpoError(f"a chat prompt is a string or a list of {{'role', 'content'}} messages, got {prompt!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise NemoDvpoError("the tokenizer has no chat template; pass plain-text prompts without it")
    token_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers >= 5 returns a BatchEncoding here, 4.x a list.
    if hasattr(token_ids, "keys"):
        token_ids = token_ids["input_ids"]
    return [int(token_id) for token_id in token_ids]


def encode_prompt(tokenizer, prompt: Prompt, use_chat_template: bool = True) -> list[int]:
    """Token ids of a prompt; chat messages always need the template, text uses it when asked."""
    if use_chat_template or not isinstance(prompt, str):
        return apply_chat_template(tokenizer, prompt)
    return tokenizer(prompt)["input_ids"]


def read_prompts_jsonl(path: str | Path) -> list[Prompt]:
    """Prompts from a JSONL file: one ``{"prompt": str}`` or ``{"messages": [...]}`` per line."""
    path = Path(path)
    if not path.is_file():
        raise NemoDvpoError(f"prompts file {path} does not exist")
    prompts: list[Prompt] = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise NemoDvpoError(f"{path}:{line_number}: not valid JSON ({error})") from error
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            prompts.append(record["messages"])
        else:
            raise NemoDvpoError(f'{path}:{line_number}: expected {{"prompt": str}} or {{"messages": [...]}}')
    if not prompts:
        raise NemoDvpoError(f"prompts file {path} holds no prompts")
    return prompts
