"""The training loss: Dice plus cross-entropy over the whole batch, also across processes.

``DiceCELoss`` gives the same value as MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True,
batch=True)``: a soft Dice per class over every voxel of the batch (smoothing 1e-5), averaged over
classes, plus the mean cross-entropy. Under DistributedDataParallel each process holds part of the
batch; a Dice computed per process would be another loss than the Dice of the batch. So the Dice's
sums (true positives, false positives, false negatives per class) are added up across processes
with ``torch.distributed.nn.functional.all_reduce``, which passes gradients back to every
process's share. DistributedDataParallel then averages the gradients, and they equal those of one
process holding the whole batch (checked in ``tests/unit/test_distributed.py``).
"""

from __future__ import annotations

import torch
from torch import nn

SMOOTH = 1e-5  # MONAI DiceLoss's smooth_nr and smooth_dr


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor)


class DiceCELoss(nn.Module):
    """Soft Dice over the (possibly distributed) batch plus mean cross-entropy; see the module doc."""

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        target = label[:, 0].long() if label.dim() == logits.dim() else label.long()
        ce = nn.functional.cross_entropy(logits, target)
        probabilities = torch.softmax(logits, dim=1)
        onehot = nn.functional.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probabilities.dtype)
        axes = [0, *range(2, logits.dim())]
        tp = (probabilities * onehot).sum(axes)
        fp = (probabilities * (1 - onehot)).sum(axes)
        fn = ((1 - probabilities) * onehot).sum(axes)
        sums = _all_reduce(torch.stack([tp, fp, fn]))
        tp, fp, fn = sums[0], sums[1], sums[2]
        dice = 1 - (2 * tp + SMOOTH) / (2 * tp + fp + fn + SMOOTH)
        return dice.mean() + ce
