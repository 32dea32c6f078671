"""The LLM judge: any OpenAI-compatible chat endpoint, called through the ``openai`` package.

Requests run concurrently (``concurrency`` threads). A request that fails for a reason that may pass - a
timeout, a refused connection, HTTP 408/409/429 or 5xx - is retried with exponential backoff; one that
the server refuses for good (another 4xx: a prompt over its context length, an unknown model) is
recorded as failed. A reply the benchmark cannot parse is asked again ``parse_retries`` times (FastChat's
judge retries the same way), then counted as unparseable.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, TypeVar

from nemo_dvpo.utils.errors import ConfigError, NemoDvpoError

T = TypeVar("T")
R = TypeVar("R")

# A rough count of tokens per character of English text (OpenAI's rule of thumb is 4 characters a token),
# used only for the estimate printed before judging.
TOKENS_PER_CHARACTER = 0.25


@dataclass
class JudgeConfig:
    # The OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 or http://127.0.0.1:8001/v1
    # (examples/serve_policy.py); null means no judging (answers and IFEval only).
    base_url: Optional[str] = None
    # The judge model's name as the endpoint knows it; recorded with every score.
    model: str = "gpt-4.1"
    # Environment variable holding the API key (a local server without a token accepts any).
    api_key_env: str = "OPENAI_API_KEY"
    # Requests in flight at once.
    concurrency: int = 8
    # Seconds before one request is abandoned (and retried).
    timeout_s: float = 300.0
    # Retries of a request that failed for a passing reason, waiting backoff_s, 2 backoff_s, 4 backoff_s ...
    max_retries: int = 6
    backoff_s: float = 2.0
    # Further requests when the reply cannot be parsed (FastChat's judge retries unparseable ratings).
    parse_retries: int = 2
    # Sampling of the judge: FastChat and arena-hard-auto judge at temperature 0.
    temperature: float = 0.0
    # Longest judgment; null lets each benchmark use its own (MT-Bench 2048, Arena-Hard 16000,
    # AlpacaEval 2 asks for one identifier token but some servers need room for a preamble: 8).
    max_tokens: Optional[int] = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ConfigError(f"judge.concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0 or self.parse_retries < 0:
            raise ConfigError("judge.max_retries and judge.parse_retries must be >= 0")
        if self.timeout_s <= 0 or self.backoff_s < 0:
            raise ConfigError("judge.timeout_s must be > 0 and judge.backoff_s >= 0")


class JudgeFailed(Exception):
    """The endpoint refused the request for good (a 4xx other than 408/409/429); recorded, not retried."""


class JudgeUnavailable(Exception):
    """Every retry of a request failed for a passing reason; the judgment is left for the next run."""


@dataclass
class Reply:
    text: str
    attempts: int  # requests made, retries included
    prompt_tokens: int
    completion_tokens: int


def estimate_tokens(text: str) -> int:
    return int(len(text) * TOKENS_PER_CHARACTER) + 1


class JudgeClient:
    """Chat completions from the judge, with concurrency, timeouts, retries and backoff."""

    def __init__(self, config: JudgeConfig, client=None, sleep: Callable[[float], None] = time.sleep):
        if not config.base_url and client is None:
            raise ConfigError("no judge: give --judge-base-url (an OpenAI-compatible endpoint)")
        self.config = config
        self.sleep = sleep
        if client is None:
            import openai

            # A local server without a token accepts any key; the openai package refuses an empty one.
            api_key = os.environ.get(config.api_key_env) or "no-key"
            client = openai.OpenAI(base_url=config.base_url, api_key=api_key, timeout=config.timeout_s,
                                   max_retries=0)
        self.client = client
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def describe(self) -> dict:
        """What is recorded with every score."""
        return {"model": self.config.model, "base_url": self.config.base_url, "temperature": self.config.temperature}

    def complete(self, messages: list[dict], max_tokens: int) -> Reply:
        """One chat completion; retries passing failures with exponential backoff."""
        import openai

        max_tokens = self.config.max_tokens or max_tokens
        last_error = None
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self.sleep(self.config.backoff_s * 2 ** (attempt - 1))
            try:
                self.requests += 1
                response = self.client.chat.completions.create(
                    model=self.config.model, messages=messages, temperature=self.config.temperature,
                    max_tokens=max_tokens)
            except openai.APIStatusError as error:
                if error.status_code in (408, 409, 429) or error.status_code >= 500:
                    last_error = f"HTTP {error.status_code}: {_message(error)}"
                    continue
                raise JudgeFailed(f"HTTP {error.status_code}: {_message(error)}") from None
            except (openai.APIConnectionError, openai.APITimeoutError) as error:
                last_error = f"{type(error).__name__}: {error}"
                continue
            text = response.choices[0].message.content or ""
            usage = getattr(response, "usage", None)
            prompt_tokens = getattr(usage, "prompt_tokens", None) or sum(
                estimate_tokens(m["content"]) for m in messages)
            completion_tokens = getattr(usage, "completion_tokens", None) or estimate_tokens(text)
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            return Reply(text, attempt + 1, prompt_tokens, completion_tokens)
        raise JudgeUnavailable(f"{self.config.base_url} failed {self.config.max_retries + 1} times, last: {last_error}")

    def judge(self, messages: list[dict], parse: Callable[[str], Optional[T]], max_tokens: int) -> dict:
        """Ask until ``parse`` reads the reply (at most ``1 + parse_retries`` times).

        Returns ``{"judgment", "parsed", "requests"}`` (``parsed`` None when no reply could be read), or
        ``{"error", "requests"}`` when the endpoint refused the request for good.
        """
        requests = 0
        text = ""
        for _ in range(self.config.parse_retries + 1):
            try:
                reply = self.complete(messages, max_tokens)
            except JudgeFailed as failed:
                return {"error": str(failed), "requests": requests + 1}
            requests += reply.attempts
            text = reply.text
            parsed = parse(text)
            if parsed is not None:
                return {"judgment": text, "parsed": parsed, "requests": requests}
        return {"judgment": text, "parsed": None, "requests": requests}

    def map(self, work: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[T, Optional[R], Optional[str]]]:
        """``(item, work(item), None)`` as each finishes, ``(item, None, why)`` when the judge stayed away."""
        items = list(items)
        with ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="judge") as pool:
            futures = {pool.submit(work, item): item for item in items}
            for future in as_completed(futures):
                try:
                    yield futures[future], future.result(), None
                except JudgeUnavailable as unavailable:
                    yield futures[future], None, str(unavailable)


def _message(error) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("message", inner))
        return str(inner)
    return str(error)


def plan_message(benchmark: str, requests: int, prompt_characters: int, max_tokens: int, parse_retries: int) -> str:
    """The size of a judging job, printed before it starts."""
    prompt_tokens = int(prompt_characters * TOKENS_PER_CHARACTER)
    return (f"[{benchmark}] judging: {requests} requests (up to {requests * (1 + parse_retries)} with re-asks of "
            f"unparseable replies), about {prompt_tokens:,} prompt tokens and at most {requests * max_tokens:,} "
            f"completion tokens")


def require_judge(config: JudgeConfig) -> None:
    if not config.base_url:
        raise NemoDvpoError("this benchmark needs a judge: give --judge-base-url (an OpenAI-compatible endpoint)")
