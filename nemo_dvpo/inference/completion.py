"""Completions as an API gives them: per-request token limits, stop strings and a finish reason.

:func:`complete` runs one :func:`nemo_dvpo.inference.generation.generate` call for a batch of prompts that
share their sampling settings, with the longest token limit among them; each reply is then cut to its
own limit (``finish_reason="length"``), at its end-of-sequence token (``"stop"``) or before the first of
its stop strings (``"stop"``, the string itself left out, as in OpenAI's API). Greedy replies are
therefore exactly what each prompt gets alone. Collective over the model-parallel group, like ``generate``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

from nemo_dvpo.inference.generation import SamplingConfig, generate


@dataclass
class CompletionRequest:
    prompt_ids: list[int]
    max_tokens: int
    stop: list[str] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end-of-sequence token or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


def room_for_reply(prompt_length: int, max_length: int) -> int:
    """How many tokens a reply to a prompt of ``prompt_length`` tokens can have."""
    return max(0, max_length - prompt_length)


def complete(policy, requests: Sequence[CompletionRequest], sampling: SamplingConfig) -> list[Completion]:
    """Replies to ``requests`` (every prompt must leave room for one token: see :func:`room_for_reply`)."""
    longest = max(len(request.prompt_ids) for request in requests)
    max_new_tokens = min(max(request.max_tokens for request in requests),
                         room_for_reply(longest, policy.max_length))
    if max_new_tokens < 1:
        raise ValueError(f"a prompt of {longest} tokens leaves no room for a reply within {policy.max_length}")
    sampling = dataclasses.replace(sampling, max_new_tokens=max_new_tokens, stop_on_eos=True)
    output = generate(policy.model, policy.tokenizer, [request.prompt_ids for request in requests], sampling,
                      eos_token_ids=policy.eos_token_ids or None)
    completions = []
    for row, request in enumerate(requests):
        token_ids = output.response_token_ids(row)[:request.max_tokens]
        ended = bool(token_ids) and token_ids[-1] in policy.eos_token_ids
        text = policy.tokenizer.decode(token_ids, skip_special_tokens=True)
        finish_reason = "stop" if ended else "length"
        cut = _first_stop(text, request.stop)
        if cut is not None:
            text, finish_reason = text[:cut], "stop"
        completions.append(Completion(text=text, finish_reason=finish_reason, prompt_tokens=len(request.prompt_ids),
                                      completion_tokens=len(token_ids)))
    return completions


def _first_stop(text: str, stop: Sequence[str]) -> Optional[int]:
    positions = [text.find(string) for string in stop if string and string in text]
    return min(positions) if positions else None
