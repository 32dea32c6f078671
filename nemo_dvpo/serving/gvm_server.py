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

This module owns the settings, the endpoints, the validation of a request, the metrics and the batching
policy (a token budget); the HTTP front and handler plumbing, the request queue and its run loop, and the
leader/follower loop across model-parallel ranks are :mod:`nemo_dvpo.serving.http`'s, shared with the
policy server.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

from nemo_dvpo.serving import http
from nemo_dvpo.serving.http import (BatchingService, JSONHandler, ModelParallelRunner, Pending, check_server_settings,
                                    model_parallel_group, serve_until_stopped, server_token)
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
        check_server_settings(self, positive=("max_batch_tokens", "max_body_bytes", "rows", "bucket"))


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
class _Pending(Pending):
    tokens: np.ndarray
    lengths: np.ndarray


ScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class ValueService(BatchingService):
    """Validates requests, merges concurrent ones into batches and scores them with ``score``.

    ``score(tokens, lengths) -> values`` runs in the thread that calls :meth:`run` (the main thread,
    which alone may talk to the other ranks); HTTP threads only enqueue and wait. A batch takes the
    requests queued within ``max_delay_ms`` of its first, up to ``max_batch_tokens`` tokens.
    """

    what = "values"

    def __init__(self, score: ScoreFn, vocab_size: int, max_length: int, config: ServerConfig):
        super().__init__(config)
        self.score, self.vocab_size, self.max_length = score, vocab_size, max_length
        self.metrics = ServerMetrics()

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
        return self._wait_for(_Pending(tokens, lengths))

    def batches_from(self, first: _Pending) -> Iterator[list[_Pending]]:
        batch, tokens = [first], int(first.lengths.sum())
        if tokens < self.config.max_batch_tokens:
            for item in self._arrivals():
                if tokens + int(item.lengths.sum()) > self.config.max_batch_tokens:
                    self.queue.put(item)  # it starts the next batch
                    break
                batch.append(item)
                tokens += int(item.lengths.sum())
                if tokens >= self.config.max_batch_tokens:
                    break
        yield batch

    def answer(self, batch: list[_Pending]) -> list[np.ndarray]:
        width = max(item.tokens.shape[1] for item in batch)
        tokens = np.zeros((sum(item.tokens.shape[0] for item in batch), width), dtype=np.int64)
        row = 0
        for item in batch:
            tokens[row:row + item.tokens.shape[0], :item.tokens.shape[1]] = item.tokens
            row += item.tokens.shape[0]
        lengths = np.concatenate([item.lengths for item in batch])
        self.metrics.batch(len(lengths))
        values = self.score(tokens, lengths)
        answers, row = [], 0
        for item in batch:
            rows = item.tokens.shape[0]
            answers.append(np.ascontiguousarray(values[row:row + rows, :item.tokens.shape[1]], dtype=np.float32))
            row += rows
        return answers


# -- HTTP --------------------------------------------------------------------------------------------------


def make_handler(service: ValueService, model_metadata: Callable[[], dict], token: Optional[str]):
    """A request handler class bound to ``service``."""

    class Handler(JSONHandler):
        server_version = "nemo_dvpo-gvm"
        bearer_token = token
        max_body_bytes = service.config.max_body_bytes

        def _body_too_large(self) -> None:
            service.metrics.request(413)

        def _get(self) -> None:
            path, ready = self._path(), self.server.ready
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

        def _post(self) -> None:
            started = time.perf_counter()
            path = self._path()
            body = self._read_body()
            if body is None or not self._authorized():
                return None
            if path.startswith("/v2/models/") and path.endswith("/infer") and path != f"/v2/models/{MODEL_NAME}/infer":
                return self._error(404, f"no model {path.split('/')[3]!r}; this server serves '{MODEL_NAME}'")
            if path != f"/v2/models/{MODEL_NAME}/infer":
                return self._error(404, f"no such endpoint: POST {path}")
            try:
                if not self.server.ready.is_set():
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


class HTTPFront(http.HTTPFront):
    """The GVM's HTTP front: :func:`make_handler` for ``service`` in background threads."""

    def __init__(self, service: ValueService, model_metadata: Callable[[], dict], host: str, port: int,
                 token: Optional[str]):
        super().__init__(make_handler(service, model_metadata, token), host, port, name="gvm-http")


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


# -- the model ----------------------------------------------------------------------------------------------


def values_fn(gvm) -> ScoreFn:
    """``score(tokens, lengths) -> values`` with ``gvm`` (a :class:`LocalValueModel`), on NumPy arrays."""
    import torch

    return lambda tokens, lengths: gvm.values(torch.from_numpy(tokens), torch.from_numpy(lengths)).numpy()


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
    group, leader = model_parallel_group()
    if dist.get_rank() == leader:
        port = cfg.server.port + parallel_state.get_data_parallel_rank() if cfg.server.port else 0
        service = ValueService(lambda tokens, lengths: runner(tokens, lengths), info.vocab_size, max_length,
                               cfg.server)
        front = HTTPFront(service, lambda: model_metadata(info, max_length, cfg.server), cfg.server.host, port,
                          token)
        front.start()  # live at once, ready once the model is loaded
        print(f"[serve_gvm] listening on http://{cfg.server.host}:{front.port} (model loading)", flush=True)
    gvm = LocalValueModel(cfg.gvm, cfg.precision, max_length, kinds=("gvm", "reward_model"), rows=cfg.server.rows,
                          bucket=cfg.server.bucket)
    runner = ModelParallelRunner(values_fn(gvm), group, leader)
    if not runner.is_leader:
        runner.follow()
        return
    front.ready.set()
    layout = f"TP={cfg.parallel.tensor_model_parallel_size}, PP={cfg.parallel.pipeline_model_parallel_size}"
    print_rank_zero(f"[serve_gvm] ready: {cfg.gvm} (vocabulary {info.vocab_size}, sequences up to {max_length} "
                    f"tokens; {layout})")
    print(f"[serve_gvm] serving http://{cfg.server.host}:{front.port}/v2/models/{MODEL_NAME}", flush=True)
    serve_until_stopped(service, front, runner, stop)
    print(f"[serve_gvm] stopped by {stop.signal_name}: every request in flight was answered", flush=True)
