"""Unit tests of medseg.losses: the batch Dice + cross-entropy equals MONAI's DiceCELoss(batch=True)."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss as MonaiDiceCELoss

from medseg.losses import DiceCELoss


@pytest.mark.parametrize("shape", [(2, 3, 8, 8, 8), (3, 2, 5, 6), (1, 4, 7, 7, 3)])
def test_equals_monai_dice_ce_in_value_and_gradient(shape: tuple[int, ...]) -> None:
    torch.manual_seed(sum(shape))
    logits = torch.randn(*shape, requires_grad=True)
    label = torch.randint(0, shape[1], (shape[0], 1, *shape[2:])).float()
    ours = DiceCELoss()(logits, label)
    theirs = MonaiDiceCELoss(to_onehot_y=True, softmax=True, batch=True)(logits, label)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-6)
    g_ours, = torch.autograd.grad(ours, logits)
    g_theirs, = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-9)


def test_a_perfect_prediction_has_a_small_loss() -> None:
    label = torch.randint(0, 3, (2, 1, 6, 6, 6))
    logits = torch.nn.functional.one_hot(label[:, 0], 3).movedim(-1, 1).float() * 50
    assert float(DiceCELoss()(logits, label.float())) < 1e-6
