"""Unit tests of medseg.distributed and medseg.losses: DistributedDataParallel in 2 gloo processes
gives the gradients of one process holding the whole batch; the environment torchrun sets is read."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from medseg.distributed import (
    Processes,
    from_environment,
    share_of_batch,
    start,
    stop,
    wrap,
)
from medseg.errors import ConfigError
from medseg.losses import DiceCELoss
from medseg.networks import dynunet
from medseg.planning import Topology
from medseg.stages.train import SupervisedLoss

TOPO = Topology(strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)), kernels=((3, 3, 3),) * 3, features=(4, 8, 16))


def _network() -> torch.nn.Module:
    torch.manual_seed(0)
    return dynunet(TOPO, 1, 3, deep_supervision=True)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """4 samples whose halves differ: a small cube of class 1 in the first two, a large cube of
    class 2 (around a cube of 1) in the last two, so a Dice per half is far from the batch's."""
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(4, 1, 16, 16, 16, generator=generator)
    label = torch.zeros(4, 1, 16, 16, 16)
    label[:2, :, 2:6, 2:6, 2:6] = 1
    label[2:, :, 3:15, 3:15, 3:15] = 2
    label[2:, :, 7:10, 7:10, 7:10] = 1
    return image, label


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    procs = from_environment()
    device = start(procs, torch.device("cpu"))
    net = _network()
    model = wrap(net, procs, device)
    image, label = _batch()
    share = share_of_batch(image.shape[0], procs)
    part = slice(rank * share, (rank + 1) * share)
    model.train()
    loss = SupervisedLoss(DiceCELoss())(model(image[part]), label[part])
    loss.backward()
    torch.save({name: p.grad for name, p in net.named_parameters()}, Path(out) / f"rank{rank}.pt")
    stop(procs)


def test_two_gloo_processes_give_the_gradients_of_one_process(tmp_path: Path) -> None:
    """Each of 2 processes takes half of a batch of 4; DDP averages their gradients. With the Dice
    summed across processes they equal the gradients of the whole batch in one process (deep
    supervision, instance norm)."""
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    net = _network()
    image, label = _batch()
    net.train()
    SupervisedLoss(DiceCELoss())(net(image), label).backward()
    single = {name: p.grad for name, p in net.named_parameters()}
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        assert grads.keys() == single.keys()
        for name, grad in single.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{name} on rank {rank}")
    assert any(float(g.abs().max()) > 0 for g in single.values())


def test_dice_taken_per_process_would_differ(tmp_path: Path) -> None:
    """The guard of the test above: the mean of two half-batch losses is not the whole batch's."""
    image, label = _batch()
    net = _network().train()
    loss = SupervisedLoss(DiceCELoss())
    halves = (loss(net(image[:2]), label[:2]) + loss(net(image[2:]), label[2:])) / 2
    assert abs(float(halves) - float(loss(net(image), label))) > 0.01


def test_environment_of_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert from_environment() == Processes(0, 1, 0) and not from_environment().enabled
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    procs = from_environment()
    assert procs == Processes(3, 4, 1) and procs.enabled and not procs.main
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        from_environment()


def test_batch_is_shared_evenly() -> None:
    assert share_of_batch(8, Processes(0, 2, 0)) == 4
    assert share_of_batch(3, Processes()) == 3
    with pytest.raises(ConfigError, match="a batch of 3 cannot be shared by 2"):
        share_of_batch(3, Processes(0, 2, 0))
