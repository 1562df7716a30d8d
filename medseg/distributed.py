"""Training in several processes with DistributedDataParallel, started by ``torchrun``.

``torchrun --nproc_per_node N -m medseg.cli train ...`` starts N processes and tells each its
rank through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``). Each process then trains on its share of every batch: the plan's batch size
is the batch of all processes together, as in nnU-Net. Gradients are averaged by DDP (NCCL on
CUDA, one GPU per process; gloo on CPUs), the Dice of the loss is taken over the whole batch
(``medseg.losses``), and only the first process (rank 0) validates, writes checkpoints and
talks to MLflow. Without those variables (a plain ``medseg train``) nothing here does anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medseg.errors import ConfigError


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_environment() -> Processes:
    """The processes torchrun started (one process when it did not start this one)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ConfigError(f"torchrun's environment: expected whole numbers in RANK, WORLD_SIZE and LOCAL_RANK: {err}") from None
    return Processes(rank, world, local)


def start(procs: Processes, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, else gloo); return this process's device."""
    if not procs.enabled:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def stop(procs: Processes) -> None:
    if procs.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def wrap(net: nn.Module, procs: Processes, device: torch.device) -> nn.Module:
    """``net`` in DistributedDataParallel when there are several processes."""
    if not procs.enabled:
        return net
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def share_of_batch(batch_size: int, procs: Processes) -> int:
    """Each process's part of a batch of ``batch_size`` (the plan's batch is all processes')."""
    if batch_size % procs.world_size:
        raise ConfigError(f"a batch of {batch_size} cannot be shared by {procs.world_size} training processes: "
                          "set plan.batch_size to a multiple of the process count")
    return batch_size // procs.world_size


def from_main(value: Any, procs: Processes) -> Any:
    """``value`` as the main process has it (a decision every process must take alike)."""
    if not procs.enabled:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
