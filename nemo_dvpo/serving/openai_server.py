"""A policy as an OpenAI-compatible server, over Megatron inference, for evaluation and judging.

    python examples/serve_policy.py policy=smollm2_135m server.port=8001
    torchrun --nproc-per-node 2 examples/serve_policy.py policy=CHECKPOINT parallel.tensor_model_parallel_size=2

Endpoints (the subset of OpenAI's API that the ``openai`` client and evaluation harnesses use):

* ``GET /v1/models`` - the one served model; ``GET /health`` - 200 once the model is loaded;
* ``POST /v1/chat/completions`` - ``messages`` through the tokenizer's chat template;
* ``POST /v1/completions`` - raw text ``prompt`` (a string or a list of strings).

Both take ``temperature`` (0 is greedy; default 1; finite), ``top_p``, ``max_tokens`` (clamped to the room the
prompt leaves in the model's length; the reply then ends with ``finish_reason="length"``), ``stop`` (a
string or up to four), ``n`` (samples per prompt; prompts x n at most ``server.max_batch_rows``), ``seed`` and
``stream``. A streamed reply is sent as
server-sent events once it is complete - one content chunk per choice, then ``[DONE]``: the static-batch
generation produces the whole reply at once, so the stream is well-formed but not incremental. Fields
the server cannot honour (``logprobs``, ``tools``, ``response_format``, ``echo``, ...) are refused with a 400
naming them, never ignored; so is a prompt that does not fit the model's length.

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

This module owns the settings, the endpoints, the parsing of a request, the response bodies and the batching
policy (equal sampling settings, up to a number of replies); the HTTP front and handler plumbing, the request
queue and its run loop, and the leader/follower loop across model-parallel ranks are
:mod:`nemo_dvpo.serving.http`'s, shared with the GVM server.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from nemo_dvpo.inference.completion import Completion, CompletionRequest, complete, room_for_reply
from nemo_dvpo.inference.generation import SamplingConfig
from nemo_dvpo.serving.http import (UNFINISHED, BatchingService, HTTPFront, JSONHandler, ModelParallelRunner, Pending,
                                    check_server_settings, model_parallel_group, serve_until_stopped, server_token)
from nemo_dvpo.serving.kserve import RequestError, parse_json
from nemo_dvpo.utils.distributed import ParallelConfig
from nemo_dvpo.utils.errors import ConfigError, NemoDvpoError


@dataclass
class PolicyServerConfig:
    # Interface and port; data-parallel replica r listens on port + r. A host other than loopback needs
    # a bearer token (the environment variable ``token_env``) or allow_unauthenticated.
    host: str = "127.0.0.1"
    port: int = 8001
    token_env: str = "NEMO_DVPO_POLICY_TOKEN"
    allow_unauthenticated: bool = False
    # Batching: wait up to max_delay_ms after a request for others with the same sampling settings,
    # merging up to max_batch_rows replies into one generation (also the most replies one request may ask).
    max_delay_ms: float = 10.0
    max_batch_rows: int = 32
    # Replies are generated this many tokens at a time, the queue served in between, so that a long reply
    # holds a short request for one slice only (0: each batch runs to its longest reply, as before).
    slice_tokens: int = 256
    # Reply length when a request gives no max_tokens (clamped to the room its prompt leaves).
    default_max_tokens: int = 512
    # Largest request body, and the most samples one request may ask for.
    max_body_bytes: int = 16 * 2**20
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

_COMMON_FIELDS = {"model", "temperature", "top_p", "max_tokens", "stop", "n", "seed", "stream", "stream_options",
                  "user", "presence_penalty", "frequency_penalty", "metadata", "store"}
_CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs"}
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "logprobs", "echo", "best_of"}


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


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(400, f"'{name}' must be a finite number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        raise RequestError(400, f"'{name}' must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return float(value)


def _integer(body: dict, name: str, default: Optional[int], low: int, high: Optional[int] = None) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise RequestError(400, f"'{name}' must be an integer {bound}, got {value!r}")
    return value


def _encodable(text: str, where: str) -> str:
    """``text`` if it is valid Unicode; JSON's escapes can carry lone surrogates ("\\ud800") that no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RequestError(400, f"{where} is not valid Unicode ({error.reason} at character {error.start})") from None
    return text


def _message_text(message: Any, index: int) -> tuple[str, str]:
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
        raise RequestError(400, f"messages[{index}] must be an object with a role of system, user or assistant")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text can be served
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(400, f"messages[{index}].content: only text parts are supported")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise RequestError(400, f"messages[{index}].content must be a string")
    return message["role"], _encodable(content, f"messages[{index}].content")


def parse_request(kind: str, body: Any, tokenizer, model_name: str, max_length: int,
                  config: PolicyServerConfig) -> ParsedRequest:
    """Validate a chat or completion request and tokenize its prompts; a fault is a RequestError (4xx)."""
    from nemo_dvpo.inference.chat import apply_chat_template

    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    known = _CHAT_FIELDS if kind == "chat" else _COMPLETION_FIELDS
    unsupported = sorted(set(body) - known)
    if unsupported:
        raise RequestError(400, f"unsupported field(s): {', '.join(unsupported)}")
    if body.get("logprobs") not in (None, False, 0):
        raise RequestError(400, "'logprobs' is not supported by this server")
    if body.get("echo") or body.get("best_of") not in (None, 1):
        raise RequestError(400, "'echo' and 'best_of' are not supported by this server")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise RequestError(400, f"'{name}' is not supported by this server (only 0)")
    if body.get("model") != model_name:
        raise RequestError(404, f"the model {body.get('model')!r} does not exist; this server serves {model_name!r}")
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' must be a non-empty list")
        chat = [dict(zip(("role", "content"), _message_text(message, index))) for index, message in enumerate(messages)]
        try:
            prompts = [apply_chat_template(tokenizer, chat)]
        except NemoDvpoError as error:
            raise RequestError(400, str(error)) from None
    else:
        prompt = body.get("prompt")
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
            raise RequestError(400, "'prompt' must be a string or a non-empty list of strings")
        prompts = [tokenizer(_encodable(text, f"prompt[{index}]"))["input_ids"] for index, text in enumerate(texts)]
        if any(not ids for ids in prompts):
            raise RequestError(400, "a prompt is empty")
    for ids in prompts:
        if room_for_reply(len(ids), max_length) < 1:
            raise RequestError(400, f"this model's maximum context length is {max_length} tokens; the prompt has "
                                    f"{len(ids)} tokens, leaving no room for a reply")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    n = _integer(body, "n", 1, 1, config.max_n)
    if len(prompts) * n > config.max_batch_rows:
        raise RequestError(400, f"the request asks for {len(prompts) * n} replies ({len(prompts)} prompt(s) x n={n}); "
                                f"this server answers at most {config.max_batch_rows} per request "
                                "(server.max_batch_rows): send them as several requests")
    requested = _integer(body, "max_completion_tokens", None, 1) if kind == "chat" else None
    requested = _integer(body, "max_tokens", requested, 1)
    max_tokens = [min(requested or config.default_max_tokens, room_for_reply(len(ids), max_length)) for ids in prompts]
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "'stop' must be a non-empty string or a list of up to 4 of them")
    seed = _integer(body, "seed", None, 0, 2**63 - 1)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false")
    try:
        sampling = SamplingConfig(temperature=temperature, top_p=top_p, greedy=temperature == 0, seed=seed or 0)
    except NemoDvpoError as error:  # what the sampler refuses is the request's fault
        raise RequestError(400, str(error)) from None
    return ParsedRequest(kind=kind, prompts=prompts, n=n, max_tokens=max_tokens, stop=stop, sampling=sampling,
                         stream=stream, seeded=seed is not None)


# -- the batching service ----------------------------------------------------------------------------------


@dataclass
class _Pending(Pending):
    request: ParsedRequest
    # One entry per reply (prompt-major, n per prompt): None until its first slice, then its reply so far.
    replies: list[Optional[Completion]] = field(default_factory=list)
    slices: int = 0  # slices run so far

    def __post_init__(self) -> None:
        self.replies = [None] * (len(self.request.prompts) * self.request.n)

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

    def __init__(self, complete_fn: CompleteFn, config: PolicyServerConfig):
        super().__init__(config)
        self.complete_fn = complete_fn
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
        completions = iter(self.complete_fn(rows, sampling, self.config.slice_tokens or None))
        answers = []
        for pending in batch:
            for index in pending.unfinished:
                pending.replies[index] = next(completions)
            pending.slices += 1
            answers.append(UNFINISHED if pending.unfinished else pending.replies)
        return answers


# -- responses ---------------------------------------------------------------------------------------------


def response_body(request: ParsedRequest, completions: list[Completion], model_name: str) -> dict:
    created = int(time.time())
    usage = {"prompt_tokens": sum(len(ids) for ids in request.prompts),
             "completion_tokens": sum(c.completion_tokens for c in completions)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    if request.kind == "chat":
        choices = [{"index": index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                    "finish_reason": c.finish_reason} for index, c in enumerate(completions)]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created,
                "model": model_name, "choices": choices, "usage": usage}
    choices = [{"index": index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
               for index, c in enumerate(completions)]
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created, "model": model_name,
            "choices": choices, "usage": usage}


def stream_events(request: ParsedRequest, body: dict) -> bytes:
    """The complete reply as server-sent events: a content chunk and a finish chunk per choice, then [DONE]."""
    chunks = []
    base = {key: body[key] for key in ("id", "created", "model")}
    for choice in body["choices"]:
        if request.kind == "chat":
            base["object"] = "chat.completion.chunk"
            delta = {"role": "assistant", "content": choice["message"]["content"]}
            content = {"index": choice["index"], "delta": delta, "logprobs": None, "finish_reason": None}
            finish = {"index": choice["index"], "delta": {}, "logprobs": None, "finish_reason": choice["finish_reason"]}
        else:
            base["object"] = "text_completion"
            content = {"index": choice["index"], "text": choice["text"], "logprobs": None, "finish_reason": None}
            finish = {"index": choice["index"], "text": "", "logprobs": None, "finish_reason": choice["finish_reason"]}
        chunks += [{**base, "choices": [content]}, {**base, "choices": [finish]}]
    events = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    return events.encode()


# -- HTTP --------------------------------------------------------------------------------------------------


def make_handler(service: CompletionService, tokenizer, model_name: str, max_length: int, token: Optional[str]):
    """A request handler class bound to ``service`` and the served model."""
    config = service.config

    class Handler(JSONHandler):
        server_version = "nemo_dvpo-policy"
        bearer_token = token
        max_body_bytes = config.max_body_bytes

        def _error_payload(self, status: int, message: str) -> dict:
            kind = {401: "authentication_error", 404: "not_found_error"}.get(
                status, "invalid_request_error" if status < 500 else "server_error")
            return {"error": {"message": message, "type": kind, "param": None, "code": None}}

        def _get(self) -> None:
            path, ready = self._path(), self.server.ready
            if path == "/health":
                return self._json(200 if ready.is_set() and service.accepting else 503, {"ready": ready.is_set()})
            if not self._authorized():
                return None
            if path == "/v1/models":
                return self._json(200, {"object": "list", "data": [
                    {"id": model_name, "object": "model", "created": 0, "owned_by": "nemo_dvpo",
                     "max_model_len": max_length}]})
            return self._error(404, f"no such endpoint: GET {path}")

        def _post(self) -> None:
            path = self._path()
            raw = self._read_body()
            if raw is None or not self._authorized():
                return None
            kinds = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
            if path not in kinds:
                return self._error(404, f"no such endpoint: POST {path}")
            try:
                if not self.server.ready.is_set():
                    raise RequestError(503, "the model is still loading")
                body = parse_json(raw)
                request = parse_request(kinds[path], body, tokenizer, model_name, max_length, config)
                completions = service.submit(request)
            except RequestError as error:
                return self._error(error.status, str(error))
            payload = response_body(request, completions, model_name)
            if request.stream:
                return self._send(200, stream_events(request, payload), {"Content-Type": "text/event-stream"})
            return self._json(200, payload)

    return Handler


def serve(cfg: ServePolicyConfig, stop) -> None:
    """Load the policy at the configured layout and serve it until ``stop`` is requested (then all ranks exit)."""
    from megatron.core import parallel_state

    from nemo_dvpo.inference.policy import load_policy, policy_model_config

    token = server_token(cfg.server)
    policy_model_config(cfg.policy)  # a wrong model fails before the port is taken
    policy = load_policy(cfg.policy, cfg.parallel, max_length=cfg.max_sequence_length, precision=cfg.precision,
                         name=cfg.served_model_name)
    runner = ModelParallelRunner(
        lambda rows, sampling, slice_tokens: complete(policy, rows, sampling, slice_tokens), *model_parallel_group())
    if not runner.is_leader:
        runner.follow()
        return
    service = CompletionService(runner, cfg.server)
    handler = make_handler(service, policy.tokenizer, policy.name, policy.max_length, token)
    port = cfg.server.port + parallel_state.get_data_parallel_rank() if cfg.server.port else 0
    front = HTTPFront(handler, cfg.server.host, port, name="policy-http")
    front.start()
    front.ready.set()
    layout = f"TP={cfg.parallel.tensor_model_parallel_size}, PP={cfg.parallel.pipeline_model_parallel_size}"
    print(f"[serve_policy] serving {policy.name!r} ({policy.max_length} tokens, {layout}) on "
          f"http://{cfg.server.host}:{front.port}/v1", flush=True)
    serve_until_stopped(service, front, runner, stop)
    print(f"[serve_policy] stopped by {stop.signal_name}: every request in flight was answered", flush=True)
