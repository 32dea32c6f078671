"""Prompts as token ids: chat messages through the tokenizer's chat template, or plain text."""

from __future__ import annotations

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
