"""Both servers answer every request, whatever the client sends or does, and a long reply does not hold a short one.

The servers run in this process with a stand-in model (``score`` / ``complete_fn``), so each malformed body,
each hang-up and each scheduling case is cheap; the endpoints, parsing, handler plumbing and batching are the
real ones. A raw socket client reads the status line itself, so "no HTTP response at all" (a dropped
connection) is told apart from an error answer.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

from nemo_dvpo.inference.completion import Completion, CompletionRequest
from nemo_dvpo.serving.gvm_server import HTTPFront as GVMFront
from nemo_dvpo.serving.gvm_server import ServerConfig, ValueService
from nemo_dvpo.serving.http import HTTPFront
from nemo_dvpo.serving.openai_server import CompletionService, PolicyServerConfig, make_app, parse_request

INFER = "/v2/models/gvm/infer"


def _raw_request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                 timeout: float = 30, raw_head: bytes | None = None) -> tuple[int, bytes]:
    """Send one request over a fresh socket (``raw_head``: these bytes as they are) and return ``(status, body)``;
    fails if the server closes the connection without a status line."""
    headers = {"Content-Length": str(len(body)), **(headers or {})}
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw_head if raw_head is not None else head.encode() + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1."), f"no HTTP response, the connection was closed: {received[:200]!r}"
    status_line, _, rest = received.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@contextmanager
def _serving(service, front):
    front.start()
    front.ready.set()
    stopping = threading.Event()
    loop = threading.Thread(target=service.run, args=(stopping.is_set,))
    loop.start()
    try:
        yield front.port
    finally:
        stopping.set()
        loop.join()
        front.close()


@pytest.fixture(scope="module")
def gvm_port():
    def score(tokens, lengths):
        if (tokens == 666).any():
            raise RuntimeError("CUDA out of memory (simulated)")
        return tokens.astype(np.float32) / 2

    def metadata():
        raise KeyError("value_stats")  # a server bug on one endpoint must still be answered

    service = ValueService(score, vocab_size=1000, max_length=100, config=ServerConfig(max_delay_ms=0))
    with _serving(service, GVMFront(service, metadata, "127.0.0.1", 0, token=None)) as port:
        yield port


def _kserve(tokens=((1, 2),), lengths=(2,), **changes) -> dict:
    request = {"inputs": [{"name": "tokens", "shape": [len(tokens), len(tokens[0])], "datatype": "INT64",
                           "data": [list(row) for row in tokens]},
                          {"name": "lengths", "shape": [len(lengths)], "datatype": "INT64", "data": list(lengths)}]}
    for where, value in changes.items():
        target = request if where == "top" else request["inputs"][int(where[1:])]
        target.update(value)
    return request


def _nested(depth: int):
    value = [1]
    for _ in range(depth - 1):
        value = [value]
    return value


GVM_FAULTS = {
    "request parameters not an object": (_kserve(top={"parameters": [1]}), "the request.parameters must be an object"),
    "input parameters not an object": (_kserve(i0={"parameters": "binary"}), "inputs[0].parameters must be an object"),
    "output parameters not an object": (_kserve(top={"outputs": [{"name": "values", "parameters": 7}]}),
                                        "outputs[0].parameters must be an object"),
    "outputs not a list": (_kserve(top={"outputs": {"name": "values"}}), "'outputs' must be a list of objects"),
    "ragged data": (_kserve(i0={"shape": [2, 2], "data": [[1, 2], 3]}), "values do not fill shape [2, 2] (at depth 1: a single value where 2 are needed)"),
    "ragged rows": (_kserve(i0={"shape": [2, 2], "data": [[1, 2], [3]]}), "at depth 1: a row of 1 where 2 are needed"),
    "shape product past int64": (_kserve(i0={"shape": [4294967296, 4294967296], "data": [1, 2]}),
                                 "2 values do not fill shape [4294967296, 4294967296]"),
    "nested shape product past int64": (_kserve(i0={"shape": [4294967296, 4294967296]}),
                                        "at depth 0: a row of 1 where 4294967296 are needed"),
    "too many dimensions": (_kserve(i0={"shape": [1] * 65, "data": [1]}), "at most 8 non-negative integers"),
    "data nested 900 deep": (_kserve(i0={"shape": [1, 1], "data": _nested(900)}), "nested deeper than its shape"),
    "binary size a boolean": (_kserve(i0={"parameters": {"binary_data_size": True}}), "binary_data_size=True"),
    "datatype not a string": (_kserve(i0={"datatype": ["INT64"]}), "is not one of INT64"),
}


@pytest.mark.parametrize("case", list(GVM_FAULTS))
def test_every_malformed_kserve_request_gets_a_400_naming_the_field(gvm_port, case):
    request, message = GVM_FAULTS[case]
    status, body = _raw_request(gvm_port, "POST", INFER, json.dumps(request).encode())
    assert status == 400 and message in json.loads(body)["error"], body[:500]
    status, body = _raw_request(gvm_port, "POST", INFER, json.dumps(_kserve()).encode())
    assert status == 200 and json.loads(body)["outputs"][0]["data"] == [0.5, 1.0]


def test_a_body_nested_past_the_recursion_limit_is_a_400_on_both_servers(gvm_port, policy_port):
    deep = b"[" * 100_000 + b"]" * 100_000
    status, body = _raw_request(gvm_port, "POST", INFER, deep)
    assert status == 400 and "nested too deeply" in json.loads(body)["error"]
    status, body = _raw_request(policy_port, "POST", "/v1/completions", b'{"prompt": ' + deep + b"}")
    assert status == 400 and "nested too deeply" in json.loads(body)["error"]["message"]


@pytest.mark.parametrize("length", ["\u00b2", "\u0663", "-1", "12abc", "1" * 30])
def test_a_content_length_that_is_not_ascii_digits_is_a_400_naming_it(gvm_port, length):
    # '²' and '٣' pass str.isdigit(); int() takes '٣' and refuses '²'. The HTTP parser (h11) refuses such a
    # request before the app sees it; it is answered in the server's JSON error shape, naming the header.
    head = (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {length}\r\n\r\n").encode()
    status, body = _raw_request(gvm_port, "POST", INFER, raw_head=head)
    assert status == 400 and "Content-Length" in json.loads(body)["error"], body[:200]


def test_a_body_without_a_content_length_is_a_411(gvm_port, policy_port):
    chunked = "Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    for port, path in ((gvm_port, INFER), (policy_port, "/v1/completions")):
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{chunked}".encode()
        status, body = _raw_request(port, "POST", path, raw_head=head)
        error = json.loads(body)["error"]
        assert status == 411 and "needs a Content-Length" in (error if port == gvm_port else error["message"])


def test_a_server_fault_in_an_endpoint_is_a_500_and_a_model_fault_too(gvm_port, capfd):
    status, body = _raw_request(gvm_port, "GET", "/v2/models/gvm")
    assert status == 500 and "the server failed on this request: KeyError" in json.loads(body)["error"]
    logged = capfd.readouterr().err
    assert "Traceback" in logged and "KeyError: 'value_stats'" in logged  # the server's log has the fault
    status, body = _raw_request(gvm_port, "POST", INFER, json.dumps(_kserve(tokens=((1, 666),))).encode())
    assert status == 500
    assert "the model failed on this batch: RuntimeError: CUDA out of memory (simulated)" in json.loads(body)["error"]
    status, body = _raw_request(gvm_port, "POST", INFER, json.dumps(_kserve(tokens=((2, 4),))).encode())
    assert status == 200 and json.loads(body)["outputs"][0]["data"] == [1.0, 2.0]  # it keeps serving


def test_a_client_that_hangs_up_is_one_line_in_the_log_without_a_traceback(capfd):
    release = threading.Event()

    def slow_score(tokens, lengths):
        release.wait(30)
        return np.zeros(tokens.shape, np.float32)

    service = ValueService(slow_score, vocab_size=1000, max_length=100, config=ServerConfig(max_delay_ms=0))
    with _serving(service, GVMFront(service, dict, "127.0.0.1", 0, token=None)) as port:
        body = json.dumps(_kserve(tokens=[[1] * 90] * 50, lengths=[90] * 50)).encode()
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
            sock.close()
        time.sleep(0.5)
        release.set()
        deadline = time.time() + 30
        while service.metrics.sequences < 150 and time.time() < deadline:  # the three answers were attempted
            time.sleep(0.05)
        time.sleep(0.5)
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    # At most one line per client (where the reset lands before the server reads or writes, there is none).
    gone = [line for line in err.splitlines() if "went away" in line]
    assert len(gone) <= 3 and all(("BrokenPipeError" in line or "ConnectionResetError" in line) for line in gone)


# -- the policy server ---------------------------------------------------------------------------------------


class _FakePolicy:
    """``complete_fn`` of a model that writes one token per step and never ends on its own; it records its
    calls (rows, and the seed and slice of each)."""

    def __init__(self):
        self.calls: list[tuple[list[CompletionRequest], int, int | None]] = []
        self.during_call = None  # a hook: run while the first call "generates"

    def __call__(self, rows, sampling, slice_tokens):
        self.calls.append((rows, sampling.seed, slice_tokens))
        if self.during_call is not None:
            hook, self.during_call = self.during_call, None
            hook()
        if any(row.prompt_ids[0] == 666 for row in rows):
            raise RuntimeError("the model failed (simulated)")
        completions = []
        for row in rows:
            new = min(row.max_tokens - len(row.reply_ids), slice_tokens or 10**9)
            token_ids = row.reply_ids + [7] * new
            finished = len(token_ids) >= row.max_tokens
            completions.append(Completion(text="x" * len(token_ids), finish_reason="length" if finished else None,
                                          prompt_tokens=len(row.prompt_ids), completion_tokens=len(token_ids),
                                          token_ids=token_ids))
        return completions


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.models.sources import load_tokenizer

    return load_tokenizer(load_model_config("tiny").tokenizer_source)


@pytest.fixture(scope="module")
def policy_port(tiny_tokenizer):
    config = PolicyServerConfig(max_delay_ms=0, slice_tokens=16, max_batch_rows=4)
    service = CompletionService(_FakePolicy(), config)
    app = make_app(service, tiny_tokenizer, "tiny", 4096, token=None)
    with _serving(service, HTTPFront(app, "127.0.0.1", 0)) as port:
        yield port


@pytest.mark.parametrize("body, status, message", [
    (b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', 400, "'temperature' must be a finite number, got nan"),
    (b'{"model": "tiny", "prompt": "hi", "top_p": NaN}', 400, "'top_p' must be a finite number, got nan"),
    (b'{"model": "tiny", "prompt": "hi", "temperature": Infinity}', 400, "'temperature' must be a finite number"),
    (b'{"model": "tiny", "prompt": ["a", "b", "c"], "n": 2}', 400, "asks for 6 replies (3 prompt(s) x n=2)"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": 1e400}', 400, "'max_tokens' must be an integer"),
    (b'[1, 2]', 400, "must be a JSON object"),
    (b'{"model": "tiny", "prompt": "\\ud800"}', 400, "prompt[0] is not valid Unicode (surrogates not allowed"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfff"}]}', 400,
     "messages[0].content is not valid Unicode"),
])
def test_every_malformed_completion_request_gets_an_answer(policy_port, body, status, message):
    got, answer = _raw_request(policy_port, "POST", "/v1/chat/completions" if b"messages" in body else "/v1/completions",
                               body)
    assert got == status and message in json.loads(answer)["error"]["message"], answer[:500]
    ok, answer = _raw_request(policy_port, "POST", "/v1/completions",
                              b'{"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0}')
    assert ok == 200 and json.loads(answer)["choices"][0]["finish_reason"] == "length"


def test_a_model_failure_is_a_500_with_its_message(tiny_tokenizer):
    from nemo_dvpo.serving.kserve import RequestError

    model = _FakePolicy()
    service = CompletionService(model, PolicyServerConfig(max_delay_ms=0))
    request = parse_request("completion", {"model": "tiny", "prompt": "hi"}, tiny_tokenizer, "tiny", 4096,
                            service.config)
    request.prompts = [[666]]
    loop = threading.Thread(target=service.run, args=(lambda: bool(model.calls),))
    loop.start()
    with pytest.raises(RequestError) as raised:
        service.submit(request)
    loop.join()
    assert raised.value.status == 500 and "the model failed (simulated)" in str(raised.value)


def _request(tokenizer, config, max_tokens: int, **fields):
    return parse_request("completion", {"model": "tiny", "prompt": "hello", "max_tokens": max_tokens, **fields},
                         tokenizer, "tiny", 100_000, config)


def test_a_short_request_waits_one_slice_of_a_long_reply_not_all_of_it(tiny_tokenizer):
    """The long request (10,000 tokens) starts first; the short one (4 tokens) arrives during its first slice.
    The short one is answered by the next model call, alone (a static batch runs to its longest row: it is not
    batched with the long reply's next slice); the long one then runs to its end, in slices, each continuing
    the reply so far."""
    model = _FakePolicy()
    config = PolicyServerConfig(max_delay_ms=0, slice_tokens=128)
    service = CompletionService(model, config)
    answered: dict[str, list[Completion]] = {}

    def ask(name, request):
        answered[name] = service.submit(request)

    long_request = _request(tiny_tokenizer, config, 10_000, temperature=0)
    short_request = _request(tiny_tokenizer, config, 4, temperature=0)
    short_thread = threading.Thread(target=ask, args=("short", short_request))

    def short_arrives():  # while the long reply's first slice is generated
        short_thread.start()
        while service.queue.empty():
            time.sleep(0.001)

    model.during_call = short_arrives
    long_thread = threading.Thread(target=ask, args=("long", long_request))
    long_thread.start()
    service.run(lambda: "long" in answered and "short" in answered)
    long_thread.join()
    short_thread.join()
    served = [[row.max_tokens for row in rows] for rows, _, _ in model.calls]
    assert served[:2] == [[10_000], [4]], "the short request waited for more than one slice of the long one"
    assert answered["short"][0].completion_tokens == 4 and answered["short"][0].finish_reason == "length"
    assert answered["long"][0].completion_tokens == 10_000 and answered["long"][0].finish_reason == "length"
    long_rows = [row for rows, _, _ in model.calls for row in rows if row.max_tokens == 10_000]
    assert [len(row.reply_ids) for row in long_rows] == list(range(0, 10_000, 128))
    assert all(slice_tokens == 128 for _, _, slice_tokens in model.calls)


@pytest.mark.parametrize("slice_tokens", [0, 128])
def test_requests_that_arrive_together_run_shortest_first_in_batches_of_one_length_class(tiny_tokenizer,
                                                                                       slice_tokens):
    model = _FakePolicy()
    config = PolicyServerConfig(max_delay_ms=0, slice_tokens=slice_tokens)  # all five are queued before it runs
    service = CompletionService(model, config)
    limits = [3000, 5, 900, 6, 100]
    threads = [threading.Thread(target=service.submit, args=(_request(tiny_tokenizer, config, limit, temperature=0),))
               for limit in limits]
    for thread in threads:
        thread.start()
    while service.queue.qsize() < len(limits):
        time.sleep(0.001)
    service.run(lambda: not any(thread.is_alive() for thread in threads))
    first_calls = [sorted(row.max_tokens for row in rows) for rows, _, _ in model.calls][:3]
    assert first_calls == [[5, 6], [100], [900]] if slice_tokens == 0 else [[5, 6], [100], [900, 3000]]


def test_a_seeded_request_draws_a_fresh_seed_for_each_slice_and_the_same_seeds_again(tiny_tokenizer):
    seeds_per_run = []
    for _ in range(2):
        model = _FakePolicy()
        config = PolicyServerConfig(max_delay_ms=0, slice_tokens=10)
        service = CompletionService(model, config)
        request = _request(tiny_tokenizer, config, 35, temperature=0.7, seed=123)
        loop = threading.Thread(target=service.run, args=(lambda: bool(model.calls) and service.queue.empty(),))
        loop.start()
        replies = service.submit(request)
        loop.join()
        assert replies[0].completion_tokens == 35
        seeds_per_run.append([seed for _, seed, _ in model.calls])
    assert seeds_per_run[0] == seeds_per_run[1] and len(set(seeds_per_run[0])) == 4 and seeds_per_run[0][0] == 123


def test_an_abandoned_request_is_not_generated_further(tiny_tokenizer):
    model = _FakePolicy()
    config = PolicyServerConfig(max_delay_ms=0, slice_tokens=8, request_timeout_s=0.2)
    service = CompletionService(model, config)
    request = _request(tiny_tokenizer, config, 10_000, temperature=0)
    from nemo_dvpo.serving.kserve import RequestError

    with pytest.raises(RequestError, match="no reply within server.request_timeout_s=0.2"):
        service.submit(request)  # nobody runs the model: it times out queued
    service.run(lambda: True)  # the queue drains without generating anything
    assert model.calls == []


# -- the DVPO actor waiting for its GVM server --------------------------------------------------------------


def test_the_actor_says_what_it_waits_for_and_gives_up_in_one_line_naming_the_url(capsys):
    from nemo_dvpo.serving.gvm_client import GVMClient, GVMClientConfig, ScorerUnavailable
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = GVMClient([url], GVMClientConfig(ready_timeout_s=3.5, ready_notice_s=1.0))
    started = time.monotonic()
    with pytest.raises(ScorerUnavailable) as raised:
        client.wait_until_ready()
    assert 3.5 <= time.monotonic() - started < 15
    message = str(raised.value)
    assert "\n" not in message and f"no GVM server became ready at {url} within gvm_client.ready_timeout_s=3.5 s" \
        in message and "ConnectionRefusedError" in message
    notices = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[gvm_client] waiting")]
    assert 2 <= len(notices) <= 5, notices  # at start, then every ready_notice_s
    assert all(url in line and "s left (gvm_client.ready_timeout_s)" in line and "ConnectionRefusedError" in line
               for line in notices)


def test_the_actor_stops_waiting_as_soon_as_the_server_is_ready(capsys, gvm_port):
    from nemo_dvpo.serving.gvm_client import GVMClient, GVMClientConfig

    GVMClient([f"http://127.0.0.1:{gvm_port}"], GVMClientConfig(ready_timeout_s=5)).wait_until_ready()
    assert "[gvm_client]" not in capsys.readouterr().out  # no wait, nothing said
