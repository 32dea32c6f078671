"""The Slurm scripts of examples/slurm/, submitted to a real Slurm (slurmctld + two slurmd + munged) that the
test starts in a temporary folder on this machine, with the tiny preset on CPU.

Needs Debian's ``slurm-wlm`` and ``munge`` (``apt-get install slurm-wlm munge``) and root (slurmd runs jobs as
their user); skipped with the reason otherwise. The two Slurm nodes are two slurmd processes on this machine,
named by two host names that resolve to it (``localhost`` and the host name), since a heterogeneous job's
components get nodes of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, entry_point_env

pytestmark = pytest.mark.slow  # every test here trains, converts or launches ranks (see pyproject.toml)

FIXTURE = "tests/fixtures/ultrafeedback_binarized_mini.jsonl"
BINARIES = ("slurmctld", "slurmd", "munged", "munge", "sbatch", "srun", "scontrol", "sinfo")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class SlurmCluster:
    """munged, slurmctld and one slurmd per node name, all under ``root`` and on loopback."""

    def __init__(self, root: Path, nodes: list[str]):
        self.root, self.nodes = root, nodes
        ctld_port, *node_ports = _free_ports(1 + len(nodes))
        (root / "state").mkdir()
        (root / "spool").mkdir()
        munge_dir = root / "munge"
        munge_dir.mkdir(mode=0o700)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = munge_dir / "munge.socket"
        node_lines = "\n".join(
            f"NodeName={name} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={port} CPUs=2 "
            f"RealMemory=8000 State=UNKNOWN" for name, port in zip(nodes, node_ports))
        self.conf = root / "slurm.conf"
        # MinJobAge=0 (never purge finished jobs, fine for a cluster that lives one module): `sbatch --wait` polls
        # every 2 s, then 8 s, then 32 s unless a third of MinJobAge is below that - with the default of 300 s
        # every job here took at least 42 s however soon it ended.
        self.conf.write_text(f"""ClusterName=nemodvpotest
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
DefMemPerCPU=1000
JobCompType=jobcomp/none
MinJobAge=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
{node_lines}
PartitionName=test Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP
""")
        self.env = {**entry_point_env(), "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        subprocess.run(["munged", "--force", f"--socket={self.munge_socket}",
                        f"--key-file={self.munge_socket.parent / 'munge.key'}",
                        f"--pid-file={self.munge_socket.parent / 'munged.pid'}",
                        f"--log-file={self.munge_socket.parent / 'munged.log'}",
                        f"--seed-file={self.munge_socket.parent / 'munged.seed'}"], check=True)
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        for name in self.nodes:
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", name], check=True, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                                    env=self.env).stdout.split()
            if len(states) == len(self.nodes) and all(state == "idle" for state in states):
                return
            time.sleep(0.5)
        raise AssertionError("the Slurm nodes did not come up:\n" + self.logs())

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted(self.root.glob("*.log")))

    def sbatch(self, script: str, options: list[str], arguments: list[str], env: dict,
               timeout: int = 900) -> tuple[int, str]:
        """Submit ``script`` and wait for it; return its exit code and output."""
        output = self.root / f"{Path(script).stem}-%j.out"
        completed = subprocess.run(
            ["sbatch", "--wait", "--parsable", f"--output={output}", *options, script, *arguments],
            cwd=REPO_ROOT, env={**self.env, **env}, capture_output=True, text=True, timeout=timeout)
        job_id = completed.stdout.strip().split(";")[0].split("+")[0]
        log = output.with_name(output.name.replace("%j", job_id))
        text = log.read_text() if log.exists() else completed.stderr
        return completed.returncode, text

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True)
        subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True)
        for pid_file in self.root.glob("slurmd.*.pid"):
            try:
                os.kill(int(pid_file.read_text()), 15)
            except (OSError, ValueError):
                pass
        subprocess.run(["munged", f"--socket={self.munge_socket}", "--stop"], capture_output=True)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if missing:
        pytest.skip(f"Slurm is not installed here ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (slurmd runs the jobs)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), ["n1", "n2"])
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _env(**extra) -> dict:
    return {"PYTHON": sys.executable, "NEMO_DVPO_DIR": str(REPO_ROOT), "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1", **extra}


CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=00:20:00"]


def test_train_gvm_sbatch_trains_on_two_data_parallel_tasks(slurm, tmp_path):
    run_dir = tmp_path / "gvm"
    code, output = slurm.sbatch("examples/slurm/train_gvm.sbatch", ["--nodes=1", "--ntasks-per-node=2", *CPU_JOB],
                                ["model=tiny", f"run_dir={run_dir}", f"data.train={FIXTURE}", f"data.eval={FIXTURE}",
                                 "train.steps=4", "train.global_batch_size=8", "train.micro_batch_size=4",
                                 "train.eval_every=2", "train.save_every=2", "train.eval_max_pairs=8"], _env())
    assert code == 0, output[-6000:] + slurm.logs()
    assert (run_dir / "final" / "nemo_dvpo_checkpoint.json").exists()
    assert json.loads((run_dir / "final" / "nemo_dvpo_checkpoint.json").read_text())["saved_with"][
        "data_parallel_size"] == 2
    assert sorted(json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()) == \
        [1, 2, 3, 4]


def _dvpo_arguments(work_dir: Path, run_dir: Path) -> list[str]:
    return ["model=tiny", f"run_dir={run_dir}", f"init_from={work_dir / 'init'}", "rollout.prompts_per_step=4",
            "rollout.sampling.max_new_tokens=10", "ppo.micro_batch_size=1", "data.max_prompt_tokens=96",
            "eval.num_prompts=4", "eval.batch_size=4", "eval.max_new_tokens=8", "optim.lr=1e-3", "train.steps=2",
            "export_hf=false"]


def test_train_dvpo_sbatch_runs_on_two_nodes(slurm, tiny_policy_and_gvm, tmp_path):
    run_dir = tmp_path / "dvpo"
    code, output = slurm.sbatch("examples/slurm/train_dvpo.sbatch", ["--nodes=2", "--ntasks-per-node=1", *CPU_JOB],
                                [*_dvpo_arguments(tiny_policy_and_gvm, run_dir), f"gvm={tiny_policy_and_gvm / 'gvm'}"],
                                _env())
    assert code == 0, output[-6000:] + slurm.logs()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_this_run"] == 2 and summary["gvm"] == str(tiny_policy_and_gvm / "gvm")


def test_hetjob_serves_the_gvm_on_its_own_node_and_the_actor_trains_with_its_values(slurm, tiny_policy_and_gvm,
                                                                                   tmp_path):
    run_dir = tmp_path / "dvpo_het"
    options = ["--nodes=1", "--ntasks-per-node=1", *CPU_JOB, ":", "--nodes=1", "--ntasks-per-node=2", *CPU_JOB]
    code, output = slurm.sbatch("examples/slurm/dvpo_hetjob.sbatch", options,
                                _dvpo_arguments(tiny_policy_and_gvm, run_dir),
                                _env(GVM=str(tiny_policy_and_gvm / "gvm"), GVM_PORT=str(_free_ports(1)[0])))
    assert code == 0, output[-6000:] + slurm.logs()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps_this_run"] == 2
    assert summary["gvm"].startswith("http://127.0.0.1:"), summary["gvm"]  # node n1's address
    assert "[serve_gvm] serving http://0.0.0.0:" in output
    assert "every request in flight was answered" in output  # the server stopped cleanly after the actor


def test_convert_sbatch_exports_a_checkpoint(slurm, tiny_policy_and_gvm, tmp_path):
    exported = tmp_path / "hf"
    code, output = slurm.sbatch("examples/slurm/convert.sbatch", ["--nodes=1", "--ntasks-per-node=1", *CPU_JOB],
                                ["--megatron-path", str(tiny_policy_and_gvm / "init"), "--hf-path", str(exported)],
                                _env(CONVERT="to_hf"))
    assert code == 0, output[-6000:] + slurm.logs()
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(exported).hidden_size == 64
