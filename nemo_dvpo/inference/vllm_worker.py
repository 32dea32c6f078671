"""The vLLM rollout engine's process: one ``vllm.LLM`` answering requests over a ``multiprocessing`` connection.

Runs with the vLLM environment's python (``.venv-vllm``, built by ``tools/setup_vllm_env.sh``) as a file::

    .venv-vllm/bin/python nemo_dvpo/inference/vllm_worker.py --connect 127.0.0.1:PORT --engine-args JSON
    .venv-vllm/bin/python nemo_dvpo/inference/vllm_worker.py --listen 0.0.0.0:PORT --engine-args JSON

It imports only vllm, torch and the standard library (the trainer's environment and this one differ:
transformers 4 there, >= 5.16 here). ``--connect`` is how :class:`nemo_dvpo.inference.vllm_engine.VllmEngine`
starts it as its child: it dies with the trainer (``PR_SET_PDEATHSIG`` plus a watchdog on the parent's pid,
either of which takes its whole process group down, vLLM's own processes included) and ends when the
connection drops. ``--listen`` serves a separately launched engine (a Slurm het group): it loads the model
once and serves one trainer connection at a time, for as long as it runs, so a resumed trainer reconnects.
The connection's authentication key comes from ``NEMO_DVPO_VLLM_AUTHKEY`` (hex), never the command line.

Requests are dicts ``{"op": name, ...}``; every answer is ``{"ok": True, ...}`` or ``{"ok": False, "error":
traceback}``. See :class:`Worker` for the operations.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client, Connection, Listener

PR_SET_PDEATHSIG = 1
AUTHKEY_ENV = "NEMO_DVPO_VLLM_AUTHKEY"
EXTENSION = "vllm_worker_extension.RefitExtension"
PROTOCOL_VERSION = 1


def _kill_own_group() -> None:
    """SIGKILL this process's group: the worker is its leader (started in a new session), and vLLM's engine
    core and executor processes are in it, so nothing of the engine outlives the trainer."""
    try:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    finally:
        os._exit(1)


def die_with_parent(parent_pid: int) -> None:
    """End this process group when ``parent_pid`` ends, however it ends (SIGKILL included).

    The kernel sends SIGTERM at the parent's death (``PR_SET_PDEATHSIG``; Linux only); its handler kills the
    group. A thread watching ``getppid()`` covers the race where the parent died before ``prctl`` ran and a
    handler that cannot run while the main thread sits in a long C call that holds the GIL.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    signal.signal(signal.SIGTERM, lambda *_: _kill_own_group())
    if os.getppid() != parent_pid:
        _kill_own_group()

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        _kill_own_group()

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def row_seed(seed: int, row: int) -> int:
    """The per-request seed of row ``row`` in a call seeded ``seed``: distinct rows (several samples of one
    prompt) draw independently, and the same ``(seed, row)`` always draws the same."""
    digest = hashlib.sha256(f"nemo_dvpo-vllm:{seed}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sampling_params(sampling: dict, row: int):
    """vLLM's ``SamplingParams`` meaning what nemo_dvpo's ``SamplingConfig`` means (see vllm_engine.py)."""
    from vllm import SamplingParams

    greedy = sampling["greedy"] or sampling["temperature"] == 0
    stop_ids = list(sampling["stop_token_ids"]) if sampling["stop_on_eos"] else []
    return SamplingParams(
        n=1,
        max_tokens=sampling["max_new_tokens"],
        temperature=0.0 if greedy else float(sampling["temperature"]),
        top_k=0 if greedy else int(sampling["top_k"]),
        top_p=1.0 if greedy else float(sampling["top_p"]),
        seed=None if greedy else row_seed(int(sampling["seed"]), row),
        # Our stop rule only: the ids we pass, never the model's generation_config EOS on its own.
        ignore_eos=True,
        stop_token_ids=stop_ids,
        min_tokens=0,
        # The sampled token's log-prob (logprobs=0); "processed" mode (see Worker) makes it the
        # log-prob under the distribution drawn from, as our sampler reports it.
        logprobs=0,
        detokenize=False,
        skip_special_tokens=False,
    )


class Worker:
    """One engine and the operations a connection may ask of it."""

    def __init__(self, engine_args: dict):
        from vllm import LLM

        self.engine_args = dict(engine_args)
        kwargs = dict(engine_args)
        kwargs.setdefault("worker_extension_cls", EXTENSION)
        # The log-prob of a sampled token under the distribution it was drawn from (after temperature,
        # top-k and top-p); greedy rows keep the model's own log-softmax - as nemo_dvpo's sampler.
        kwargs.setdefault("logprobs_mode", "processed_logprobs")
        # No sampling defaults from the checkpoint's generation_config.json: a request means what it says.
        kwargs.setdefault("generation_config", "vllm")
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # vLLM 0.32's CPU runner cannot rewind a seeded request's generator when a prompt is split over
            # scheduler steps ("CPU Generator does not use offset"): no split prompts. Every prompt then has to
            # fit one step's token budget.
            kwargs.setdefault("enable_chunked_prefill", False)
            kwargs.setdefault("max_num_batched_tokens", max(4096, int(kwargs.get("max_model_len") or 0)))
        started = time.perf_counter()
        self.llm = LLM(**kwargs)
        self.load_seconds = time.perf_counter() - started
        import torch
        import vllm

        self.info = {"protocol": PROTOCOL_VERSION, "vllm": vllm.__version__, "torch": torch.__version__,
                     "pid": os.getpid(), "load_seconds": self.load_seconds,
                     "max_model_len": self.llm.llm_engine.model_config.max_model_len}

    def handle(self, request: dict) -> dict:
        op = request.get("op")
        method = getattr(self, f"op_{op}", None)
        if method is None:
            raise ValueError(f"unknown operation {op!r}")
        return method(**{key: value for key, value in request.items() if key != "op"})

    def op_ping(self) -> dict:
        return dict(self.info)

    def op_generate(self, prompts: list, sampling: dict) -> dict:
        from vllm.inputs import TokensPrompt

        started = time.perf_counter()
        requests = [TokensPrompt(prompt_token_ids=list(prompt)) for prompt in prompts]
        params = [sampling_params(sampling, row) for row in range(len(prompts))]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        token_ids, logprobs, finish_reasons = [], [], []
        for output in outputs:
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            token_ids.append(ids)
            logprobs.append([float(step[token].logprob) for token, step in zip(ids, completion.logprobs)])
            finish_reasons.append(completion.finish_reason)
        return {"token_ids": token_ids, "logprobs": logprobs, "finish_reasons": finish_reasons,
                "seconds": time.perf_counter() - started}

    def op_score(self, sequences: list, prompt_lengths: list) -> dict:
        """The model's own log-prob (temperature 1, no filters) of every token after each row's prompt."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=list(sequence)) for sequence in sequences]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        result = []
        for output, sequence, start in zip(outputs, sequences, prompt_lengths):
            # prompt_logprobs[t] is log p(sequence[t] | sequence[:t]); entry 0 is None (no context).
            steps = output.prompt_logprobs
            result.append([float(steps[t][sequence[t]].logprob) for t in range(start, len(sequence))])
        return {"logprobs": result}

    def op_load_shared_memory(self, segment: str, entries: list) -> dict:
        started = time.perf_counter()
        counts = self.llm.collective_rpc("load_from_shared_memory", args=(segment, entries))
        return {"loaded": counts, "seconds": time.perf_counter() - started}

    def op_load_cuda_ipc(self, handles_by_device: dict, entries: list) -> dict:
        started = time.perf_counter()
        counts = self.llm.collective_rpc("load_from_cuda_ipc", args=(handles_by_device, entries))
        return {"loaded": counts, "seconds": time.perf_counter() - started}

    def op_init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int) -> dict:
        self.llm.collective_rpc("init_weight_group", args=(host, port, rank_offset, world_size))
        return {}

    def op_load_from_broadcast(self, entries: list, nbytes: int) -> dict:
        started = time.perf_counter()
        counts = self.llm.collective_rpc("load_from_broadcast", args=(entries, nbytes))
        return {"loaded": counts, "seconds": time.perf_counter() - started}

    def op_begin_refit(self) -> dict:
        started = time.perf_counter()
        self.llm.collective_rpc("begin_refit")
        return {"seconds": time.perf_counter() - started}

    def op_finish_refit(self) -> dict:
        started = time.perf_counter()
        self.llm.collective_rpc("end_refit")
        # KV blocks cached for a prefix were computed with the old weights: none may be reused.
        reset = bool(self.llm.reset_prefix_cache())
        if not reset:
            raise RuntimeError("vLLM did not reset its prefix cache after a refit (requests still running?)")
        return {"seconds": time.perf_counter() - started}

    def op_parameter_checksum(self) -> dict:
        return {"checksums": self.llm.collective_rpc("parameter_checksum")}

    def op_sleep(self, level: int = 1) -> dict:
        self.llm.sleep(level=level)
        return {}

    def op_wake_up(self, tags: list | None = None) -> dict:
        self.llm.wake_up(tags=tags)
        return {}


def serve(worker: Worker, connection: Connection) -> bool:
    """Answer requests until the connection ends; True when asked to shut the whole worker down."""
    while True:
        try:
            request = connection.recv()
        except (EOFError, OSError):
            return False
        op = request.get("op") if isinstance(request, dict) else None
        if op in ("close", "shutdown"):
            connection.send({"ok": True})
            connection.close()
            return op == "shutdown"
        try:
            answer = {"ok": True, **worker.handle(request)}
        except Exception:  # noqa: BLE001 - the trainer receives the traceback and raises it there
            answer = {"ok": False, "error": traceback.format_exc()}
        try:
            connection.send(answer)
        except (EOFError, OSError):
            return False


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--connect", type=_address, help="connect to the trainer that started this worker")
    mode.add_argument("--listen", type=_address, help="serve trainers connecting to HOST:PORT")
    parser.add_argument("--engine-args", required=True, help="vllm.LLM keyword arguments as JSON")
    parser.add_argument("--parent-pid", type=int, help="die with this process (set by the trainer)")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    if AUTHKEY_ENV not in os.environ:
        parser.error(f"set {AUTHKEY_ENV} (hex) to the key the trainer uses")
    authkey = bytes.fromhex(os.environ[AUTHKEY_ENV])
    # vLLM imports EXTENSION by name, maybe in processes of its own: this folder must be on their path too.
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    if here not in sys.path:
        sys.path.insert(0, here)
    engine_args = json.loads(args.engine_args)

    if args.connect:
        # Connect first: the trainer then sees a failed engine start as an answer, not a silent timeout.
        connection = Client(args.connect, authkey=authkey)
        try:
            worker = Worker(engine_args)
        except Exception:  # noqa: BLE001
            connection.send({"ok": False, "error": traceback.format_exc()})
            return 1
        connection.send({"ok": True, **worker.info})
        serve(worker, connection)
        return 0

    worker = Worker(engine_args)
    with Listener(args.listen, authkey=authkey) as listener:
        print(f"[vllm_worker] serving on {listener.address[0]}:{listener.address[1]}", flush=True)
        while True:
            try:
                connection = listener.accept()
            except Exception as error:  # noqa: BLE001 - a wrong key or a port scan: keep serving
                print(f"[vllm_worker] refused a connection: {error!r}", flush=True)
                continue
            connection.send({"ok": True, **worker.info})
            if serve(worker, connection):
                return 0


if __name__ == "__main__":
    sys.exit(main())
