"""What the model servers share: the HTTP front, the handler plumbing, request batching and the model-parallel loop.

Both servers (:mod:`nemo_dvpo.serving.gvm_server`, the GVM over the Open Inference Protocol, and
:mod:`nemo_dvpo.serving.openai_server`, a policy over the OpenAI API) are built the same way, from the parts
here; each keeps its endpoints, request formats, error bodies and batching policy:

* :class:`HTTPFront` - a threading HTTP server in background threads (daemon handler threads, a deep
  listen backlog) that owns the ``ready`` flag and the :class:`InFlight` count, so that :meth:`HTTPFront.close`
  waits for the answers being sent;
* :class:`JSONHandler` - the handler plumbing: JSON and byte responses with a Content-Length, a request body
  read under a size limit (411 without a Content-Length, 413 over the limit), the bearer-token check, no log
  line per request; :func:`server_token` - the rule that a server beyond loopback needs a token;
* :class:`BatchingService` - requests queued by HTTP threads and answered in batches by :meth:`BatchingService.run`
  in the main thread (which alone may talk to the other ranks) until a stop is requested, then the queue is
  drained; a subclass decides which queued requests join a batch and how a batch is answered;
* :class:`ModelParallelRunner` - the leader of a model-parallel group broadcasts each batch to its group and
  the other ranks run the model with it, until the leader broadcasts stop;
* :func:`serve_main` and :func:`serve_until_stopped` - an entry point's run: its config parsed, requests served
  until SIGTERM or SIGINT, the requests in flight answered, every rank exits.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import queue
import re
import sys
import threading
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator, Optional

from nemo_dvpo.serving.kserve import RequestError
from nemo_dvpo.utils.errors import ConfigError

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


# -- HTTP --------------------------------------------------------------------------------------------------

_DECIMAL = re.compile(r"[0-9]{1,19}")  # a Content-Length: ASCII digits, at most 19 (an int64)


class InFlight:
    """Counts the requests being answered, so that a shutdown can wait for their responses to be sent."""

    def __init__(self):
        self.count = 0
        self.changed = threading.Condition()

    def __enter__(self):
        with self.changed:
            self.count += 1

    def __exit__(self, *exc):
        with self.changed:
            self.count -= 1
            self.changed.notify_all()
        return False

    def wait_idle(self, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.count == 0, timeout=timeout)


class _Server(ThreadingHTTPServer):
    """A thread per connection; many clients connecting at once wait in the backlog rather than being refused."""

    request_queue_size = 1024
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]):
        self.ready = threading.Event()  # the model is loaded
        self.in_flight = InFlight()
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up is the client's business: one line, no traceback. Anything else reaching
        here escaped :meth:`JSONHandler._guarded` - a server fault, logged with its traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            print(f"[http] {client_address[0]}:{client_address[1]} went away ({type(error).__name__})",
                  file=sys.stderr, flush=True)
            return
        super().handle_error(request, client_address)


class JSONHandler(BaseHTTPRequestHandler):
    """The plumbing of a JSON API's request handler; a server subclasses it with its endpoints.

    A subclass sets ``bearer_token`` (None: no check) and ``max_body_bytes``, answers ``GET`` in :meth:`_get` and
    ``POST`` in :meth:`_post` (counted in flight), and may shape its error bodies (:meth:`_error_payload`).
    ``self.server.ready`` is set once the model is loaded. Every request gets an answer: a
    :class:`RequestError` that escapes an endpoint is answered with its status, any other exception with a 500
    naming it (and its traceback in the server's log); a client that hangs up is one line in the log.
    """

    protocol_version = "HTTP/1.1"
    bearer_token: Optional[str] = None
    max_body_bytes: int = 2**20

    def log_message(self, format, *args):  # no line per request (a server counts its requests itself)
        return

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def _send(self, status: int, body: bytes, headers: Optional[dict] = None) -> None:
        self.answered = True
        self.send_response(status)
        for name, value in (headers or {"Content-Type": "application/json"}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode())

    def _error_payload(self, status: int, message: str) -> dict:
        return {"error": message}

    def _error(self, status: int, message: str) -> None:
        self._json(status, self._error_payload(status, message))

    def _authorized(self) -> bool:
        """Whether the request carries the bearer token; if not, it has been answered 401."""
        if self.bearer_token is None:
            return True
        given = self.headers.get("Authorization", "")
        if given.startswith("Bearer ") and hmac.compare_digest(given[len("Bearer "):], self.bearer_token):
            return True
        self._error(401, "missing or wrong bearer token (Authorization: Bearer ...)")
        return False

    def _body_too_large(self) -> None:
        """Called before a body over ``max_body_bytes`` is answered 413."""

    def _read_body(self) -> Optional[bytes]:
        """The request body; None once answered 411 (no Content-Length) or 413 (over ``max_body_bytes``)."""
        length = self.headers.get("Content-Length")
        if length is None or not _DECIMAL.fullmatch(length):  # str.isdigit() takes '²' and other non-ASCII digits
            self.close_connection = True
            self._error(411, "a request body needs a Content-Length header")
            return None
        if int(length) > self.max_body_bytes:
            self.close_connection = True  # the body is not read
            self._body_too_large()
            self._error(413, f"the request body has {length} bytes, over the limit of "
                             f"{self.max_body_bytes} (server.max_body_bytes)")
            return None
        return self.rfile.read(int(length))

    def _guarded(self, endpoint: Callable[[], None]) -> None:
        self.answered = False
        try:
            endpoint()
        except (ConnectionError, TimeoutError):
            raise  # the client went away: nothing to answer (one line: _Server.handle_error)
        except RequestError as error:
            self._answer_fault(error.status, str(error))
        except Exception as error:  # a fault of the server's, not the client's: answer it, then log it
            self._answer_fault(500, f"the server failed on this request: {type(error).__name__}: {error}")
            traceback.print_exc()

    def _answer_fault(self, status: int, message: str) -> None:
        if self.answered:  # the response had started: the connection is all that can be closed
            self.close_connection = True
        else:
            self._error(status, message)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._guarded(self._get)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        with self.server.in_flight:
            self._guarded(self._post)

    def _get(self) -> None:
        self._error(404, f"no such endpoint: GET {self._path()}")

    def _post(self) -> None:
        self._error(404, f"no such endpoint: POST {self._path()}")


class HTTPFront:
    """The HTTP server in background threads; the model loop stays in the calling thread.

    ``ready`` (set it once the model is loaded) and ``in_flight`` are what ``handler`` reads as
    ``self.server.ready`` and ``self.server.in_flight``.
    """

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str, port: int, name: str = "http"):
        try:
            self.httpd = _Server((host, port), handler)
        except OSError as error:
            raise ConfigError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
        self.ready, self.in_flight = self.httpd.ready, self.httpd.in_flight
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                       name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting connections, then wait (up to ``timeout``) for the answers being sent."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.in_flight.wait_idle(timeout)


# -- the batching service ----------------------------------------------------------------------------------


@dataclass
class Pending:
    """A queued request: its HTTP thread waits on ``done``, then reads ``result`` or ``error``.

    A server subclasses it with the request's own fields. ``abandoned`` is set when its HTTP thread stopped
    waiting (the 503 of a timeout): the service then drops it instead of computing an answer nobody reads.
    """

    done: threading.Event = field(default_factory=threading.Event, kw_only=True)
    result: Any = field(default=None, kw_only=True)
    error: Optional[str] = field(default=None, kw_only=True)
    abandoned: bool = field(default=False, kw_only=True)


# What :meth:`BatchingService.answer` returns for a request it has advanced but not finished (a slice of a long
# reply): the request goes back to the end of the queue, behind the requests that arrived meanwhile.
UNFINISHED = object()


class BatchingService(ABC):
    """Queues requests from HTTP threads; :meth:`run` (the main thread) answers them in batches.

    A subclass says which queued requests join a batch (:meth:`batches_from`) and answers a batch with one
    result per request (:meth:`answer`). ``config`` gives ``max_delay_ms`` (how long a batch waits for more
    requests) and ``request_timeout_s`` (how long a request waits for its answer before a 503).
    """

    what: str = "answer"  # what a request waits for, as the timeout's 503 names it

    def __init__(self, config):
        self.config = config
        self.queue: queue.Queue[Pending] = queue.Queue()
        self.accepting = True

    def _wait_for(self, pending: Pending) -> Any:
        """Called from an HTTP thread: queue ``pending`` and wait for its result."""
        if not self.accepting:
            raise RequestError(503, "the server is shutting down")
        self.queue.put(pending)
        if not pending.done.wait(self.config.request_timeout_s):
            pending.abandoned = True
            raise RequestError(503, f"no {self.what} within server.request_timeout_s={self.config.request_timeout_s}")
        if pending.error is not None:
            raise RequestError(500, pending.error)
        return pending.result

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
                continue
            pending.result, pending.error = result, error
            pending.done.set()

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
