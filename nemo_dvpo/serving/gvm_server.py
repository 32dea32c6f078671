"""The frozen GVM as a server: per-token values over HTTP, in the Open Inference Protocol (KServe v2).

    python examples/serve_gvm.py gvm=runs/gvm/final server.port=8000
    torchrun --nproc-per-node 4 examples/serve_gvm.py gvm=... parallel.tensor_model_parallel_size=2

Endpoints (Triton's / PyTriton's HTTP API, so their clients work - tritonclient's is the DVPO actor's), on FastAPI:

* ``GET /v2/health/live``, ``GET /v2/health/ready`` - the process is up / the model is loaded;
* ``GET /v2``, ``GET /v2/models/gvm`` - server and model metadata; the model's ``parameters`` carry the
  vocabulary size, tokenizer fingerprint, chat-template flag, value statistics and checkpoint id that a
  client checks against its policy;
* ``POST /v2/models/gvm/infer`` - inputs ``tokens`` (INT64 [batch, length], right-padded) and ``lengths``
  (INT64 [batch]), output ``values`` (FP32 [batch, length], 0 past each row's length); JSON or binary
  tensors;
* ``GET /metrics`` - Prometheus counters and histograms (requests, batch sizes, latency), from ``prometheus_client``.

Concurrent requests that arrive within ``server.max_delay_ms`` of each other are merged into one model
batch of up to ``server.max_batch_tokens`` tokens. Every sequence is scored in a shape fixed by its own
length (:func:`nemo_dvpo.models.value_model.sequence_values`), so each request gets exactly the bits it
would get alone. A malformed request gets a 4xx naming what is wrong, a failure inside the model a 500;
the server keeps serving. SIGTERM/SIGINT finish the requests in flight, then every rank exits.

Under torchrun or srun, rank 0 of each model-parallel group serves HTTP (on ``server.port`` plus the
group's data-parallel rank: data-parallel replicas are separate endpoints) and broadcasts each batch to
the other ranks of its group, which run the model with it.

The tensors' wire format (JSON or binary, :mod:`nemo_dvpo.serving.kserve`) is decoded by hand rather than by a
pydantic model: binary tensors follow the JSON header in the same body, and a tensor's checks (shape against
data, nesting, datatype, byte counts) are what the 400s name.

This module owns the settings, the endpoints, the validation of a request, the metrics and the batching
policy (a token budget); the app's error handling, the uvicorn front, the request queue and its run loop, and
the leader/follower loop across model-parallel ranks are :mod:`nemo_dvpo.serving.http`'s, shared with the
policy server.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from nemo_dvpo.serving import http
from nemo_dvpo.serving.gvm_protocol import MODEL_NAME, model_metadata
from nemo_dvpo.serving.http import (BatchingService, ModelParallelRunner, Pending, authorize, check_server_settings,
                                    json_api, model_parallel_group, read_body, serve_until_stopped, server_token)
from nemo_dvpo.serving.kserve import HEADER_LENGTH, RequestError, infer_response, parse_infer_request
from nemo_dvpo.utils.distributed import ParallelConfig
from nemo_dvpo.utils.errors import ConfigError


@dataclass
class ServerConfig:
    # Interface to listen on. A host other than loopback needs a bearer token (the environment variable
    # token_env) or allow_unauthenticated.
    host: str = "127.0.0.1"
    # Port to listen on; data-parallel replica r listens on port + r.
    port: int = 8000
    # The environment variable holding the bearer token clients must send (unset: no token asked).
    token_env: str = "NEMO_DVPO_GVM_TOKEN"
    # Listen on a non-loopback host without a token.
    allow_unauthenticated: bool = False
    # Dynamic batching: wait up to max_delay_ms after a request for others to score with it.
    max_delay_ms: float = 5.0
    # Dynamic batching: the most tokens merged into one batch.
    max_batch_tokens: int = 32768
    # Longest sequence accepted (null: the model's sequence length).
    max_sequence_length: Optional[int] = None
    # Largest request body in bytes (413 above it).
    max_body_bytes: int = 64 * 2**20
    # How long a request waits for its values before the server answers 503.
    request_timeout_s: float = 600.0
    # The canonical scoring shape's rows per model micro-batch: clients that compare values with an
    # in-process GVM use the same.
    rows: int = 8
    # The canonical scoring shape's length bucket: sequences are padded to a multiple of it.
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


class ServerMetrics:
    """What the server did, in Prometheus' exposition format (``prometheus_client``, a registry per server)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("gvm_requests", "Inference requests by HTTP status", ["status"], registry=self.registry)
        self.sequences_total = Counter("gvm_sequences", "Sequences scored", registry=self.registry)
        self.batch_sequences = Histogram("gvm_batch_sequences", "Sequences per model batch",
                                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.latency = Histogram("gvm_request_latency_seconds", "Inference request latency",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)

    def request(self, status: int, seconds: Optional[float] = None, sequences: int = 0) -> None:
        self.requests.labels(status=str(status)).inc()
        self.sequences_total.inc(sequences)
        if seconds is not None:
            self.latency.observe(seconds)

    def batch(self, sequences: int) -> None:
        self.batch_sequences.observe(sequences)

    @property
    def sequences(self) -> int:
        """Sequences scored so far."""
        return int(self.registry.get_sample_value("gvm_sequences_total"))

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


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
        """Called from a thread: wait for this request's values."""
        return self._wait_for(_Pending(tokens, lengths))

    async def values(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Called on the event loop: wait for this request's values."""
        return await self.wait(_Pending(tokens, lengths))

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


_INLINE_BYTES = 2**18  # tensors up to this size are decoded and encoded on the event loop (well under 1 ms)


async def _work(in_thread: bool, function: Callable, *arguments):
    return await run_in_threadpool(function, *arguments) if in_thread else function(*arguments)


def make_app(service: ValueService, model_metadata: Callable[[], dict], token: Optional[str]):
    """The server's FastAPI app, bound to ``service``: the endpoints of the module docstring."""
    app = json_api(title="nemo_dvpo GVM server")
    ready = app.state.ready

    def serving() -> bool:
        return ready.is_set() and service.accepting

    @app.get("/v2/health/live")
    def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    def server_ready():
        return JSONResponse({"ready": serving()}, status_code=200 if serving() else 503)

    @app.get("/v2")
    def server_metadata(request: Request):
        authorize(request, token)
        return {"name": "nemo_dvpo", "version": "1", "extensions": ["binary_tensor_data"]}

    @app.get(f"/v2/models/{MODEL_NAME}")
    def metadata(request: Request):
        authorize(request, token)
        if not ready.is_set():
            raise RequestError(503, "the model is still loading")
        return model_metadata()

    @app.get(f"/v2/models/{MODEL_NAME}/ready")
    def model_ready(request: Request):
        authorize(request, token)
        return JSONResponse({"ready": ready.is_set()}, status_code=200 if ready.is_set() else 503)

    @app.get("/metrics")
    def metrics(request: Request):
        authorize(request, token)
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/v2/models/{model}/infer")
    async def infer(model: str, request: Request):
        started = time.perf_counter()
        try:
            authorize(request, token)
            if model != MODEL_NAME:
                raise RequestError(404, f"no model {model!r}; this server serves '{MODEL_NAME}'")
            body = await read_body(request, service.config.max_body_bytes)
            if not ready.is_set():
                raise RequestError(503, "the model is still loading")
            # Decoding and encoding a large body is CPU work for a worker thread, so that the event loop keeps
            # answering meanwhile; a small one takes less than the hand-over to a thread would.
            large = len(body) > _INLINE_BYTES
            parsed = await _work(large, parse_infer_request, body, request.headers.get(HEADER_LENGTH))
            tokens, lengths = await _work(large, service.validate, parsed.inputs)
            values = await service.values(tokens, lengths)
            answer, headers = await _work(values.nbytes > _INLINE_BYTES, infer_response, MODEL_NAME,
                                          {"values": values}, parsed.id, parsed.binary_output)
        except RequestError as error:
            service.metrics.request(error.status)
            raise
        service.metrics.request(200, time.perf_counter() - started, sequences=len(lengths))
        return Response(answer, headers=headers)

    return app


class HTTPFront(http.HTTPFront):
    """The GVM's HTTP front: :func:`make_app` for ``service``, served in a background thread."""

    def __init__(self, service: ValueService, model_metadata: Callable[[], dict], host: str, port: int,
                 token: Optional[str]):
        super().__init__(make_app(service, model_metadata, token), host, port, name="gvm-http")


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
        metadata = functools.partial(model_metadata, info, max_length, cfg.server.rows, cfg.server.bucket)
        front = HTTPFront(service, metadata, cfg.server.host, port, token)
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
