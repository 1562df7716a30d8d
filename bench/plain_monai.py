"""The peer: a plain MONAI script (small 3D UNet, whole-volume patches, fixed training time).

It trains on the training cases of a medseg split and reports the mean Dice (anterior and
posterior) on the validation cases, so both tools are scored on the same cases.

    python bench/plain_monai.py --data ../shared/data/hippocampus --splits data/results/plan/splits.json --minutes 10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.networks.utils import one_hot
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    NormalizeIntensityd,
    RandFlipd,
    SpatialPadd,
)
from monai.utils import set_determinism

PATCH = (48, 64, 48)  # every case fits (largest 41 x 59 x 47)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--splits", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    set_determinism(0)
    split = json.loads(args.splits.read_text())[0]
    files = lambda ids: [{"image": str(args.data / "imagesTr" / f"{c}.nii.gz"),  # noqa: E731
                          "label": str(args.data / "labelsTr" / f"{c}.nii.gz")} for c in ids]
    load = [LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"]),
            NormalizeIntensityd("image"), SpatialPadd(["image", "label"], PATCH)]
    train_tf = Compose(load + [RandFlipd(["image", "label"], prob=0.5, spatial_axis=0)])
    train = DataLoader(Dataset(files(split["train"]), train_tf), batch_size=4, shuffle=True, num_workers=1)
    val = [Compose(load)(d) for d in files(split["val"])]
    net = UNet(3, 1, 3, (16, 32, 64, 128), (2, 2, 2), num_res_units=2)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    start, epochs = time.monotonic(), 0
    while time.monotonic() - start < args.minutes * 60:
        net.train()
        for batch in train:
            opt.zero_grad()
            loss_fn(net(batch["image"]), batch["label"]).backward()
            opt.step()
        epochs += 1
    train_s = time.monotonic() - start
    metric = DiceMetric(include_background=False, reduction="mean_batch")
    net.eval()
    with torch.no_grad():
        for d in val:
            pred = net(d["image"][None]).argmax(1, keepdim=True)
            metric(one_hot(pred, 3), one_hot(d["label"][None].long(), 3))
    per_class = metric.aggregate().numpy()
    result = {"epochs": epochs, "train_seconds": train_s, "dice_anterior": float(per_class[0]),
              "dice_posterior": float(per_class[1]), "mean_dice": float(np.mean(per_class)), "n_val": len(val)}
    print(json.dumps(result))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
