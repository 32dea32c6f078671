"""The frozen GVM as a server: per-token values over HTTP, in the Open Inference Protocol (KServe v2).

    python examples/serve_gvm.py gvm=runs/gvm/final server.port=8000
    torchrun --nproc-per-node 4 examples/serve_gvm.py gvm=... parallel.tensor_model_parallel_size=2

Endpoints (Triton's / PyTriton's HTTP API, so their clients work):

* ``GET /v2/health/live``, ``GET /v2/health/ready`` - the process is up / the model is loaded;
* ``GET /v2``, ``GET /v2/models/gvm`` - server and model metadata; the model's ``parameters`` carry the
  vocabulary size, tokenizer fingerprint, chat-template flag, value statistics and checkpoint id that a
  client checks against its policy;
* ``POST /v2/models/gvm/infer`` - inputs ``tokens`` (INT64 [batch, length], right-padded) and ``lengths``
  (INT64 [batch]), output ``values`` (FP32 [batch, length], 0 past each row's length); JSON or binary
  tensors;
* ``GET /metrics`` - Prometheus counters and histograms (requests, batch sizes, latency).

Concurrent requests that arrive within ``server.max_delay_ms`` of each other are merged into one model
batch of up to ``server.max_batch_tokens`` tokens. Every sequence is scored in a shape fixed by its own
length (:func:`nemo_dvpo.models.value_model.sequence_values`), so each request gets exactly the bits it
would get alone. A malformed request gets a 4xx naming what is wrong, a failure inside the model a 500;
the server keeps serving. SIGTERM/SIGINT finish the requests in flight, then every rank exits.

Under torchrun or srun, rank 0 of each model-parallel group serves HTTP (on ``server.port`` plus the
group's data-parallel rank: data-parallel replicas are separate endpoints) and broadcasts each batch to
the other ranks of its group, which run the model with it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

import numpy as np

from nemo_dvpo.serving.kserve import HEADER_LENGTH, RequestError, infer_response, parse_infer_request
from nemo_dvpo.utils.distributed import ParallelConfig
from nemo_dvpo.utils.errors import ConfigError

MODEL_NAME = "gvm"


@dataclass
class ServerConfig:
    # Interface and port to listen on; data-parallel replica r listens on port + r. A host other than
    # loopback needs a bearer token (the environment variable ``token_env``) or allow_unauthenticated.
    host: str = "127.0.0.1"
    port: int = 8000
    token_env: str = "NEMO_DVPO_GVM_TOKEN"
    allow_unauthenticated: bool = False
    # Dynamic batching: wait up to max_delay_ms after a request for others, merging up to max_batch_tokens.
    max_delay_ms: float = 5.0
    max_batch_tokens: int = 32768
    # Longest sequence accepted (null: the model's sequence length) and largest request body.
    max_sequence_length: Optional[int] = None
    max_body_bytes: int = 64 * 2**20
    # How long a request waits for its values before the server answers 503.
    request_timeout_s: float = 600.0
    # The canonical scoring shape (rows per model micro-batch, length bucket): clients that compare
    # values with an in-process GVM use the same.
    rows: int = 8
    bucket: int = 64

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"server.port must be in 0..65535, got {self.port}")
        for name in ("max_batch_tokens", "max_body_bytes", "rows", "bucket"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_delay_ms < 0:
            raise ConfigError(f"server.max_delay_ms must be >= 0, got {self.max_delay_ms}")


@dataclass
class ServeGVMConfig:
    # The GVM checkpoint to serve (kind "gvm").
    gvm: str = ""
    # Precision to run it in (the value head stays fp32).
    precision: str = "fp32"
    server: ServerConfig = field(default_factory=ServerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if not self.gvm:
            raise ConfigError("gvm=PATH is required: the GVM checkpoint to serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_token(config: ServerConfig) -> Optional[str]:
    """The bearer token requests must carry; refuses to serve beyond loopback without one."""
    token = os.environ.get(config.token_env) or None
    if token is None and not is_loopback(config.host) and not config.allow_unauthenticated:
        raise ConfigError(f"server.host={config.host} serves beyond this machine: set a bearer token in the "
                          f"environment variable {config.token_env} (server.token_env), or pass "
                          "server.allow_unauthenticated=true on a network you trust")
    return token


# -- metrics -----------------------------------------------------------------------------------------------


class _Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * len(buckets)
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1
        self.total += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        lines += [f'{self.name}_bucket{{le="{bound}"}} {count}' for bound, count in zip(self.buckets, self.counts)]
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.total}",
                  f"{self.name}_count {self.count}"]
        return lines


class ServerMetrics:
    """Prometheus exposition of what the server did (text format 0.0.4)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[int, int] = {}
        self.sequences = 0
        self.batch_sequences = _Histogram("gvm_batch_sequences", "Sequences per model batch",
                                          (1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.latency = _Histogram("gvm_request_latency_seconds", "Inference request latency",
                                  (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

    def request(self, status: int, seconds: Optional[float] = None, sequences: int = 0) -> None:
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            self.sequences += sequences
            if seconds is not None:
                self.latency.observe(seconds)

    def batch(self, sequences: int) -> None:
        with self.lock:
            self.batch_sequences.observe(sequences)

    def render(self) -> str:
        with self.lock:
            lines = ["# HELP gvm_requests_total Inference requests by HTTP status", "# TYPE gvm_requests_total counter"]
            lines += [f'gvm_requests_total{{status="{status}"}} {count}'
                      for status, count in sorted(self.requests.items())]
            lines += ["# HELP gvm_sequences_total Sequences scored", "# TYPE gvm_sequences_total counter",
                      f"gvm_sequences_total {self.sequences}"]
            lines += self.batch_sequences.render() + self.latency.render()
        return "\n".join(lines) + "\n"


# -- the batching service ----------------------------------------------------------------------------------


@dataclass
class _Pending:
    tokens: np.ndarray
    lengths: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    values: Optional[np.ndarray] = None
    error: Optional[str] = None


ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class ValueService:
    """Validates requests, merges concurrent ones into batches and scores them with ``score``.

    ``score(tokens, lengths) -> values`` runs in the thread that calls :meth:`run` (the main thread,
    which alone may talk to the other ranks); HTTP threads only enqueue and wait.
    """

    def __init__(self, score: ScoreFn, vocab_size: int, max_length: int, config: ServerConfig):
        self.score, self.vocab_size, self.max_length, self.config = score, vocab_size, max_length, config
        self.queue: queue.Queue[_Pending] = queue.Queue()
        self.metrics = ServerMetrics()
        self.accepting = True

    def validate(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if sorted(inputs) != ["lengths", "tokens"]:
            raise RequestError(400, f"expected inputs 'tokens' and 'lengths', got {sorted(inputs)}")
        tokens, lengths = inputs["tokens"], inputs["lengths"]
        for name, array, rank in (("tokens", tokens, 2), ("lengths", lengths, 1)):
            if array.dtype != np.dtype("<i8"):
                raise RequestError(400, f"input '{name}' must be INT64")
            if array.ndim != rank:
                raise RequestError(400, f"input '{name}' must have {rank} dimension(s), got shape {list(array.shape)}")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise RequestError(400, f"input 'tokens' is empty (shape {list(tokens.shape)})")
        if lengths.shape[0] != tokens.shape[0]:
            raise RequestError(400, f"'lengths' has {lengths.shape[0]} entries for {tokens.shape[0]} rows of 'tokens'")
        for row, length in enumerate(lengths.tolist()):
            if not 1 <= length <= tokens.shape[1]:
                raise RequestError(400, f"lengths[{row}]={length} is not in 1..{tokens.shape[1]} (the tokens' width)")
            if length > self.max_length:
                raise RequestError(400, f"lengths[{row}]={length} is over the maximum sequence length "
                                        f"{self.max_length}")
            row_tokens = tokens[row, :length]
            bad = np.flatnonzero((row_tokens < 0) | (row_tokens >= self.vocab_size))
            if bad.size:
                position = int(bad[0])
                raise RequestError(400, f"token id {int(row_tokens[position])} at row {row}, position {position} is "
                                        f"outside the vocabulary (0..{self.vocab_size - 1})")
        return tokens, lengths

    def submit(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Called from an HTTP thread: wait for this request's values."""
        if not self.accepting:
            raise RequestError(503, "the server is shutting down")
        pending = _Pending(tokens, lengths)
        self.queue.put(pending)
        if not pending.done.wait(self.config.request_timeout_s):
            raise RequestError(503, f"no values within server.request_timeout_s={self.config.request_timeout_s}")
        if pending.error is not None:
            raise RequestError(500, pending.error)
        return pending.values

    def _next_batch(self, first: _Pending) -> list[_Pending]:
        batch, tokens = [first], int(first.lengths.sum())
        deadline = time.monotonic() + self.config.max_delay_ms / 1000
        while tokens < self.config.max_batch_tokens:
            remaining = deadline - time.monotonic()
            try:
                item = self.queue.get(timeout=max(remaining, 0)) if remaining > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if tokens + int(item.lengths.sum()) > self.config.max_batch_tokens:
                self.queue.put(item)  # it starts the next batch
                break
            batch.append(item)
            tokens += int(item.lengths.sum())
        return batch

    def process(self, batch: list[_Pending]) -> None:
        width = max(item.tokens.shape[1] for item in batch)
        tokens = np.zeros((sum(item.tokens.shape[0] for item in batch), width), dtype=np.int64)
        row = 0
        for item in batch:
            tokens[row:row + item.tokens.shape[0], :item.tokens.shape[1]] = item.tokens
            row += item.tokens.shape[0]
        lengths = np.concatenate([item.lengths for item in batch])
        try:
            values = self.score(tokens, lengths)
            error = None
        except Exception as exc:  # the model failed on this batch: answer 500, keep serving
            values, error = None, f"the model failed on this batch: {type(exc).__name__}: {exc}"
        self.metrics.batch(len(lengths))
        row = 0
        for item in batch:
            rows = item.tokens.shape[0]
            if error is None:
                item.values = np.ascontiguousarray(values[row:row + rows, :item.tokens.shape[1]], dtype=np.float32)
            item.error = error
            row += rows
            item.done.set()

    def run(self, stopping: Callable[[], bool]) -> None:
        """Serve batches until ``stopping()``; then stop accepting and finish what is queued."""
        while True:
            try:
                first = self.queue.get(timeout=0.05)
            except queue.Empty:
                if stopping():
                    self.accepting = False
                    if self.queue.empty():
                        return
                continue
            self.process(self._next_batch(first))


# -- HTTP --------------------------------------------------------------------------------------------------


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


def make_handler(service: ValueService, model_metadata: Callable[[], dict], ready: threading.Event,
                 token: Optional[str], in_flight: InFlight):
    """A request handler class bound to ``service``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "nemo_dvpo-gvm"

        def log_message(self, format, *args):  # the metrics endpoint counts requests; no line per request
            return

        def _send(self, status: int, body: bytes, headers: Optional[dict] = None) -> None:
            self.send_response(status)
            for name, value in (headers or {"Content-Type": "application/json"}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode())

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": message})

        def _authorized(self) -> bool:
            if token is None:
                return True
            given = self.headers.get("Authorization", "")
            if given.startswith("Bearer ") and hmac.compare_digest(given[len("Bearer "):], token):
                return True
            self._error(401, "missing or wrong bearer token (Authorization: Bearer ...)")
            return False

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/v2/health/live":
                return self._json(200, {"live": True})
            if path == "/v2/health/ready":
                return self._json(200 if ready.is_set() and service.accepting else 503,
                                  {"ready": ready.is_set() and service.accepting})
            if not self._authorized():
                return None
            if path == "/v2":
                return self._json(200, {"name": "nemo_dvpo", "version": "1", "extensions": ["binary_tensor_data"]})
            if path == f"/v2/models/{MODEL_NAME}":
                if not ready.is_set():
                    return self._error(503, "the model is still loading")
                return self._json(200, model_metadata())
            if path == f"/v2/models/{MODEL_NAME}/ready":
                return self._json(200 if ready.is_set() else 503, {"ready": ready.is_set()})
            if path == "/metrics":
                return self._send(200, service.metrics.render().encode(), {"Content-Type": "text/plain; version=0.0.4"})
            return self._error(404, f"no such endpoint: GET {path}")

        def do_POST(self) -> None:  # noqa: N802
            with in_flight:
                self._post()

        def _post(self) -> None:
            started = time.perf_counter()
            path = self.path.split("?", 1)[0].rstrip("/")
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self.close_connection = True
                return self._error(411, "a request body needs a Content-Length header")
            if int(length) > service.config.max_body_bytes:
                self.close_connection = True  # the body is not read
                service.metrics.request(413)
                return self._error(413, f"the request body has {length} bytes, over the limit of "
                                        f"{service.config.max_body_bytes} (server.max_body_bytes)")
            body = self.rfile.read(int(length))
            if not self._authorized():
                return None
            if path.startswith("/v2/models/") and path.endswith("/infer") and path != f"/v2/models/{MODEL_NAME}/infer":
                return self._error(404, f"no model {path.split('/')[3]!r}; this server serves '{MODEL_NAME}'")
            if path != f"/v2/models/{MODEL_NAME}/infer":
                return self._error(404, f"no such endpoint: POST {path}")
            try:
                if not ready.is_set():
                    raise RequestError(503, "the model is still loading")
                request = parse_infer_request(body, self.headers.get(HEADER_LENGTH))
                tokens, lengths = service.validate(request.inputs)
                values = service.submit(tokens, lengths)
            except RequestError as error:
                service.metrics.request(error.status)
                return self._error(error.status, str(error))
            body, headers = infer_response(MODEL_NAME, {"values": values}, request.id, request.binary_output)
            service.metrics.request(200, time.perf_counter() - started, sequences=len(lengths))
            return self._send(200, body, headers)

    return Handler


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog of 5 resets the connections of a burst of concurrent clients.
    request_queue_size = 512
    daemon_threads = True


class HTTPFront:
    """The HTTP server in background threads; the service's model loop stays in the calling thread."""

    def __init__(self, service: ValueService, model_metadata: Callable[[], dict], host: str, port: int,
                 token: Optional[str]):
        self.ready = threading.Event()
        self.in_flight = InFlight()
        handler = make_handler(service, model_metadata, self.ready, token, self.in_flight)
        try:
            self.httpd = _Server((host, port), handler)
        except OSError as error:
            raise ConfigError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                       name="gvm-http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting connections, then wait (up to ``timeout``) for the answers being sent."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.in_flight.wait_idle(timeout)


def model_metadata(info, max_length: int, config: ServerConfig) -> dict:
    """``GET /v2/models/gvm``: the KServe model metadata, with what a client checks in ``parameters``."""
    stats = info.value_stats or {}
    return {
        "name": MODEL_NAME, "versions": ["1"], "platform": "nemo_dvpo_megatron",
        "inputs": [{"name": "tokens", "datatype": "INT64", "shape": [-1, -1]},
                   {"name": "lengths", "datatype": "INT64", "shape": [-1]}],
        "outputs": [{"name": "values", "datatype": "FP32", "shape": [-1, -1]}],
        "parameters": {
            "kind": info.kind, "checkpoint_id": info.checkpoint, "vocab_size": info.vocab_size,
            "tokenizer_fingerprint": info.tokenizer_fingerprint, "chat_template": info.chat_template,
            "chat_template_fingerprint": info.chat_template_fingerprint or "",
            "value_mean": stats.get("mean", float("nan")), "value_std": stats.get("std", float("nan")),
            "value_stats": json.dumps(info.value_stats), "eval_accuracy": json.dumps(info.eval_accuracy),
            "max_sequence_length": max_length, "rows": config.rows, "bucket": config.bucket,
        },
    }


def info_from_metadata(metadata: dict, url: str):
    """The :class:`ScorerInfo` a server publishes (the client side of :func:`model_metadata`)."""
    from nemo_dvpo.rlhf.scorers import ScorerInfo

    parameters = metadata.get("parameters") or {}
    try:
        return ScorerInfo(kind=parameters["kind"], checkpoint=f"{url} ({parameters['checkpoint_id']})",
                          vocab_size=int(parameters["vocab_size"]),
                          tokenizer_fingerprint=parameters["tokenizer_fingerprint"],
                          chat_template=bool(parameters["chat_template"]),
                          chat_template_fingerprint=parameters["chat_template_fingerprint"] or None,
                          value_stats=json.loads(parameters["value_stats"]),
                          eval_accuracy=json.loads(parameters["eval_accuracy"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"{url} is not a nemo_dvpo GVM server (its model metadata lacks {error})") from None


# -- the multi-rank model loop ---------------------------------------------------------------------------

_SCORE, _STOP = 1, 2


class ModelParallelScorer:
    """Scores on the leader of a model-parallel group, the group's other ranks following its broadcasts."""

    def __init__(self, gvm, group, leader: int):
        self.gvm, self.group, self.leader = gvm, group, leader

    def _broadcast(self, tensor):
        import torch.distributed as dist

        from nemo_dvpo.utils.distributed import compute_device

        on_device = tensor.to(compute_device())
        if self.group is not None:
            dist.broadcast(on_device, src=self.leader, group=self.group)
        return on_device.cpu()

    def score(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        import torch

        header = torch.tensor([_SCORE, *tokens.shape], dtype=torch.long)
        self._broadcast(header)
        tokens_t = self._broadcast(torch.from_numpy(tokens))
        lengths_t = self._broadcast(torch.from_numpy(lengths))
        return self.gvm.values(tokens_t, lengths_t).numpy()

    def stop_followers(self) -> None:
        import torch

        self._broadcast(torch.tensor([_STOP, 0, 0], dtype=torch.long))

    def follow(self) -> None:
        """A follower's loop: run the model on each batch the leader broadcasts, until it says stop."""
        import torch

        while True:
            kind, rows, width = self._broadcast(torch.zeros(3, dtype=torch.long)).tolist()
            if kind == _STOP:
                return
            tokens = self._broadcast(torch.zeros(rows, width, dtype=torch.long))
            lengths = self._broadcast(torch.zeros(rows, dtype=torch.long))
            self.gvm.values(tokens, lengths)


def serve(cfg: ServeGVMConfig, stop) -> None:
    """Load the GVM at the configured layout and serve it until ``stop`` is requested (then all ranks exit)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nemo_dvpo.checkpointing.model_checkpoint import read_checkpoint_model_config
    from nemo_dvpo.rlhf.scorers import LocalValueModel, value_model_info
    from nemo_dvpo.utils.distributed import initialize_distributed, print_rank_zero

    token = server_token(cfg.server)
    # A wrong path fails before anything else starts; a reward model serves as well as a GVM.
    info = value_model_info(cfg.gvm, kinds=("gvm", "reward_model"))
    model_cfg = read_checkpoint_model_config(cfg.gvm)
    initialize_distributed(cfg.parallel, num_attention_heads=model_cfg.num_attention_heads,
                           num_query_groups=model_cfg.num_query_groups, num_layers=model_cfg.num_layers)
    max_length = cfg.server.max_sequence_length or model_cfg.max_position_embeddings
    group = parallel_state.get_model_parallel_group()
    members = dist.get_process_group_ranks(group)
    leader = members[0]
    is_leader = dist.get_rank() == leader
    scorer_group = group if len(members) > 1 else None
    front = None
    if is_leader:
        port = cfg.server.port + parallel_state.get_data_parallel_rank() if cfg.server.port else 0
        service = ValueService(lambda tokens, lengths: runner.score(tokens, lengths), info.vocab_size, max_length,
                               cfg.server)
        front = HTTPFront(service, lambda: model_metadata(info, max_length, cfg.server), cfg.server.host, port,
                          token)
        front.start()  # live at once, ready once the model is loaded
        print(f"[serve_gvm] listening on http://{cfg.server.host}:{front.port} (model loading)", flush=True)
    gvm = LocalValueModel(cfg.gvm, cfg.precision, max_length, kinds=("gvm", "reward_model"), rows=cfg.server.rows,
                          bucket=cfg.server.bucket)
    runner = ModelParallelScorer(gvm, scorer_group, leader)
    if not is_leader:
        runner.follow()
        return
    front.ready.set()
    layout = f"TP={cfg.parallel.tensor_model_parallel_size}, PP={cfg.parallel.pipeline_model_parallel_size}"
    print_rank_zero(f"[serve_gvm] ready: {cfg.gvm} (vocabulary {info.vocab_size}, sequences up to {max_length} "
                    f"tokens; {layout})")
    print(f"[serve_gvm] serving http://{cfg.server.host}:{front.port}/v2/models/{MODEL_NAME}", flush=True)
    try:
        service.run(lambda: stop.requested)
    finally:
        front.close()
        if scorer_group is not None:
            runner.stop_followers()
    print(f"[serve_gvm] stopped by {stop.signal_name}: every request in flight was answered", flush=True)
