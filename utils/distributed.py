"""Process-group set-up and the few collective helpers the loop needs.

Works the same for a plain `python pretrain.py` (one process), `torchrun --nproc_per_node=N` (reads
RANK / WORLD_SIZE / LOCAL_RANK) and SLURM tasks started by srun (reads SLURM_PROCID /
SLURM_STEP_NUM_TASKS / SLURM_LOCALID when torchrun's variables are absent). SLURM_NTASKS is not used:
an sbatch/salloc shell sets it too, and a plain `python pretrain.py` there would wait for ranks that
never start; SLURM_STEP_NUM_TASKS describes the srun step the process actually belongs to.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from utils.config.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


def select_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` picks the local rank's GPU when there is one, else Apple's MPS, else the CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device={requested}, but no CUDA GPU is visible; use trainer.device=auto or cpu.")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def exit_with_torchrun_agent() -> None:
    """Under torchrun (Linux): receive SIGTERM when the torchrun agent dies, however it dies.

    torchrun starts every worker in a session of its own, so `kill -9` on the agent, or on its process
    group, used to leave the workers running as orphans: they kept training and writing checkpoints into
    the run directory, racing the rerun that resumes it. With PR_SET_PDEATHSIG the workers get the
    SIGTERM that torchrun itself would forward when stopped: they save a checkpoint at most one step old
    and exit 75 (utils/signals.py), so the rerun resumes from there. (SLURM/Kubernetes kill whole cgroups.)
    """
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the agent was gone before the prctl: nothing will send the signal
        os.kill(os.getpid(), signal.SIGTERM)


def _slurm_first_host() -> str:
    """The first node of the SLURM step (rank 0 runs there); localhost on a single node."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist or int(os.environ.get("SLURM_STEP_NUM_NODES", os.environ.get("SLURM_NNODES", "1"))) <= 1:
        return "127.0.0.1"
    try:  # scontrol expands compressed lists such as node[01-04]
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]


def init_distributed(device_request: str = "auto", backend: str | None = None,
                     timeout_s: float | None = None) -> DistInfo:
    """Join the process group if the environment describes one; otherwise a single process.

    `timeout_s` bounds how long a collective waits for a rank that stopped answering (a hung or unreachable
    node); None keeps torch's default (10 min for nccl, 30 min for gloo). A rank whose process died is seen
    at once either way: its sockets close and the collective fails on the others.
    """
    exit_with_torchrun_agent()
    world_size = _env_int("WORLD_SIZE", "SLURM_STEP_NUM_TASKS", default=1)
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    device = select_device(device_request, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if "MASTER_ADDR" not in os.environ:  # srun without torchrun: rendezvous on the step's first node
            os.environ["MASTER_ADDR"] = _slurm_first_host()
            # Spread over 20000 ports by job id so two jobs sharing a node rarely collide.
            os.environ.setdefault("MASTER_PORT", str(15000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
        timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics across ranks (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on any rank, so every rank takes the same branch (e.g. stopping)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_from_rank0(value: int) -> int:
    """Rank 0's `value` on every rank (identity in a single process), e.g. how many shards an epoch uses."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    packed = torch.tensor([value], dtype=torch.long, device=device)
    dist.broadcast(packed, src=0)
    return int(packed.item())
