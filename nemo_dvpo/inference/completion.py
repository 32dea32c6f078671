"""Completions as an API gives them: per-request token limits, stop strings and a finish reason.

:func:`complete` runs one :func:`nemo_dvpo.inference.generation.generate` call (or one call of the policy's vLLM
engine, ``Policy.engine``) for a batch of prompts that share their sampling settings, with the longest token
limit among them; each reply is then cut to its own limit (``finish_reason="length"``), at its end-of-sequence
token (``"stop"``) or before the first of its stop strings (``"stop"``, the string itself left out, as in
OpenAI's API). Greedy replies are therefore exactly what each prompt gets alone. Collective over the
model-parallel group, like ``generate``.

A long reply can be produced in slices (``slice_tokens``): a call then generates at most that many tokens, a
reply not finished by then comes back with ``finish_reason=None`` and its tokens so far, and the next call
continues it from ``CompletionRequest(..., reply_ids=those tokens)`` - its prompt and reply prefilled again,
the KV cache rebuilt. A server uses this to answer short requests between the slices of a long one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from nemo_dvpo.inference.generation import SamplingConfig, generate
from nemo_dvpo.models.config import ModelConfig
from nemo_dvpo.utils.distributed import ParallelConfig
from nemo_dvpo.utils.errors import ConfigError


@dataclass
class GenerateConfig:
    """``examples/generate.py``: a model's completions of prompts, or a chat on the terminal."""

    # The model preset (model=<name>), used when no checkpoint is given.
    model: ModelConfig
    # A nemo_dvpo model checkpoint folder; when set it replaces the ``model`` preset.
    checkpoint: Optional[str] = None
    # Prompts: one string or a list of strings on the command line (prompts='["What is 2+2?"]'), or a JSONL
    # file of {"prompt": str} / {"messages": [...]} records (prompts_file); exactly one unless interactive.
    prompts: Optional[Union[str, list[str]]] = None
    prompts_file: Optional[str] = None  # the JSONL file of prompts
    # Chat on the terminal instead of answering prompts (rank 0 reads stdin; /reset, /exit).
    interactive: bool = False
    # Format plain-text prompts with the tokenizer's chat template (messages always use it).
    chat_template: bool = True
    # How answers are drawn: greedy by default; sampling.greedy=false sampling.temperature=0.7 samples.
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(greedy=True))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if not self.interactive and (self.prompts is None) == (self.prompts_file is None):
            raise ConfigError("give exactly one of prompts='[\"...\", ...]' or prompts_file=path.jsonl "
                              "(or interactive=true)")
        if isinstance(self.prompts, list) and not self.prompts:
            raise ConfigError("prompts must be a non-empty list of strings")


@dataclass
class CompletionRequest:
    prompt_ids: list[int]
    max_tokens: int  # of the whole reply, reply_ids included
    stop: list[str] = field(default_factory=list)
    reply_ids: list[int] = field(default_factory=list)  # the reply's tokens so far (continuing a sliced reply)


@dataclass
class Completion:
    text: str
    # "stop" (end-of-sequence token or a stop string), "length" (max_tokens reached, or the context full),
    # or None: cut by the call's slice_tokens, to be continued from token_ids.
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)  # the reply's tokens (up to a stop string's cut: all)


def room_for_reply(prompt_length: int, max_length: int) -> int:
    """How many tokens a reply to a prompt of ``prompt_length`` tokens can have."""
    return max(0, max_length - prompt_length)


def complete(policy, requests: Sequence[CompletionRequest], sampling: SamplingConfig,
             slice_tokens: Optional[int] = None,
             on_token: Optional[Callable[[int, int], None]] = None) -> list[Completion]:
    """Replies to ``requests`` (every prompt must leave room for one token: see :func:`room_for_reply`),
    each at most ``slice_tokens`` tokens longer than its ``reply_ids`` if given (see the module docstring).

    ``on_token(index, token_id)``, if given, is called as each request's reply draws a token (within its
    ``max_tokens``; a stop string is only cut from the returned text), so that a server can stream it."""
    contexts = [request.prompt_ids + request.reply_ids for request in requests]
    longest = max(len(context) for context in contexts)
    max_new_tokens = min(max(request.max_tokens - len(request.reply_ids) for request in requests),
                         room_for_reply(longest, policy.max_length))
    if slice_tokens is not None:
        max_new_tokens = min(max_new_tokens, slice_tokens)
    if max_new_tokens < 1:
        raise ValueError(f"a prompt of {longest} tokens leaves no room for a reply within {policy.max_length}")
    sampling = dataclasses.replace(sampling, max_new_tokens=max_new_tokens, stop_on_eos=True)
    # The batch runs to its longest reply: a row's tokens past its own max_tokens are dropped below, so they are
    # not announced either.
    room = [request.max_tokens - len(request.reply_ids) for request in requests]
    drawn = [0] * len(requests)

    def announce(rows: list[int], tokens: list[int]) -> None:
        for row, token in zip(rows, tokens):
            if drawn[row] < room[row]:
                drawn[row] += 1
                on_token(row, token)

    if policy.engine is not None:  # the vLLM engine draws the whole batch at once: nothing to stream
        if on_token is not None:
            raise ValueError("token streaming needs the Megatron engine; this policy answers with vLLM")
        output = policy.engine.generate_output(policy.tokenizer, contexts, sampling,
                                               eos_token_ids=policy.eos_token_ids or None)
    else:
        output = generate(policy.model, policy.tokenizer, contexts, sampling,
                          eos_token_ids=policy.eos_token_ids or None,
                          on_step=announce if on_token is not None else None)
    completions = []
    for row, request in enumerate(requests):
        new_ids = output.response_token_ids(row)[:request.max_tokens - len(request.reply_ids)]
        token_ids = request.reply_ids + new_ids
        text = policy.tokenizer.decode(token_ids, skip_special_tokens=True)
        if new_ids and new_ids[-1] in policy.eos_token_ids:
            finish_reason = "stop"
        elif (slice_tokens is None or len(token_ids) >= request.max_tokens
              or room_for_reply(len(request.prompt_ids) + len(token_ids), policy.max_length) < 1):
            finish_reason = "length"
        else:
            finish_reason = None  # cut by this call's batch or slice budget: it continues
        cut = first_stop(text, request.stop)
        if cut is not None:
            text, finish_reason = text[:cut], "stop"
        completions.append(Completion(text=text, finish_reason=finish_reason, prompt_tokens=len(request.prompt_ids),
                                      completion_tokens=len(token_ids), token_ids=token_ids))
    return completions


def first_stop(text: str, stop: Sequence[str]) -> Optional[int]:
    positions = [text.find(string) for string in stop if string and string in text]
    return min(positions) if positions else None
