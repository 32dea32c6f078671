"""Process-group and model-parallel start-up under torchrun, srun or plain ``python``.

The launcher is detected from the environment:

* torchrun (or any launcher that sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``): used as is.
* Slurm ``srun``: ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; the master address is the
  first host of ``SLURM_JOB_NODELIST`` (or ``SLURM_NODELIST``) unless ``MASTER_ADDR`` is set.
* plain ``python``: a world of one process on a free local port.

The backend is nccl when CUDA is available and gloo otherwise.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_dvpo.utils.errors import ConfigError


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


@dataclass
class ParallelConfig:
    """Model-parallel layout. Data parallelism fills the rest of the world."""

    # Ranks each layer's weights are split over (megatron-core tensor parallelism).
    tensor_model_parallel_size: int = 1
    # Pipeline stages the layers are split into.
    pipeline_model_parallel_size: int = 1
    # Seeds megatron-core's model-parallel random states (dropout and initialisation on GPUs).
    seed: int = 1234
    # How long a collective waits for the other ranks before the run fails.
    timeout_minutes: int = 30

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{name} must be a positive integer, got {value!r}")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list such as ``gpu[01-03,07],login1`` into host names."""
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"(.*?)\[([^\]]+)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            if "-" in item:
                start, end = item.split("-", 1)
                width = len(start)
                hosts.extend(f"{prefix}{index:0{width}d}{suffix}" for index in range(int(start), int(end) + 1))
            else:
                hosts.append(f"{prefix}{item}{suffix}")
    return hosts


def slurm_rendezvous_port(env: dict[str, str]) -> int:
    """A port in 20000..39999 from the job and step ids: jobs (and a heterogeneous job's components, which
    have job ids of their own) that share a node, and concurrent steps of one job, do not collide."""
    job_id, step_id = int(env.get("SLURM_JOB_ID", "0")), int(env.get("SLURM_STEP_ID", "0") or 0)
    return 20000 + (job_id + 7919 * step_id) % 20000


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def detect_launch(environ: dict[str, str] | None = None) -> LaunchInfo:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchInfo(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        # The step's own nodes: in a heterogeneous job each component's step rendezvouses among its nodes.
        nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
                    or "127.0.0.1")
        return LaunchInfo(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=env.get("MASTER_ADDR") or expand_slurm_nodelist(nodelist)[0],
            master_port=int(env.get("MASTER_PORT") or slurm_rendezvous_port(env)),
            launcher="slurm",
        )
    return LaunchInfo(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                      master_port=int(env.get("MASTER_PORT") or _free_port()), launcher="single")


def install_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent dies (``PR_SET_PDEATHSIG``).

    Under torchrun the ranks are children of the launcher; if the launcher is killed outright
    (SIGKILL, OOM killer), they would otherwise run on as orphans. With SIGTERM they stop at the next
    step with a checkpoint. Returns whether it was installed (Linux only).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    # The parent may already have died between our start and the call above.
    if os.getppid() == 1:
        os.kill(os.getpid(), signum)
    return True


def validate_parallel_layout(world_size: int, parallel: ParallelConfig,
                             num_attention_heads: int | None = None,
                             num_query_groups: int | None = None,
                             num_layers: int | None = None) -> None:
    """Refuse layouts Megatron cannot shard, before any process group is created."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if num_attention_heads is not None and num_attention_heads % tp != 0:
        raise ConfigError(
            f"tensor_model_parallel_size={tp} does not divide the model's {num_attention_heads} attention heads"
        )
    if num_query_groups is not None and num_query_groups % tp != 0:
        raise ConfigError(
            f"tensor_model_parallel_size={tp} does not divide the model's {num_query_groups} "
            "key/value groups (num_query_groups)"
        )
    if num_layers is not None and num_layers % pp != 0:
        raise ConfigError(
            f"pipeline_model_parallel_size={pp} does not divide the model's {num_layers} layers"
        )
    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not a multiple of tensor_model_parallel_size x "
            f"pipeline_model_parallel_size = {tp} x {pp} = {tp * pp}"
        )


def initialize_distributed(parallel: ParallelConfig, **model_shape: int | None) -> LaunchInfo:
    """Create the process group and Megatron's model-parallel groups; seed Megatron's RNGs.

    ``model_shape`` takes ``num_attention_heads``, ``num_query_groups`` and ``num_layers`` so that
    an impossible layout fails here with a message instead of deep inside Megatron.
    Idempotent for the same layout.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    quiet_megatron_logging()
    launch = detect_launch()
    validate_parallel_layout(launch.world_size, parallel, **model_shape)
    if launch.launcher == "torchrun":
        # Ranks must not outlive a launcher that was killed outright: they stop with a checkpoint instead.
        install_parent_death_signal()

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(launch.local_rank)
        # The rendezvous address is passed explicitly rather than exported, so that child
        # processes (tools a test or a script starts) do not inherit this job's port.
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=parallel.timeout_minutes),
        )

    if parallel_state.model_parallel_is_initialized():
        current = (parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_pipeline_model_parallel_world_size())
        if current != (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size):
            parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        )
    model_parallel_cuda_manual_seed(parallel.seed)
    return launch


def standalone_model_groups(tensor_parallel: int):
    """Process groups for a model that runs at its own tensor-parallel size: TP ``tensor_parallel``,
    no pipeline parallelism, data parallelism over the rest of the world.

    The frozen GVM may use a different TP size from the policy (e.g. a smaller one, so its forward pass
    needs less communication); megatron-core models take their groups from a ``ProcessGroupCollection``
    instead of the global parallel state, so the two layouts coexist. TP groups are blocks of
    consecutive ranks, as in megatron's default order, so on a multi-GPU node they stay within the node.
    Collective: every rank calls it once, with the same argument.
    """
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from megatron.core.process_groups_config import ProcessGroupCollection

    world_size = dist.get_world_size()
    if not isinstance(tensor_parallel, int) or tensor_parallel < 1 or world_size % tensor_parallel:
        raise ConfigError(f"a tensor-parallel size of {tensor_parallel!r} does not divide the world size {world_size}")
    grid = HyperCommGrid([tensor_parallel, 1, world_size // tensor_parallel, 1], ["tp", "cp", "dp", "pp"])
    groups = ProcessGroupCollection()
    groups.tp = grid.create_pg("tp")
    groups.cp = grid.create_pg("cp")
    groups.dp = grid.create_pg("dp")
    groups.pp = grid.create_pg("pp")
    groups.mp = grid.create_pg(["tp", "pp"])
    groups.tp_cp = grid.create_pg(["tp", "cp"])
    groups.dp_cp = grid.create_pg(["cp", "dp"])
    # With a single pipeline stage the embedding and output layer live on the same rank.
    groups.embd = groups.pp
    groups.pos_embd = groups.pp
    return groups


def quiet_megatron_logging() -> None:
    """megatron-core logs every parameter of every DDP bucket and its full optimizer config at
    INFO; entry points keep their own INFO output and see only megatron's warnings."""
    import logging

    for name in ("megatron.core", "megatron.bridge"):
        logging.getLogger(name).setLevel(logging.WARNING)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank_zero(*args, **kwargs) -> None:
    if is_rank_zero():
        print(*args, **kwargs, flush=True)


def compute_device() -> torch.device:
    """Where models run: this rank's GPU, or the CPU without CUDA."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_on_device(tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a tensor wherever it lives: NCCL only reduces GPU tensors, so CPU ones make a round trip.

    Returns the reduced tensor on the input's device (in place when no copy was needed).
    """
    device = compute_device()
    if tensor.device == device:
        dist.all_reduce(tensor, op=op, group=group)
        return tensor
    on_device = tensor.to(device)
    dist.all_reduce(on_device, op=op, group=group)
    return on_device.to(tensor.device)


def model_parallel_group():
    """This rank's model-parallel group (tensor x pipeline), or None when it has only this rank."""
    from megatron.core import parallel_state

    group = parallel_state.get_model_parallel_group()
    return group if dist.get_world_size(group) > 1 else None
