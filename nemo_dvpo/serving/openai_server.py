"""A policy as an OpenAI-compatible server, over Megatron inference, for evaluation and judging.

    python examples/serve_policy.py policy=smollm2_135m server.port=8001
    torchrun --nproc-per-node 2 examples/serve_policy.py policy=CHECKPOINT parallel.tensor_model_parallel_size=2

Endpoints (the subset of OpenAI's API that the ``openai`` client and evaluation harnesses use), on FastAPI:

* ``GET /v1/models`` - the one served model; ``GET /health`` - 200 once the model is loaded;
* ``POST /v1/chat/completions`` - ``messages`` through the tokenizer's chat template;
* ``POST /v1/completions`` - raw text ``prompt`` (a string or a list of strings);
* ``GET /metrics`` - Prometheus counters and a histogram (requests, tokens, latency), from ``prometheus_client``.

Both take ``temperature`` (0 is greedy; default 1; finite), ``top_p``, ``max_tokens`` (clamped to the room the
prompt leaves in the model's length; the reply then ends with ``finish_reason="length"``), ``stop`` (a
string or up to four), ``n`` (samples per prompt; prompts x n at most ``server.max_batch_rows``), ``seed`` and
``stream`` (with ``stream_options.include_usage``). The request bodies are pydantic models
(:class:`ChatCompletionRequest`, :class:`TextCompletionRequest`): fields the server cannot honour
(``logprobs``, ``tools``, ``response_format``, ``echo``, ...) are refused with a 400 naming them, never
ignored, and so is a bad value, naming its field; so is a prompt that does not fit the model's length.

A streamed reply is sent as server-sent events while it is generated, token by token: each decoding step
announces the tokens it drew (:func:`~nemo_dvpo.inference.completion.complete`'s ``on_token``), and the text each
choice gained since the last event is sent as a chunk, a finish chunk as a choice ends, then ``[DONE]``; the
chunks add up to the reply ``stream=false`` gives. Text that may still change is held back until later tokens
decide it: a character whose UTF-8 bytes are not all generated yet, and the start of a stop string (the reply
leaves a completed stop string out, and nothing after it is sent).

Concurrent requests that arrive within ``server.max_delay_ms`` and share their sampling settings run as
one batch (up to ``server.max_batch_rows`` replies); a greedy reply is the same whatever it is batched with.
Replies are generated in slices of ``server.slice_tokens`` tokens: a reply still going after a slice goes
back to the end of the queue, so a short request sent while a long one runs waits for at most one slice,
not for the whole long reply (static-batch generation cannot add a request to a running batch). Each
slice re-reads its prompt and reply so far; a greedy reply longer than a slice is therefore the model's
greedy reply up to the rounding of that prefill (a near-tie of two logits could flip), and a seeded sample
is reproducible but not the one an unsliced generation draws.
The server binds 127.0.0.1; another host needs a bearer token in ``NEMO_DVPO_POLICY_TOKEN`` (or
``server.allow_unauthenticated=true``). Under torchrun or srun, rank 0 of each model-parallel group serves
(data-parallel replica r on ``server.port + r``) and broadcasts each batch to its group. SIGTERM or Ctrl-C
answers the requests in flight, then every rank exits.

This module owns the settings, the endpoints, the request and response models, the stream and the batching
policy (equal sampling settings, up to a number of replies); the app's error handling, the uvicorn front, the
request queue and its run loop, and the leader/follower loop across model-parallel ranks are
:mod:`nemo_dvpo.serving.http`'s, shared with the GVM server.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Iterator, Literal, Optional, Union

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError, model_serializer

from nemo_dvpo.inference.completion import Completion, CompletionRequest, complete, first_stop, room_for_reply
from nemo_dvpo.inference.generation import SamplingConfig
from nemo_dvpo.serving.http import (UNFINISHED, BatchingService, HTTPFront, ModelParallelRunner, Pending, authorize,
                                    check_server_settings, json_api, model_parallel_group, read_body,
                                    serve_until_stopped, server_token)
from nemo_dvpo.serving.kserve import RequestError, parse_json
from nemo_dvpo.utils.distributed import ParallelConfig
from nemo_dvpo.utils.errors import ConfigError, NemoDvpoError


@dataclass
class PolicyServerConfig:
    # Interface to listen on. A host other than loopback needs a bearer token (the environment variable
    # token_env) or allow_unauthenticated.
    host: str = "127.0.0.1"
    # Port to listen on; data-parallel replica r listens on port + r.
    port: int = 8001
    # The environment variable holding the bearer token clients must send (unset: no token asked).
    token_env: str = "NEMO_DVPO_POLICY_TOKEN"
    # Listen on a non-loopback host without a token.
    allow_unauthenticated: bool = False
    # Batching: wait up to max_delay_ms after a request for others with the same sampling settings.
    max_delay_ms: float = 10.0
    # Batching: the most replies merged into one generation (also the most replies one request may ask).
    max_batch_rows: int = 32
    # Replies are generated this many tokens at a time, the queue served in between, so that a long reply
    # holds a short request for one slice only (0: each batch runs to its longest reply, as before). A streamed
    # reply is sent a slice at a time.
    slice_tokens: int = 256
    # Reply length when a request gives no max_tokens (clamped to the room its prompt leaves).
    default_max_tokens: int = 512
    # Largest request body in bytes (413 above it).
    max_body_bytes: int = 16 * 2**20
    # The most samples (n) one request may ask for.
    max_n: int = 16
    # How long a request waits for its reply before the server answers 503.
    request_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        check_server_settings(self, positive=("max_batch_rows", "default_max_tokens", "max_body_bytes", "max_n"))
        if self.slice_tokens < 0:
            raise ConfigError(f"server.slice_tokens must be >= 0 (0: no slicing), got {self.slice_tokens}")


@dataclass
class ServePolicyConfig:
    # What to serve: a nemo_dvpo checkpoint folder, a Hugging Face folder / .gguf / package:// source,
    # or a preset name (e.g. smollm2_135m, tiny). (Not ``model``: that is Hydra's preset group.)
    policy: str = ""
    # The name clients ask for (``model`` in requests, /v1/models); null: the checkpoint folder's or preset's name.
    served_model_name: Optional[str] = None
    # Prompt plus reply, in tokens; null: the model's context length capped at 4096.
    max_sequence_length: Optional[int] = None
    # fp32, bf16 or fp16; null: the checkpoint's or preset's own.
    precision: Optional[str] = None
    server: PolicyServerConfig = field(default_factory=PolicyServerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if not self.policy:
            raise ConfigError("policy=... is required: a nemo_dvpo checkpoint, a Hugging Face folder or a preset name")


# -- requests ----------------------------------------------------------------------------------------------
#
# The request bodies are pydantic models: unknown fields are refused (extra="forbid"), and each field's check
# says what it wants in its own words, so that :func:`_request_error` can name the field and what was wrong.


def _number(low: float, high: float, low_open: bool = False):
    def check(value: Any) -> Optional[float]:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value!r}")
        if value > high or value < low or (low_open and value == low):
            raise ValueError(f"must be in {'(' if low_open else '['}{float(low)}, {float(high)}], got {value}")
        return float(value)

    return Annotated[Optional[float], BeforeValidator(check)]


def _integer(low: int, high: Optional[int] = None):
    def check(value: Any) -> Optional[int]:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            raise ValueError(f"must be an integer {f'{low}..{high}' if high is not None else f'>= {low}'}, "
                             f"got {value!r}")
        return value

    return Annotated[Optional[int], BeforeValidator(check)]


def _stop_strings(value: Any) -> list[str]:
    stop = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ValueError("must be a non-empty string or a list of up to 4 of them")
    return stop


def _content_text(content: Any) -> str:
    if isinstance(content, list):  # content parts: only text can be served
        if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                   for part in content):
            raise ValueError("only text parts are supported")
        return "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise ValueError("must be a string")
    return content


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: Optional[StrictBool] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_call_id, ...: nothing the chat template reads
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, BeforeValidator(_content_text)]


class _CompletionFields(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    temperature: _number(0.0, 2.0) = None
    top_p: _number(0.0, 1.0, low_open=True) = None
    max_tokens: _integer(1) = None
    stop: Annotated[list[str], BeforeValidator(_stop_strings)] = []
    n: _integer(1) = None
    seed: _integer(0, 2**63 - 1) = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # Accepted at their neutral values only (checked in parse_request, with a message naming the field).
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logprobs: Any = None
    metadata: Optional[dict] = None
    store: Optional[bool] = None


class ChatCompletionRequest(_CompletionFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: _integer(1) = None


class TextCompletionRequest(_CompletionFields):
    prompt: Union[str, Annotated[list[str], Field(min_length=1)]]
    echo: Any = None
    best_of: Any = None


def _location(loc: tuple) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not (part.startswith(("list[", "function-")) or part in ("str",)):  # pydantic's union branch names
            path += f".{part}" if path else part
    return path


def _request_error(error: ValidationError) -> RequestError:
    """The 400 of a body that does not validate: every field at fault named, with what was wrong."""
    unsupported = sorted(_location(e["loc"]) for e in error.errors() if e["type"] == "extra_forbidden")
    if unsupported:
        return RequestError(400, f"unsupported field(s): {', '.join(unsupported)}")
    faults = []
    for fault in error.errors():
        where = _location(fault["loc"])
        if fault["type"] == "value_error":
            faults.append(f"'{where}' {fault['ctx']['error']}")
        elif fault["type"] == "missing":
            faults.append(f"'{where}' is required")
        else:
            wanted = fault["msg"].replace("Input should", "should")
            faults.append(f"'{where}': {wanted}, got {str(fault['input'])[:80]}")
    return RequestError(400, "; ".join(dict.fromkeys(faults)))


@dataclass
class ParsedRequest:
    kind: str  # "chat" or "completion"
    prompts: list[list[int]]  # token ids, one per prompt
    n: int
    max_tokens: list[int]  # per prompt, clamped to the room it leaves
    stop: list[str]
    sampling: SamplingConfig
    stream: bool
    seeded: bool  # the request fixed the seed (otherwise the server picks one per batch)
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


def _encodable(text: str, where: str) -> str:
    """``text`` if it is valid Unicode; JSON's escapes can carry lone surrogates ("\\ud800") that no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(400, f"{where} is not valid Unicode ({error.reason} at character {error.start})") from None
    return text


def parse_request(kind: str, body: Any, tokenizer, model_name: str, max_length: int,
                  config: PolicyServerConfig) -> ParsedRequest:
    """Validate a chat or completion request and tokenize its prompts; a fault is a RequestError (4xx)."""
    from nemo_dvpo.inference.chat import apply_chat_template

    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    try:
        fields = (ChatCompletionRequest if kind == "chat" else TextCompletionRequest).model_validate(body)
    except ValidationError as error:
        raise _request_error(error) from None
    if fields.logprobs not in (None, False, 0):
        raise RequestError(400, "'logprobs' is not supported by this server")
    if kind == "completion" and (fields.echo or fields.best_of not in (None, 1)):
        raise RequestError(400, "'echo' and 'best_of' are not supported by this server")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(fields, name) not in (None, 0, 0.0):
            raise RequestError(400, f"'{name}' is not supported by this server (only 0)")
    if fields.model != model_name:
        raise RequestError(404, f"the model {fields.model!r} does not exist; this server serves {model_name!r}")
    if kind == "chat":
        chat = [{"role": message.role, "content": _encodable(message.content, f"messages[{index}].content")}
                for index, message in enumerate(fields.messages)]
        try:
            prompts = [apply_chat_template(tokenizer, chat)]
        except NemoDvpoError as error:
            raise RequestError(400, str(error)) from None
    else:
        texts = [fields.prompt] if isinstance(fields.prompt, str) else fields.prompt
        prompts = [tokenizer(_encodable(text, f"prompt[{index}]"))["input_ids"] for index, text in enumerate(texts)]
        if any(not ids for ids in prompts):
            raise RequestError(400, "a prompt is empty")
    for ids in prompts:
        if room_for_reply(len(ids), max_length) < 1:
            raise RequestError(400, f"this model's maximum context length is {max_length} tokens; the prompt has "
                                    f"{len(ids)} tokens, leaving no room for a reply")
    n = fields.n or 1
    if n > config.max_n:
        raise RequestError(400, f"'n' must be an integer 1..{config.max_n} (server.max_n), got {n}")
    if len(prompts) * n > config.max_batch_rows:
        raise RequestError(400, f"the request asks for {len(prompts) * n} replies ({len(prompts)} prompt(s) x n={n}); "
                                f"this server answers at most {config.max_batch_rows} per request "
                                "(server.max_batch_rows): send them as several requests")
    requested = fields.max_tokens or (fields.max_completion_tokens if kind == "chat" else None)
    max_tokens = [min(requested or config.default_max_tokens, room_for_reply(len(ids), max_length)) for ids in prompts]
    temperature = 1.0 if fields.temperature is None else fields.temperature
    try:
        sampling = SamplingConfig(temperature=temperature, top_p=1.0 if fields.top_p is None else fields.top_p,
                                  greedy=temperature == 0, seed=fields.seed or 0)
    except NemoDvpoError as error:  # what the sampler refuses is the request's fault
        raise RequestError(400, str(error)) from None
    include_usage = bool(fields.stream_options and fields.stream_options.include_usage)
    return ParsedRequest(kind=kind, prompts=prompts, n=n, max_tokens=max_tokens, stop=fields.stop, sampling=sampling,
                         stream=fields.stream, seeded=fields.seed is not None, include_usage=include_usage)


# -- the batching service ----------------------------------------------------------------------------------


@dataclass
class _Pending(Pending):
    request: ParsedRequest
    # One entry per reply (prompt-major, n per prompt): None until its first slice, then its reply so far.
    replies: list[Optional[Completion]] = field(default_factory=list)
    # Per reply, the tokens drawn so far by the slice running now (the model's thread appends; a stream reads).
    drawn: list[list[int]] = field(default_factory=list)
    slices: int = 0  # slices run so far
    # Held while replies and drawn change together, so that a stream never reads a slice's tokens twice.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.replies = [None] * (len(self.request.prompts) * self.request.n)
        self.drawn = [[] for _ in self.replies]

    def snapshot(self) -> tuple[list[Optional[Completion]], list[list[int]]]:
        """The replies so far and the tokens their running slice has drawn, as of one moment."""
        with self.lock:
            return list(self.replies), [list(tokens) for tokens in self.drawn]

    @property
    def unfinished(self) -> list[int]:
        return [index for index, reply in enumerate(self.replies) if reply is None or reply.finish_reason is None]

    @property
    def rows(self) -> list[CompletionRequest]:
        """The replies still to be generated, each continuing from its tokens so far."""
        request = self.request
        return [CompletionRequest(request.prompts[index // request.n], request.max_tokens[index // request.n],
                                  request.stop, reply_ids=self.replies[index].token_ids if self.replies[index] else [])
                for index in self.unfinished]

    def length_class(self, slice_tokens: int) -> int:
        """How many tokens this request's next call generates at most, as a power-of-two class: a static batch runs
        to its longest row, so rows of very different lengths are not batched together."""
        remaining = max(self.request.max_tokens[index // self.request.n] - (self.replies[index].completion_tokens
                                                                           if self.replies[index] else 0)
                        for index in self.unfinished)
        return min(remaining, slice_tokens or remaining).bit_length()

    def batch_key(self, slice_tokens: int) -> tuple:
        sampling = self.request.sampling
        seeded = self.request.seeded and not sampling.is_greedy
        # A seeded request's slices draw from seeds of their own (see CompletionService.answer): one batch, one seed.
        return (self.length_class(slice_tokens), sampling.is_greedy, sampling.temperature, sampling.top_p,
                (sampling.seed, self.slices) if seeded else None)


CompleteFn = Callable[[list[CompletionRequest], SamplingConfig, Optional[int]], list[Completion]]


class CompletionService(BatchingService):
    """Queues parsed requests from HTTP threads; :meth:`run` (the main thread) batches and answers them.

    The requests queued within ``max_delay_ms`` of the first are answered in batches of equal sampling
    settings and length class (:meth:`_Pending.length_class`), shortest first, each at most ``max_batch_rows``
    replies, with ``complete_fn``, one slice of ``slice_tokens`` tokens at a time: a request with replies still
    going goes back to the end of the queue.
    """

    what = "reply"

    def __init__(self, complete_fn: CompleteFn, config: PolicyServerConfig, tokens: Optional["TokenSink"] = None):
        super().__init__(config)
        self.complete_fn = complete_fn
        # Where the model's thread announces each drawn token (see TokenSink); None: replies arrive by slices.
        self.tokens = tokens
        self.next_seed = 0
        self.batches = 0

    def submit(self, request: ParsedRequest) -> list[Completion]:
        return self._wait_for(_Pending(request))

    def batches_from(self, first: _Pending) -> Iterator[list[_Pending]]:
        """The queued requests in batches of one sampling setting and one length class, shortest first."""
        groups: dict[tuple, list[_Pending]] = {}
        for pending in [first, *self._arrivals()]:
            groups.setdefault(pending.batch_key(self.config.slice_tokens), []).append(pending)
        for key in sorted(groups, key=lambda key: key[0]):
            group = groups[key]
            batch: list[_Pending] = []
            for pending in group:
                if batch and sum(len(p.unfinished) for p in batch) + len(pending.unfinished) > self.config.max_batch_rows:
                    yield batch
                    batch = []
                batch.append(pending)
            yield batch

    def answer(self, batch: list[_Pending]) -> list:
        rows = [row for pending in batch for row in pending.rows]
        sampling = batch[0].request.sampling
        if not batch[0].request.seeded:
            sampling = dataclasses.replace(sampling, seed=self.next_seed)
            self.next_seed += 1
        elif batch[0].slices and not sampling.is_greedy:
            # Slice k of a seeded request draws from seed + k * a large odd number, not from its first slice's
            # stream again (which would repeat that slice's random draws).
            sampling = dataclasses.replace(sampling, seed=(sampling.seed + batch[0].slices * 0x9E3779B97F4A7C15) % 2**63)
        self.batches += 1
        owners = [(pending, index) for pending in batch for index in pending.unfinished]

        def drew(row: int, token: int) -> None:
            pending, index = owners[row]
            with pending.lock:
                pending.drawn[index].append(token)
            if pending.listener is not None:
                pending.listener()

        if self.tokens is not None:
            self.tokens.callback = drew
        try:
            completions = iter(self.complete_fn(rows, sampling, self.config.slice_tokens or None))
        finally:
            if self.tokens is not None:
                self.tokens.callback = None
        answers = []
        for pending in batch:
            with pending.lock:
                for index in pending.unfinished:
                    pending.replies[index] = next(completions)
                    pending.drawn[index] = []
            pending.slices += 1
            answers.append(UNFINISHED if pending.unfinished else pending.replies)
        return answers


class TokenSink:
    """Carries the tokens a slice draws, as they are drawn, from the model's call to the service: the leader's
    ``complete`` calls it (``on_token``); the service points it at the running batch's replies. Followers of a
    model-parallel group run the same call with the sink never pointed anywhere."""

    def __init__(self):
        self.callback: Optional[Callable[[int, int], None]] = None

    def __call__(self, row: int, token: int) -> None:
        if self.callback is not None:
            self.callback(row, token)


# -- responses ---------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Optional[str]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Optional[str]


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None

    @model_serializer
    def _present(self) -> dict:  # a delta carries what changed only (the finish chunk's is {})
        return {name: value for name, value in (("role", self.role), ("content", self.content)) if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class TextCompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Optional[Usage] = None


def _usage(request: ParsedRequest, completions: list[Optional[Completion]]) -> Usage:
    prompt_tokens = sum(len(ids) for ids in request.prompts)
    completion_tokens = sum(c.completion_tokens for c in completions if c is not None)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def response_body(request: ParsedRequest, completions: list[Completion], model_name: str) -> BaseModel:
    """The whole reply (``stream`` false)."""
    created, usage = int(time.time()), _usage(request, completions)
    if request.kind == "chat":
        choices = [ChatChoice(index=index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
                   for index, c in enumerate(completions)]
        return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=created, model=model_name, choices=choices,
                              usage=usage)
    choices = [TextChoice(index=index, text=c.text, finish_reason=c.finish_reason)
               for index, c in enumerate(completions)]
    return TextCompletion(id=f"cmpl-{uuid.uuid4().hex}", created=created, model=model_name, choices=choices,
                          usage=usage)


def _held_back(text: str, stop: list[str]) -> int:
    """How many characters at the end of an unfinished reply's ``text`` must wait for the next tokens: a partly
    decoded character (the replacement character of an incomplete UTF-8 sequence), or the start of a stop
    string, which the reply will leave out if the string completes."""
    held = len(text) - len(text.rstrip("\ufffd"))
    for string in stop:
        for length in range(min(len(string) - 1, len(text)), 0, -1):
            if text.endswith(string[:length]):
                held = max(held, length)
                break
    return held


class ReplyStream:
    """A streamed reply's server-sent events: each choice's new text as it is generated, a chunk per choice that
    advanced, a finish chunk per choice as it ends, then (with ``stream_options.include_usage``) the usage, then
    ``[DONE]``. The texts sent add up to the text the whole reply (``stream`` false) would have."""

    def __init__(self, request: ParsedRequest, model_name: str, tokenizer):
        self.request, self.model_name, self.tokenizer = request, model_name, tokenizer
        self.kind = request.kind
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        self.base = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        replies = len(request.prompts) * request.n
        self.sent = [""] * replies  # the text sent so far, per choice
        self.finished = [False] * replies

    def _chunk(self, index: int, text: Optional[str], finish_reason: Optional[str], first: bool) -> BaseModel:
        if self.kind == "chat":
            delta = ChatDelta(role="assistant" if first else None, content=text)
            return ChatCompletionChunk(**self.base, choices=[ChatChunkChoice(index=index, delta=delta,
                                                                             finish_reason=finish_reason)])
        return TextCompletionChunk(**self.base, choices=[TextChoice(index=index, text=text or "",
                                                                    finish_reason=finish_reason)])

    def text_so_far(self, reply: Optional[Completion], drawn: list[int]) -> str:
        """An unfinished reply's text up to where it cannot change any more: its slices so far and the tokens
        the running slice drew, cut at a completed stop string, less what :func:`_held_back` keeps back."""
        text = reply.text if reply is not None else ""
        if drawn:
            ids = (reply.token_ids if reply is not None else []) + drawn
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = first_stop(text, self.request.stop)
            if cut is not None:
                return text[:cut]
        return text[:len(text) - _held_back(text, self.request.stop)]

    def events(self, snapshot: tuple[list[Optional[Completion]], list[list[int]]]) -> bytes:
        """The events for the replies so far (:meth:`_Pending.snapshot`: each choice's :class:`Completion` or
        None, and the tokens its running slice drew)."""
        replies, drawn = snapshot
        chunks = []
        for index, reply in enumerate(replies):
            if self.finished[index] or (reply is None and not drawn[index]):
                continue
            done = reply is not None and reply.finish_reason is not None
            text = reply.text if done else self.text_so_far(reply, drawn[index])
            new = text[len(self.sent[index]):] if text.startswith(self.sent[index]) else ""
            first = not self.sent[index]
            if new:
                chunks.append(self._chunk(index, new, None, first))
                self.sent[index] += new
            if done:
                self.finished[index] = True
                chunks.append(self._chunk(index, "" if self.kind != "chat" else None, reply.finish_reason,
                                          first and not new))
        return b"".join(_event(chunk) for chunk in chunks)

    def end(self, replies: list[Optional[Completion]]) -> bytes:
        tail = b""
        if self.request.include_usage:
            chunk_class = ChatCompletionChunk if self.kind == "chat" else TextCompletionChunk
            tail = _event(chunk_class(**self.base, choices=[], usage=_usage(self.request, replies)))
        return tail + b"data: [DONE]\n\n"


def _event(chunk: BaseModel) -> bytes:
    return b"data: " + chunk.model_dump_json().encode() + b"\n\n"


# -- metrics -----------------------------------------------------------------------------------------------


class PolicyMetrics:
    """What the server did, in Prometheus' exposition format (``prometheus_client``, a registry per server)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("policy_requests", "Completion requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("policy_prompt_tokens", "Prompt tokens of the requests answered",
                                     registry=self.registry)
        self.completion_tokens = Counter("policy_completion_tokens", "Tokens generated for the requests answered",
                                         registry=self.registry)
        self.latency = Histogram("policy_request_latency_seconds", "Completion request latency (to the last token)",
                                 buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=self.registry)

    def request(self, endpoint: str, status: int, seconds: Optional[float] = None, usage: Optional[Usage] = None):
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        if seconds is not None:
            self.latency.observe(seconds)
        if usage is not None:
            self.prompt_tokens.inc(usage.prompt_tokens)
            self.completion_tokens.inc(usage.completion_tokens)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# -- HTTP --------------------------------------------------------------------------------------------------


def openai_error(status: int, message: str) -> dict:
    """OpenAI's error body."""
    kind = {401: "authentication_error", 404: "not_found_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def make_app(service: CompletionService, tokenizer, model_name: str, max_length: int, token: Optional[str]):
    """The server's FastAPI app, bound to ``service`` and the served model."""
    config = service.config
    app = json_api(openai_error, title="nemo_dvpo policy server")
    ready = app.state.ready
    metrics = PolicyMetrics()

    @app.get("/health")
    def health():
        return JSONResponse({"ready": ready.is_set()}, status_code=200 if ready.is_set() and service.accepting else 503)

    @app.get("/v1/models")
    def models(request: Request):
        authorize(request, token)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "nemo_dvpo",
                                            "max_model_len": max_length}]}

    @app.get("/metrics")
    def metrics_endpoint(request: Request):
        authorize(request, token)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def completion(kind: str, endpoint: str, request: Request):
        started = time.perf_counter()
        try:
            authorize(request, token)
            raw = await read_body(request, config.max_body_bytes)
            if not ready.is_set():
                raise RequestError(503, "the model is still loading")
            parsed = parse_request(kind, parse_json(raw), tokenizer, model_name, max_length, config)
            pending = _Pending(parsed)
            if not parsed.stream:
                completions = await service.wait(pending)
                body = response_body(parsed, completions, model_name)
                metrics.request(endpoint, 200, time.perf_counter() - started, body.usage)
                return Response(body.model_dump_json(), media_type="application/json")
            # The first slice is awaited before the answer starts, so that a request refused or failed by then
            # still gets its status; the rest of the reply follows as it is generated.
            progress = service.progress(pending)
            await anext(progress)
        except RequestError as error:
            metrics.request(endpoint, error.status)
            raise
        stream = ReplyStream(parsed, model_name, tokenizer)

        async def events():
            status = 200
            try:
                yield stream.events(pending.snapshot())
                async for _ in progress:
                    yield stream.events(pending.snapshot())
                service._outcome(pending)
                # The last slice may have finished while the previous chunk was being sent (then the iteration
                # ended without a turn for it): what it added is sent here, once (ReplyStream sends nothing twice).
                yield stream.events(pending.snapshot())
            except RequestError as error:  # the answer has started: the fault ends the stream, as an event
                status = error.status
                yield b"data: " + json.dumps(openai_error(error.status, str(error))).encode() + b"\n\n"
            finally:
                await progress.aclose()  # a client gone: the request is abandoned, not generated further
            yield stream.end(list(pending.replies))
            metrics.request(endpoint, status, time.perf_counter() - started, _usage(parsed, list(pending.replies)))

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await completion("chat", "chat", request)

    @app.post("/v1/completions")
    async def text_completions(request: Request):
        return await completion("completion", "completions", request)

    return app


def serve(cfg: ServePolicyConfig, stop) -> None:
    """Load the policy at the configured layout and serve it until ``stop`` is requested (then all ranks exit)."""
    from megatron.core import parallel_state

    from nemo_dvpo.inference.policy import load_policy, policy_model_config

    token = server_token(cfg.server)
    policy_model_config(cfg.policy)  # a wrong model fails before the port is taken
    policy = load_policy(cfg.policy, cfg.parallel, max_length=cfg.max_sequence_length, precision=cfg.precision,
                         name=cfg.served_model_name)
    tokens = TokenSink()
    runner = ModelParallelRunner(
        lambda rows, sampling, slice_tokens: complete(policy, rows, sampling, slice_tokens, on_token=tokens),
        *model_parallel_group())
    if not runner.is_leader:
        runner.follow()
        return
    service = CompletionService(runner, cfg.server, tokens)
    app = make_app(service, policy.tokenizer, policy.name, policy.max_length, token)
    port = cfg.server.port + parallel_state.get_data_parallel_rank() if cfg.server.port else 0
    front = HTTPFront(app, cfg.server.host, port, name="policy-http")
    front.start()
    front.ready.set()
    layout = f"TP={cfg.parallel.tensor_model_parallel_size}, PP={cfg.parallel.pipeline_model_parallel_size}"
    print(f"[serve_policy] serving {policy.name!r} ({policy.max_length} tokens, {layout}) on "
          f"http://{cfg.server.host}:{front.port}/v1", flush=True)
    serve_until_stopped(service, front, runner, stop)
    print(f"[serve_policy] stopped by {stop.signal_name}: every request in flight was answered", flush=True)
