"""Benchmark: training steps per second of medseg's networks in torch's default memory order and in
channels-last order (``train.channels_last``), in one run.

    .venv/bin/python bench/channels.py [--seconds 15] [--repeats 3] [--threads N]

Each step is what ``medseg train`` does per batch: forward, medseg's Dice + cross-entropy loss,
backward and an AdamW step, on random batches of the hippocampus plan's patch (40, 56, 40), batch 2,
3 classes. The networks: the demo's MONAI UNet (16-128 feature maps), and ``dynunet`` on the plan's
topology of 4 stages with 8-64 and with 32-256 feature maps (nnU-Net's), with deep supervision.
Runs alternate between the two orders; the median of the repeats is reported, with the ratio
channels-last / default. Prints a table and writes ``bench/results/channels.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.channels")

PATCH = (40, 56, 40)
BATCH = 2
NETWORKS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "unet 16-128 (the demo's)": ({"name": "unet"}, (16, 32, 64, 128)),
    "dynunet 8-64": ({"name": "dynunet"}, (8, 16, 32, 64)),
    "dynunet 32-256 (nnU-Net's)": ({"name": "dynunet"}, (32, 64, 128, 256)),
}


def steps_per_second(network: dict[str, Any], features: tuple[int, ...], channels_last: bool, seconds: float,
                     device: str) -> float:
    """Training steps per second over ``seconds`` (after 3 steps of warm-up)."""
    import torch

    from medseg.config import NetworkConfig
    from medseg.losses import DiceCELoss
    from medseg.networks import build_network
    from medseg.planning import Topology
    from medseg.stages.train import SupervisedLoss

    torch.manual_seed(0)
    topology = Topology(strides=((1, 1, 1),) + ((2, 2, 2),) * 3, kernels=((3, 3, 3),) * 4, features=features)
    net = build_network(NetworkConfig(**network), patch_size=PATCH, in_channels=1, out_channels=3, topology=topology)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = net.to(device, memory_format=fmt).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = SupervisedLoss(DiceCELoss())
    image = torch.randn(BATCH, 1, *PATCH, device=device).contiguous(memory_format=fmt)
    label = torch.randint(0, 3, (BATCH, 1, *PATCH), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net(image), label).backward()
        optimizer.step()

    for _ in range(3):
        step()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        done += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="measured time of each run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "channels.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import monai
    import torch

    torch.set_num_threads(args.threads)
    runs: dict[str, dict[bool, list[float]]] = {name: {False: [], True: []} for name in NETWORKS}
    for repeat in range(args.repeats):
        for name, (network, features) in NETWORKS.items():
            for channels_last in (False, True):
                rate = steps_per_second(network, features, channels_last, args.seconds, args.device)
                runs[name][channels_last].append(rate)
                log.info("%s, channels_last=%s, repeat %d: %.2f steps/s", name, channels_last, repeat + 1, rate)
    table = []
    for name, rates in runs.items():
        default, last = statistics.median(rates[False]), statistics.median(rates[True])
        table.append({"network": name, "default_steps_per_second": default, "channels_last_steps_per_second": last,
                      "ratio": last / default, "runs_default": rates[False], "runs_channels_last": rates[True]})
    print(f"\n{'network':<28} {'default':>9} {'channels-last':>14} {'ratio':>7}   (training steps/s, batch {BATCH})")
    for row in table:
        print(f"{row['network']:<28} {row['default_steps_per_second']:>9.2f} "
              f"{row['channels_last_steps_per_second']:>14.2f} {row['ratio']:>6.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "threads": args.threads,
        "device": args.device, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "monai": monai.__version__, "patch": PATCH, "batch": BATCH, "seconds": args.seconds,
        "repeats": args.repeats, "results": table,
    }, indent=2) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
