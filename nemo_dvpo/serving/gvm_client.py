"""The DVPO actor's side of a served GVM: :class:`RemoteGVM`, a :class:`~nemo_dvpo.rlhf.scorers.ValueScorer`
over HTTP (``gvm=http://host:port``, several URLs comma-separated).

The calls are tritonclient's Open Inference Protocol client (``tritonclient.http``: binary tensors, kept-alive
connections), so the actor speaks to the server exactly as any Triton client does; what is ours is the
policy around them, which tritonclient does not have.

One rank per model-parallel group talks to the server and broadcasts the values (or the failure) to the
rest of its group, so no rank waits in a collective that another left; data-parallel ranks send their
own rollouts. Requests rotate over the URLs; a replica that fails is skipped for the next one, and after
a round in which every replica failed the client waits (exponential backoff) and tries again, a bounded
number of times, before it gives up with an error naming every URL and the last failure. A 4xx answer
is not retried: the request itself is wrong.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from nemo_dvpo.rlhf.scorers import ScorerInfo, ScorerUnavailable
from nemo_dvpo.serving.gvm_protocol import MODEL_NAME, info_from_metadata
from nemo_dvpo.utils.errors import ConfigError, NemoDvpoError


@dataclass
class GVMClientConfig:
    # Seconds one request may take (scoring a large rollout on a busy server takes a while).
    timeout_s: float = 300.0
    # Rounds over all URLs before giving up.
    max_retries: int = 5
    # The wait between rounds: it starts at backoff_s and doubles up to backoff_max_s.
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0  # the longest wait between rounds
    # At start, how long to wait for a server that is still loading its model (an 8B GVM takes minutes).
    ready_timeout_s: float = 600.0
    # How often to say so meanwhile.
    ready_notice_s: float = 30.0
    # Environment variable holding the bearer token, if the server asks for one.
    token_env: str = "NEMO_DVPO_GVM_TOKEN"

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_retries < 0 or self.backoff_s < 0:
            raise ConfigError("gvm_client.timeout_s must be > 0, max_retries and backoff_s >= 0")
        if self.ready_timeout_s < 0 or self.ready_notice_s <= 0:
            raise ConfigError(f"gvm_client.ready_timeout_s must be >= 0 and ready_notice_s > 0, got "
                              f"{self.ready_timeout_s} and {self.ready_notice_s}")


def is_url(gvm: Optional[str]) -> bool:
    return bool(gvm) and gvm.startswith(("http://", "https://"))


def parse_urls(gvm: str) -> list[str]:
    urls = [url.strip().rstrip("/") for url in gvm.split(",") if url.strip()]
    bad = [url for url in urls if not is_url(url)]
    if not urls or bad:
        raise ConfigError(f"gvm={gvm!r}: expected a GVM checkpoint folder or http(s)://host:port URLs "
                          f"separated by commas{f' (not a URL: {bad[0]})' if bad else ''}")
    return urls


class _CallFailed(Exception):
    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


def _transport_faults() -> tuple[type[BaseException], ...]:
    """What a call through tritonclient raises when the server cannot be reached or answers nonsense (gevent's
    Timeout is a BaseException: a network timeout of geventhttpclient)."""
    import http.client

    import gevent
    from tritonclient.utils import InferenceServerException

    return InferenceServerException, OSError, ValueError, http.client.HTTPException, gevent.Timeout


class GVMClient:
    """Calls to one or more GVM servers through tritonclient's Open Inference Protocol client (binary tensors),
    with the retry policy of the module docstring."""

    def __init__(self, urls: list[str], config: GVMClientConfig):
        self.urls, self.config = urls, config
        token = os.environ.get(config.token_env)
        self.headers = {"Authorization": f"Bearer {token}"} if token else None
        self._next = itertools.cycle(range(len(urls)))
        self._clients: dict[tuple[str, float], object] = {}

    def _client(self, url: str, timeout: float):
        """tritonclient's HTTP client for ``url`` whose calls give up after ``timeout`` seconds (one per URL and
        timeout, its connections kept alive between calls)."""
        import tritonclient.http as triton

        if (url, timeout) not in self._clients:
            secure = url.startswith("https://")
            self._clients[url, timeout] = triton.InferenceServerClient(
                url.split("://", 1)[1], ssl=secure, connection_timeout=timeout, network_timeout=timeout)
        return self._clients[url, timeout]

    def _call(self, url: str, what, timeout: Optional[float] = None):
        """``what(client)`` with the client for ``url``; a failure becomes :class:`_CallFailed`, retried unless
        the server refused the request itself (a 4xx other than 429)."""
        from tritonclient.utils import InferenceServerException

        try:
            return what(self._client(url, timeout or self.config.timeout_s))
        except _transport_faults() as error:
            if isinstance(error, InferenceServerException):
                status = int(error.status()) if (error.status() or "").isdigit() else None
                retry = status is None or status >= 500 or status == 429
                raise _CallFailed(f"HTTP {status}: {error.message()}" if status else str(error), retry) from None
            raise _CallFailed(f"{type(error).__name__}: {error}", retry=True) from None

    def with_retries(self, what):
        """The first successful ``what(client)`` from any URL, rotating over them; raises
        :class:`ScorerUnavailable` when every round failed."""
        started, wait, last = time.monotonic(), self.config.backoff_s, ""
        for attempt in range(self.config.max_retries + 1):
            for _ in range(len(self.urls)):
                url = self.urls[next(self._next)]
                try:
                    return self._call(url, what)
                except _CallFailed as error:
                    if not error.retry:
                        raise NemoDvpoError(f"the GVM server at {url} refused the request: {error}") from None
                    last = f"{url}: {error}"
            if attempt < self.config.max_retries:
                time.sleep(wait)
                wait = min(wait * 2, self.config.backoff_max_s)
        raise ScorerUnavailable(
            f"the GVM server did not answer ({', '.join(self.urls)}) after {self.config.max_retries + 1} rounds over "
            f"{time.monotonic() - started:.0f} s; last failure: {last}")

    def wait_until_ready(self) -> None:
        """Poll the servers' readiness until one answers, saying what it waits for at start and every
        ``ready_notice_s``; give up after ``ready_timeout_s`` with one line naming the URLs and the last error."""
        started = time.monotonic()
        deadline = started + self.config.ready_timeout_s
        where = ", ".join(self.urls)
        last, next_notice = "", started
        while True:
            for url in self.urls:
                try:
                    if self._call(url, lambda client: client.is_server_ready(headers=self.headers), timeout=10):
                        if next_notice > started:  # it had to wait: say when it stopped
                            print(f"[gvm_client] {url} is ready after {time.monotonic() - started:.0f} s", flush=True)
                        return
                    last = f"{url}: not ready yet (the model is loading)"
                except _CallFailed as error:
                    last = f"{url}: {error}"
            now = time.monotonic()
            if now > deadline:
                raise ScorerUnavailable(f"no GVM server became ready at {where} within gvm_client.ready_timeout_s="
                                        f"{self.config.ready_timeout_s:g} s; last error {last}")
            if now >= next_notice:
                print(f"[gvm_client] waiting for the GVM server at {where} to be ready: {deadline - now:.0f} s left "
                      f"(gvm_client.ready_timeout_s); last error {last}", flush=True)
                next_notice = now + self.config.ready_notice_s
            time.sleep(min(1.0, max(0.0, deadline - now)))

    def info(self) -> ScorerInfo:
        """What the servers serve; every URL must serve the same GVM."""
        infos = []
        for url in self.urls:
            try:
                metadata = self._call(url, lambda client: client.get_model_metadata(MODEL_NAME, headers=self.headers),
                                      timeout=30)
            except _CallFailed as error:
                raise ScorerUnavailable(f"cannot read the model metadata of {url}: {error}") from None
            infos.append(info_from_metadata(metadata, url))
        fingerprints = {(info.tokenizer_fingerprint, info.checkpoint.split(" (", 1)[1]) for info in infos}
        if len(fingerprints) > 1:
            raise ConfigError(f"the GVM servers {', '.join(self.urls)} serve different GVMs")
        return infos[0]

    def values(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        import tritonclient.http as triton

        inputs = []
        for name, array in (("tokens", tokens), ("lengths", lengths)):
            tensor = triton.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(np.ascontiguousarray(array, dtype=np.int64), binary_data=True)
            inputs.append(tensor)
        outputs = [triton.InferRequestedOutput("values", binary_data=True)]
        result = self.with_retries(
            lambda client: client.infer(MODEL_NAME, inputs, outputs=outputs, headers=self.headers))
        return result.as_numpy("values")


class RemoteGVM:
    """A :class:`~nemo_dvpo.rlhf.scorers.ValueScorer` served over HTTP (see the module docstring)."""

    def __init__(self, gvm: str, config: GVMClientConfig, group=None):
        import torch.distributed as dist

        self.urls = parse_urls(gvm)
        # ``group``: this rank's model-parallel group; None when the rank is a group of its own.
        self.group = group
        self.leader = dist.get_process_group_ranks(group)[0] if group is not None else None
        self.is_leader = group is None or dist.get_rank() == self.leader
        self.client = GVMClient(self.urls, config) if self.is_leader else None
        payload: list = [None]
        if self.is_leader:
            try:
                self.client.wait_until_ready()
                payload[0] = ("ok", self.client.info())
            except NemoDvpoError as error:
                payload[0] = ("error", str(error), type(error).__name__)
        if group is not None:
            dist.broadcast_object_list(payload, src=self.leader, group=group)
        if payload[0][0] == "error":
            raise (ConfigError if payload[0][2] == "ConfigError" else ScorerUnavailable)(payload[0][1])
        self.info = payload[0][1]

    def values(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        status: list = [None]
        values = None
        if self.is_leader:
            try:
                values = torch.from_numpy(self.client.values(tokens.cpu().numpy(), lengths.cpu().numpy()).copy())
                status[0] = None
            except NemoDvpoError as error:
                status[0] = (str(error), isinstance(error, ScorerUnavailable))
        if self.group is not None:
            # The outcome first, so that every rank of the group raises together or receives the values.
            dist.broadcast_object_list(status, src=self.leader, group=self.group)
        if status[0] is not None:
            message, unavailable = status[0]
            raise (ScorerUnavailable if unavailable else NemoDvpoError)(message)
        if self.group is not None:
            from nemo_dvpo.utils.distributed import compute_device

            buffer = values.to(compute_device()) if self.is_leader else torch.empty(
                tokens.shape, dtype=torch.float32, device=compute_device())
            dist.broadcast(buffer, src=self.leader, group=self.group)
            values = buffer.cpu()
        return values.to(tokens.device)
