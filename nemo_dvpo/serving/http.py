"""What the model servers share: the HTTP front on FastAPI + uvicorn, request batching and the model-parallel loop.

Both servers (:mod:`nemo_dvpo.serving.gvm_server`, the GVM over the Open Inference Protocol, and
:mod:`nemo_dvpo.serving.openai_server`, a policy over the OpenAI API) are built the same way, from the parts
here; each keeps its endpoints, request formats, error bodies and batching policy:

* :func:`json_api` - a FastAPI app whose every answer is JSON in the server's error shape: a
  :class:`RequestError` with its status, an unknown path or method a 404 naming it, anything else a 500 naming
  the exception (its traceback in the server's log); a client that hangs up is not an error (uvicorn drops the
  answer); :func:`read_body` - a request body read under a size limit
  (411 without a Content-Length, 413 over the limit, the connection then closed unread); :func:`authorize` - the
  bearer-token check; :func:`server_token` - the rule that a server beyond loopback needs a token;
* :class:`HTTPFront` - uvicorn serving the app from a background thread (its own event loop, a deep listen
  backlog, no line per request), with the ``ready`` flag; :meth:`HTTPFront.close` stops accepting and waits for
  the answers being sent. A request that is not valid HTTP (h11 refuses it before the app sees it: a malformed
  Content-Length, a bad header) is answered 400 in the same JSON shape;
* :class:`BatchingService` - requests queued by the endpoints (on the event loop, or by any thread) and
  answered in batches by :meth:`BatchingService.run` in the main thread (which alone may talk to the other
  ranks) until a stop is requested, then the queue is drained; a subclass decides which queued requests join a
  batch and how a batch is answered. A request the service advances without finishing (a slice of a long reply)
  tells its waiter so (:meth:`BatchingService.progress`), which is what streaming is made of;
* :class:`ModelParallelRunner` - the leader of a model-parallel group broadcasts each batch to its group and
  the other ranks run the model with it, until the leader broadcasts stop;
* :func:`serve_main` and :func:`serve_until_stopped` - an entry point's run: its config parsed, requests served
  until SIGTERM or SIGINT, the requests in flight answered, every rank exits.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import queue
import re
import socket
import sys
import threading
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Optional

from nemo_dvpo.serving.kserve import RequestError
from nemo_dvpo.utils.errors import ConfigError, NemoDvpoError

# -- settings and access -----------------------------------------------------------------------------------


def check_server_settings(config, positive: tuple[str, ...]) -> None:
    """The checks of a server's settings: ``port`` in 0..65535, each of ``positive`` >= 1, ``max_delay_ms`` >= 0."""
    if not 0 <= config.port < 65536:
        raise ConfigError(f"server.port must be in 0..65535, got {config.port}")
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"server.{name} must be >= 1, got {getattr(config, name)}")
    if config.max_delay_ms < 0:
        raise ConfigError(f"server.max_delay_ms must be >= 0, got {config.max_delay_ms}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_token(config) -> Optional[str]:
    """The bearer token requests must carry; refuses to serve beyond loopback without one.

    ``config`` is a server's settings: ``host``, ``token_env`` (the environment variable holding the token)
    and ``allow_unauthenticated``.
    """
    token = os.environ.get(config.token_env) or None
    if token is None and not is_loopback(config.host) and not config.allow_unauthenticated:
        raise ConfigError(f"server.host={config.host} serves beyond this machine: set a bearer token in the "
                          f"environment variable {config.token_env} (server.token_env), or pass "
                          "server.allow_unauthenticated=true on a network you trust")
    return token


# -- the app -----------------------------------------------------------------------------------------------

ErrorPayload = Callable[[int, str], dict]  # (status, message) -> the JSON body of an error answer


def plain_error(status: int, message: str) -> dict:
    return {"error": message}


_DECIMAL = re.compile(r"[0-9]{1,19}")  # a Content-Length: ASCII digits, at most 19 (an int64)
_CLOSE = {"Connection": "close"}  # an answer after which the connection is closed (its request body was not read)


def authorize(request, token: Optional[str]) -> None:
    """Raise a 401 unless ``request`` carries ``Authorization: Bearer <token>`` (``token`` None: no check)."""
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not (given.startswith("Bearer ") and hmac.compare_digest(given[len("Bearer "):].encode(), token.encode())):
        raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer ...)")


async def read_body(request, max_bytes: int) -> bytes:
    """The request body, at most ``max_bytes``; 411 without a Content-Length of ASCII digits (a chunked body
    too), 413 over the limit - both without reading the body, so the connection is closed after the answer."""
    length = request.headers.get("content-length")
    if length is None or not _DECIMAL.fullmatch(length):  # str.isdigit() takes '²' and other non-ASCII digits
        raise RequestError(411, "a request body needs a Content-Length header", headers=_CLOSE)
    if int(length) > max_bytes:
        raise RequestError(413, f"the request body has {length} bytes, over the limit of {max_bytes} "
                                "(server.max_body_bytes)", headers=_CLOSE)
    return await request.body()  # h11 holds the client to its Content-Length


def json_api(error_payload: ErrorPayload = plain_error, title: str = "nemo_dvpo") -> Any:
    """A FastAPI app whose every answer is JSON, errors in ``error_payload``'s shape (see the module docstring).

    ``app.state.ready`` (a :class:`threading.Event`) is set once the model is loaded.
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ready = threading.Event()

    def answer(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
        return JSONResponse(error_payload(status, message), status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def request_error(request, error: RequestError):
        return answer(error.status, str(error), error.headers)

    @app.exception_handler(HTTPException)
    async def routing_error(request, error: HTTPException):  # no route, or a route without this method
        return answer(404, f"no such endpoint: {request.method} {request.url.path.rstrip('/')}")

    app.add_middleware(_ServerFaults, error_payload=error_payload)
    app.state.error_payload = error_payload
    return app


class _ServerFaults:
    """An exception that escapes an endpoint (a fault of the server's, not the client's) is answered 500 naming it,
    and its traceback goes to the server's log; once the answer has started, the connection is all that can be
    closed. (Starlette's own catch-all answers too, but then re-raises into uvicorn, which logs the traceback
    only where logging is configured.)"""

    def __init__(self, app, error_payload: ErrorPayload):
        self.app, self.error_payload = app, error_payload

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:
            traceback.print_exc()
            if started:
                return  # uvicorn closes a connection whose answer was not completed
            body = json.dumps(self.error_payload(
                500, f"the server failed on this request: {type(error).__name__}: {error}")).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})


def _protocol_class(error_payload: ErrorPayload):
    """uvicorn's h11 protocol, answering a request that is not valid HTTP/1.1 in the app's JSON error shape
    (uvicorn's own answer is a plain-text line that names nothing)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class JSONErrorH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            # Called while h11's RemoteProtocolError is being handled: it names what is wrong.
            fault = sys.exc_info()[1]
            reason = f"the request is not valid HTTP/1.1 ({fault or msg})"
            body = json.dumps(error_payload(400, reason)).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return JSONErrorH11Protocol


class HTTPFront:
    """uvicorn serving ``app`` (from :func:`json_api`) in a background thread; the model loop stays in the caller's.

    The port is bound here, so a port in use fails at once with a :class:`ConfigError`; ``port`` is the bound
    one (``port=0``: a free one). ``ready`` is ``app.state.ready``.
    """

    def __init__(self, app, host: str, port: int, name: str = "http"):
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as error:
            self.socket.close()
            raise ConfigError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
        # Many clients connecting at once wait in the backlog rather than being refused.
        self.socket.listen(1024)
        self.port = self.socket.getsockname()[1]
        self.ready = app.state.ready
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                http=_protocol_class(app.state.error_payload), timeout_graceful_shutdown=30,
                                server_header=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, name=name,
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()
        while not self.server.started and self.thread.is_alive():  # accepting before start() returns
            time.sleep(0.01)
        if not self.server.started:
            raise NemoDvpoError(f"the HTTP server on port {self.port} stopped while starting (its error is above)")

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting connections, then wait (up to ``timeout``) for the answers being sent."""
        self.server.config.timeout_graceful_shutdown = int(max(1, timeout))
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout + 5)
        self.socket.close()


# -- the batching service ----------------------------------------------------------------------------------


@dataclass
class Pending:
    """A queued request: its waiter waits on ``done``, then reads ``result`` or ``error``.

    A server subclasses it with the request's own fields. ``abandoned`` is set when its waiter stopped waiting
    (the 503 of a timeout, a client gone from a stream): the service then drops it instead of computing an
    answer nobody reads. ``listener``, if set, is called (from the model's thread) each time the request
    advanced or finished.
    """

    done: threading.Event = field(default_factory=threading.Event, kw_only=True)
    result: Any = field(default=None, kw_only=True)
    error: Optional[str] = field(default=None, kw_only=True)
    abandoned: bool = field(default=False, kw_only=True)
    listener: Optional[Callable[[], None]] = field(default=None, kw_only=True)


# What :meth:`BatchingService.answer` returns for a request it has advanced but not finished (a slice of a long
# reply): the request goes back to the end of the queue, behind the requests that arrived meanwhile.
UNFINISHED = object()


class BatchingService(ABC):
    """Queues requests; :meth:`run` (the main thread) answers them in batches.

    A subclass says which queued requests join a batch (:meth:`batches_from`) and answers a batch with one
    result per request (:meth:`answer`). ``config`` gives ``max_delay_ms`` (how long a batch waits for more
    requests) and ``request_timeout_s`` (how long a request waits for its answer before a 503).
    """

    what: str = "answer"  # what a request waits for, as the timeout's 503 names it

    def __init__(self, config):
        self.config = config
        self.queue: queue.Queue[Pending] = queue.Queue()
        self.accepting = True

    def _enqueue(self, pending: Pending) -> None:
        if not self.accepting:
            raise RequestError(503, "the server is shutting down")
        self.queue.put(pending)

    def _outcome(self, pending: Pending) -> Any:
        if pending.error is not None:
            raise RequestError(500, pending.error)
        return pending.result

    def _timed_out(self, pending: Pending) -> RequestError:
        pending.abandoned = True
        return RequestError(503, f"no {self.what} within server.request_timeout_s={self.config.request_timeout_s}")

    def _wait_for(self, pending: Pending) -> Any:
        """Called from a thread: queue ``pending`` and wait for its result."""
        self._enqueue(pending)
        if not pending.done.wait(self.config.request_timeout_s):
            raise self._timed_out(pending)
        return self._outcome(pending)

    async def progress(self, pending: Pending) -> AsyncIterator[Pending]:
        """Called on the event loop: queue ``pending``, then yield it each time it advanced, last when done (its
        result read with :meth:`_outcome`). Leaving the iteration early abandons the request."""
        loop = asyncio.get_running_loop()
        advanced = asyncio.Event()
        pending.listener = lambda: loop.call_soon_threadsafe(advanced.set)
        self._enqueue(pending)
        deadline = loop.time() + self.config.request_timeout_s
        try:
            while True:
                try:
                    await asyncio.wait_for(advanced.wait(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    raise self._timed_out(pending) from None
                advanced.clear()
                yield pending
                if pending.done.is_set():
                    return
        finally:
            if not pending.done.is_set():
                pending.abandoned = True

    async def wait(self, pending: Pending) -> Any:
        """Called on the event loop: queue ``pending`` and wait for its result (without holding a thread)."""
        async for _ in self.progress(pending):
            pass
        return self._outcome(pending)

    def _arrivals(self) -> Iterator[Pending]:
        """The requests queued within max_delay_ms from now, as they come (stop asking to stop taking them)."""
        deadline = time.monotonic() + self.config.max_delay_ms / 1000
        while True:
            remaining = deadline - time.monotonic()
            try:
                yield self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                return

    def batches_from(self, first: Pending) -> Iterator[list[Pending]]:
        """The batches to answer, starting from ``first`` (by default ``first`` alone)."""
        yield [first]

    @abstractmethod
    def answer(self, batch: list[Pending]) -> list[Any]:
        """Run the model on ``batch``: one result per request, in order, or :data:`UNFINISHED` for a request to run
        again later (an exception fails the batch)."""

    def _answer(self, batch: list[Pending]) -> None:
        batch = [pending for pending in batch if not pending.abandoned]
        if not batch:
            return
        try:
            results, error = self.answer(batch), None
        except Exception as exc:  # the model failed on this batch: answer 500, keep serving
            results, error = [None] * len(batch), f"the model failed on this batch: {type(exc).__name__}: {exc}"
        for pending, result in zip(batch, results):
            if result is UNFINISHED and error is None:
                self.queue.put(pending)
            else:
                pending.result, pending.error = result, error
                pending.done.set()
            if pending.listener is not None:
                pending.listener()

    def run(self, stopping: Callable[[], bool]) -> None:
        """Serve batches until ``stopping()``; then stop accepting and answer what is queued."""
        while True:
            try:
                first = self.queue.get(timeout=0.05)
            except queue.Empty:
                if stopping():
                    self.accepting = False
                    if self.queue.empty():
                        return
                continue
            for batch in self.batches_from(first):
                self._answer(batch)


# -- the multi-rank model loop ---------------------------------------------------------------------------


def model_parallel_group() -> tuple[Any, int]:
    """This rank's model-parallel group (None: this rank alone) and the global rank of its leader."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_model_parallel_group()
    members = dist.get_process_group_ranks(group)
    return (group if len(members) > 1 else None), members[0]


class ModelParallelRunner:
    """Runs the model on the leader of a model-parallel group, the group's other ranks following its broadcasts.

    ``run(*arguments)`` runs the model on one batch; the leader calls the runner with a batch's arguments,
    which broadcasts them to the group (``group`` None: a group of one, nothing to broadcast) before running
    the model itself, while every other rank of the group sits in :meth:`follow`.
    """

    def __init__(self, run: Callable[..., Any], group, leader: int):
        self.run, self.group, self.leader = run, group, leader

    @property
    def is_leader(self) -> bool:
        import torch.distributed as dist

        return dist.get_rank() == self.leader

    def _broadcast(self, payload: Any) -> Any:
        import torch.distributed as dist

        if self.group is None:
            return payload
        box = [payload]
        dist.broadcast_object_list(box, src=self.leader, group=self.group)
        return box[0]

    def __call__(self, *arguments: Any) -> Any:
        self._broadcast(("run", arguments))
        return self.run(*arguments)

    def stop_followers(self) -> None:
        self._broadcast(("stop", None))

    def follow(self) -> None:
        """A follower's loop: run the model on each batch the leader broadcasts, until it says stop."""
        while True:
            kind, arguments = self._broadcast(None)
            if kind == "stop":
                return
            self.run(*arguments)


# -- an entry point's run ----------------------------------------------------------------------------------


def serve_main(cfg, config_class: type, name: str, serve: Callable[[Any, Any], None]) -> None:
    """An entry point's body (``examples/<name>.py``): its Hydra config as ``config_class``, ``serve(config, stop)``
    until SIGTERM or SIGINT (which answer the requests in flight), then the distributed world torn down."""
    from omegaconf import OmegaConf

    from nemo_dvpo.training.stopping import GracefulStop
    from nemo_dvpo.utils.config import from_dict
    from nemo_dvpo.utils.distributed import destroy_distributed

    raw = OmegaConf.to_container(cfg, resolve=True)
    raw.pop("hydra", None)
    config = from_dict(config_class, raw, name)
    with GracefulStop(action="answering the requests in flight, then exiting") as stop:
        serve(config, stop)
    destroy_distributed()


def serve_until_stopped(service: BatchingService, front: HTTPFront, runner: ModelParallelRunner, stop) -> None:
    """The leader's part: answer requests until ``stop.requested``, then every request in flight, then stop the
    followers."""
    try:
        service.run(lambda: stop.requested)
    finally:
        front.close()
        runner.stop_followers()
