"""Process-group plumbing for data-parallel runs: who am I, and small collectives.

A run is launched with one process per device by the ``deepspeed`` launcher (or torchrun);
both set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (under
Hydra's submitit launcher with several tasks per job they are derived from the SLURM job). A single
process with ``distributed=ddp|zero2`` is a world of one (a single-GPU ZeRO-2 run is valid).
Every helper is a no-op (or the identity) when no process group is up, so the training code
has one path for one process and for many.

Conventions: rank 0 writes every file of the run (config, logs, checkpoints, predictions,
results); every rank reads checkpoints (a shared filesystem, as on any cluster).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as tdist

from badit_exp.config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    """This process's place in the run."""

    name: str = "none"  # none | ddp | zero2
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_from_submitit() -> None:
    """Inside a SLURM job started by Hydra's submitit launcher with several tasks
    (``hydra.launcher.tasks_per_node=8``), export what torch.distributed reads."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    try:
        import submitit

        env = submitit.JobEnvironment()
    except Exception:  # noqa: BLE001 - not a submitit job: the launcher set nothing to map
        return
    job = "".join(ch for ch in str(env.job_id).split("_")[0] if ch.isdigit()) or "0"
    os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks),
                      LOCAL_RANK=str(env.local_rank), MASTER_ADDR=env.hostnames[0])
    os.environ.setdefault("MASTER_PORT", str(20000 + int(job) % 20000))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skip_shm_comm_op() -> None:
    """Keep DeepSpeed from loading its shared-memory all-reduce op on CPU.

    DeepSpeed's CPU backend JIT-builds ``deepspeed_shm_comm`` when its process group comes up,
    under ``~/.cache/torch_extensions`` behind a lock file that every load takes, even with
    the library already built. A process killed while it holds that lock leaves the file behind
    and every later CPU ZeRO run on the machine waits on it forever, with nothing printed (a
    CI run hung 600 s this way). The op serves only DeepSpeed's inference all-reduce; ZeRO's
    collectives go through gloo. ``deepspeed.ops.__compatible_ops__`` is probed once per process
    and kept as one dict, so marking the op incompatible there makes DeepSpeed skip it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init(dcfg, device: torch.device) -> DistContext:
    """Start the process group ``dcfg`` asks for (``distributed.*``) on ``device``'s backend.

    Raises:
        ConfigError: a multi-process launch with ``distributed=none`` (every process would train
            alone and write the same files).
    """
    _env_from_submitit()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dcfg.name == "none":
        if world > 1:
            raise ConfigError(f"launched with WORLD_SIZE={world} processes but distributed=none; "
                              "add distributed=ddp or distributed=zero2 (or launch one process).")
        return DistContext()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if world > 1:
            raise ConfigError("WORLD_SIZE > 1 but MASTER_PORT is not set; launch with the "
                              "deepspeed launcher or torchrun, which set it.")
        os.environ["MASTER_PORT"] = str(_free_port())
    ctx = DistContext(dcfg.name, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                      int(os.environ["LOCAL_RANK"]))
    backend = dcfg.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("distributed.backend=nccl needs CUDA devices; use "
                          "distributed.backend=gloo (or auto) on CPU.")
    if not tdist.is_initialized():
        timeout = datetime.timedelta(minutes=dcfg.timeout_minutes)
        if dcfg.name == "zero2":
            import deepspeed

            if device.type != "cuda":
                skip_shm_comm_op()
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                       timeout=timeout)
        else:
            tdist.init_process_group(backend=backend, timeout=timeout)
        # one group for the life of the process: the jobs of a Hydra multirun reuse it
        # (tearing it down and re-creating it races on the rendezvous ports)
        atexit.register(shutdown)
    log.info("process group %s up: rank %d of %d (local %d), backend %s", dcfg.name, ctx.rank,
             ctx.world_size, ctx.local_rank, backend)
    return ctx


def device_for(ctx: DistContext, device: torch.device) -> torch.device:
    """One GPU per process: cuda:<local_rank>."""
    if device.type == "cuda" and ctx.name != "none":
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    return device


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


# -- collectives that degrade to the identity without a process group -------------------------

def world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def _comm_device() -> torch.device:
    """Where tensors must live for the backend's collectives: gloo CPU, nccl this GPU."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        tdist.barrier()


def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s value of ``t`` on every rank (a copy; ``t`` is left alone)."""
    if world_size() == 1:
        return t
    buf = t.detach().to(_comm_device()).clone()
    tdist.broadcast(buf, src=src)
    return buf.to(t.device)


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. fills a cache), the others after it."""
    if rank() > 0:
        barrier()
    try:
        yield
    finally:
        if rank() == 0:
            barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects)."""
    if world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    n = world_size()
    if n == 1:
        return [obj]
    out: List[Any] = [None] * n
    tdist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: List[float]) -> List[float]:
    """Elementwise sum over ranks of a short list of numbers (log statistics)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(t)
    return t.cpu().tolist()
