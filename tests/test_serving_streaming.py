"""The policy server streams a reply as it is generated, and both servers' /metrics parse as Prometheus' format.

The servers run in this process with a stand-in model (as in tests/test_server_faults.py); the endpoints,
streaming, batching and metrics are the real ones. The stand-in writes one token per slice here
(``server.slice_tokens=1``), so a streamed reply of k tokens is k content chunks, and it can hold a slice
back until the client has read what came before: a chunk that arrives while the next slice is held was sent
before the generation ended.
"""

from __future__ import annotations

import json
import threading

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nemo_dvpo.inference.completion import Completion
from nemo_dvpo.serving.gvm_server import HTTPFront as GVMFront
from nemo_dvpo.serving.gvm_server import ServerConfig, ValueService
from nemo_dvpo.serving.http import HTTPFront
from nemo_dvpo.serving.openai_server import CompletionService, PolicyServerConfig, TokenSink, make_app
from tests.test_server_faults import _kserve, _serving

WORDS = ["alpha", " beta", " gamma", " delta", " epsilon", " zeta", " eta", " theta"]


class _WordPolicy:
    """``complete_fn`` of a model whose reply is WORDS in order, one per token, cut before a stop string as
    :func:`nemo_dvpo.inference.completion.complete` cuts; ``gates[k]`` holds the call that would write token k
    until it is set. ``produced`` counts the tokens written."""

    def __init__(self):
        self.produced = 0
        self.gates: dict[int, threading.Event] = {}

    def __call__(self, rows, sampling, slice_tokens):
        completions = []
        for row in rows:
            start = len(row.reply_ids)
            if start in self.gates:
                assert self.gates[start].wait(30), "the client never read the chunks before this slice"
            new = min(row.max_tokens - start, slice_tokens or 10**9)
            token_ids = row.reply_ids + list(range(start, start + new))
            self.produced += new
            text = "".join(WORDS[i % len(WORDS)] for i in token_ids)
            finish_reason = "length" if len(token_ids) >= row.max_tokens else None
            cuts = [text.find(stop) for stop in row.stop if stop in text]
            if cuts:
                text, finish_reason = text[:min(cuts)], "stop"
            completions.append(Completion(text=text, finish_reason=finish_reason, prompt_tokens=len(row.prompt_ids),
                                          completion_tokens=len(token_ids), token_ids=token_ids))
        return completions


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.models.sources import load_tokenizer

    return load_tokenizer(load_model_config("tiny").tokenizer_source)


@pytest.fixture(scope="module")
def tiny_policy(megatron_single_rank):
    """The tiny preset (random weights) loaded by the one policy loader."""
    from nemo_dvpo.inference.policy import load_policy
    from nemo_dvpo.utils.distributed import ParallelConfig

    return load_policy("tiny", ParallelConfig(), max_length=64)


@pytest.fixture
def word_server(tiny_tokenizer):
    model = _WordPolicy()
    service = CompletionService(model, PolicyServerConfig(max_delay_ms=0, slice_tokens=1))
    app = make_app(service, tiny_tokenizer, "tiny", 4096, token=None)
    with _serving(service, HTTPFront(app, "127.0.0.1", 0)) as port:
        yield model, f"http://127.0.0.1:{port}"


def _events(response: httpx.Response):
    """The JSON payloads of a server-sent-event stream, as they arrive, up to ``[DONE]``."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            if data == "[DONE]":
                return
            yield json.loads(data)
    raise AssertionError("the stream ended without [DONE]")


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_a_streamed_reply_arrives_a_chunk_per_token_while_it_is_generated(word_server, kind):
    model, url = word_server
    tokens = 6
    # Token k is not made until the client has read k chunks: each chunk was sent before the next token existed.
    for k in range(1, tokens):
        model.gates[k] = threading.Event()
    if kind == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}
    else:
        path, body = "/v1/completions", {"prompt": "hi"}
    body |= {"model": "tiny", "max_tokens": tokens, "temperature": 0, "stream": True,
             "stream_options": {"include_usage": True}}
    texts, finishes, usage = [], [], None
    with httpx.stream("POST", url + path, json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for event in _events(response):
            assert "error" not in event, event
            if not event["choices"]:
                usage = event["usage"]
                continue
            choice = event["choices"][0]
            text = choice["delta"].get("content") if kind == "chat" else choice["text"]
            if text:
                texts.append(text)
                assert model.produced == len(texts)  # this chunk arrived before the next token was made
                if len(texts) < tokens:
                    model.gates[len(texts)].set()
            if choice["finish_reason"] is not None:
                finishes.append(choice["finish_reason"])
    assert texts == WORDS[:tokens], "not one chunk per token, in order"
    assert finishes == ["length"] and usage["completion_tokens"] == tokens
    whole = httpx.post(url + path, json={**body, "stream": False}, timeout=60).json()["choices"][0]
    assert "".join(texts) == (whole["message"]["content"] if kind == "chat" else whole["text"])


class _DrawingPolicy:
    """``complete_fn`` of a model that draws its whole reply in ONE call (no slices), announcing each token through
    the server's :class:`TokenSink` as ``complete(on_token=...)`` does; ``gates[k]`` holds token k's draw."""

    def __init__(self, tokenizer, sink: TokenSink, words: list[str]):
        self.tokenizer, self.sink = tokenizer, sink
        self.ids = [tokenizer.encode(word, add_special_tokens=False)[0] for word in words]
        self.gates: dict[int, threading.Event] = {}
        self.drawn = 0

    def __call__(self, rows, sampling, slice_tokens):
        for k, token in enumerate(self.ids):
            if k in self.gates:
                assert self.gates[k].wait(30), "the client never read the chunk before this token"
            self.drawn += 1
            for row in range(len(rows)):
                self.sink(row, token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return [Completion(text=text, finish_reason="length", prompt_tokens=len(row.prompt_ids),
                           completion_tokens=len(self.ids), token_ids=list(self.ids)) for row in rows]


def test_tokens_stream_one_by_one_from_inside_a_single_generation_call(tiny_tokenizer):
    """No slicing (server.slice_tokens=0): the reply is one call of the model, and its tokens still reach the
    client one chunk each, each before the next token is drawn."""
    words = [" one", " two", " three", " four", " five"]
    sink = TokenSink()
    model = _DrawingPolicy(tiny_tokenizer, sink, words)
    if [tiny_tokenizer.decode([i]) for i in model.ids] != words:
        pytest.skip("the tiny tokenizer does not spell these words as one token each")
    for k in range(1, len(words)):
        model.gates[k] = threading.Event()
    service = CompletionService(model, PolicyServerConfig(max_delay_ms=0, slice_tokens=0), sink)
    app = make_app(service, tiny_tokenizer, "tiny", 4096, token=None)
    body = {"model": "tiny", "prompt": "hi", "max_tokens": len(words), "temperature": 0, "stream": True}
    texts = []
    with _serving(service, HTTPFront(app, "127.0.0.1", 0)) as port:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as response:
            for event in _events(response):
                text = event["choices"][0]["text"]
                if text:
                    texts.append(text)
                    assert model.drawn == len(texts)  # sent before the next token was drawn
                    if len(texts) < len(words):
                        model.gates[len(texts)].set()
    assert texts == words and service.batches == 1


def test_complete_announces_each_drawn_token_within_the_rows_own_max_tokens(tiny_policy):
    """The real generation loop's per-step hook: every token of every reply announced once, in order, and none
    past a row's own max_tokens although the batch runs to its longest row."""
    from nemo_dvpo.inference.completion import CompletionRequest, complete
    from nemo_dvpo.inference.generation import SamplingConfig

    prompt = tiny_policy.tokenizer.encode("Name a colour.")
    requests = [CompletionRequest(prompt, 3, []), CompletionRequest(prompt, 7, [])]
    announced: dict[int, list[int]] = {0: [], 1: []}
    replies = complete(tiny_policy, requests, SamplingConfig(greedy=True, max_new_tokens=7),
                       on_token=lambda row, token: announced[row].append(token))
    assert [announced[row] for row in (0, 1)] == [reply.token_ids for reply in replies]
    assert len(announced[0]) <= 3 and replies[1].token_ids[:len(announced[0])] == announced[0]


def test_a_stream_holds_back_the_start_of_a_stop_string_until_it_is_decided(word_server):
    """The reply is cut before its stop string (" beta gam"), which starts in token 1 and completes in token 2:
    the stream must not have sent token 1's " beta" in the meantime."""
    _, url = word_server
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 6, "temperature": 0, "stream": True, "stop": [" beta gam"]}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        events = list(_events(response))
    text = "".join(event["choices"][0]["text"] for event in events)
    assert text == "alpha" and events[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_malformed_streaming_request_gets_its_status_before_any_event(word_server):
    _, url = word_server
    answer = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "stream": True,
                                                        "temperature": 5}, timeout=60)
    message = answer.json()["error"]["message"]
    assert answer.status_code == 400 and "'temperature' must be in [0.0, 2.0], got 5" in message


def _families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_the_gvm_server_metrics_parse_and_count_what_it_did():
    service = ValueService(lambda tokens, lengths: tokens.astype(np.float32), vocab_size=1000, max_length=100,
                           config=ServerConfig(max_delay_ms=0))
    with _serving(service, GVMFront(service, dict, "127.0.0.1", 0, token=None)) as port:
        url = f"http://127.0.0.1:{port}"
        for rows in (1, 3):
            request = _kserve(tokens=[[1, 2]] * rows, lengths=[2] * rows)
            assert httpx.post(url + "/v2/models/gvm/infer", json=request, timeout=60).status_code == 200
        assert httpx.post(url + "/v2/models/gvm/infer", content=b"{", timeout=60).status_code == 400
        answer = httpx.get(url + "/metrics", timeout=60)
    assert answer.headers["content-type"].startswith("text/plain")
    families = _families(answer.text)
    requests = {sample.labels["status"]: sample.value for sample in families["gvm_requests"].samples
                if sample.name == "gvm_requests_total"}
    assert requests == {"200": 2.0, "400": 1.0}
    assert [s.value for s in families["gvm_sequences"].samples if s.name == "gvm_sequences_total"] == [4.0]
    batches = {s.labels.get("le"): s.value for s in families["gvm_batch_sequences"].samples
               if s.name == "gvm_batch_sequences_bucket"}
    assert batches["1.0"] == 1 and batches["2.0"] == 1 and batches["4.0"] == 2 and batches["+Inf"] == 2
    latency = {s.name: s.value for s in families["gvm_request_latency_seconds"].samples}
    assert latency["gvm_request_latency_seconds_count"] == 2 and latency["gvm_request_latency_seconds_sum"] > 0


def test_the_policy_server_metrics_parse_and_count_tokens(word_server):
    _, url = word_server
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0}
    usage = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["usage"]
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        list(_events(response))
    assert httpx.post(url + "/v1/completions", json={**body, "n": 0}, timeout=60).status_code == 400
    families = _families(httpx.get(url + "/metrics", timeout=60).text)
    requests = {(s.labels["endpoint"], s.labels["status"]): s.value for s in families["policy_requests"].samples
                if s.name == "policy_requests_total"}
    assert requests == {("completions", "200"): 2.0, ("completions", "400"): 1.0}
    generated = [s.value for s in families["policy_completion_tokens"].samples
                 if s.name == "policy_completion_tokens_total"]
    assert generated == [2.0 * usage["completion_tokens"]] and usage["completion_tokens"] == 3


def test_a_stop_finishes_the_streams_in_flight_then_refuses_new_requests(tiny_tokenizer):
    """What SIGTERM does (serve_until_stopped): the service generates what is queued to its end - a reply being
    streamed included - then stops accepting (a 503), and the front closes."""
    model = _WordPolicy()
    for k in range(1, 5):  # token k waits for the client to read k chunks
        model.gates[k] = threading.Event()
    service = CompletionService(model, PolicyServerConfig(max_delay_ms=0, slice_tokens=1))
    front = HTTPFront(make_app(service, tiny_tokenizer, "tiny", 4096, token=None), "127.0.0.1", 0)
    front.start()
    front.ready.set()
    stopping = threading.Event()
    loop = threading.Thread(target=service.run, args=(stopping.is_set,))
    loop.start()
    url = f"http://127.0.0.1:{front.port}/v1/completions"
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 5, "temperature": 0, "stream": True}
    try:
        texts = []
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            for event in _events(response):
                assert "error" not in event, event
                texts.append(event["choices"][0]["text"])
                if len(texts) == 2:  # the stop comes mid-reply
                    stopping.set()
                if len(texts) < 5:
                    model.gates[len(texts)].set()
        assert "".join(texts) == "".join(WORDS[:5])
        loop.join(30)
        assert not loop.is_alive()
        refused = httpx.post(url, json={**body, "stream": False}, timeout=60)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    finally:
        stopping.set()
        for gate in model.gates.values():
            gate.set()
        loop.join()
        front.close()
    assert not front.thread.is_alive()
