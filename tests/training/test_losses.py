import math

import pytest
import torch

from micro_sam.training.losses import DiceBCELoss


def test_dice_bce_known_values():
    target = torch.zeros(1, 2, 4, 4)
    target[0, 0, :2] = 1          # channel 0: top half foreground
    target[0, 1] = 1              # channel 1: all foreground
    probabilities = torch.full((1, 2, 4, 4), 0.5)
    loss = DiceBCELoss(bce_weight=1.0)(probabilities, target)
    assert loss.shape == (2,)
    # dice = 2 * sum(p t) / (sum(p^2) + sum(t^2)) (torch_em's definition); bce = log 2 everywhere
    dice0 = 2 * (0.5 * 8) / (0.25 * 16 + 8)
    dice1 = 2 * (0.5 * 16) / (0.25 * 16 + 16)
    assert loss[0].item() == pytest.approx(1 - dice0 + math.log(2), abs=1e-5)
    assert loss[1].item() == pytest.approx(1 - dice1 + math.log(2), abs=1e-5)
    # a perfect prediction has (almost) no loss; weight 0 is the Dice loss alone
    assert DiceBCELoss()(target.clone(), target).max().item() < 1e-4
    only_dice = DiceBCELoss(bce_weight=0.0)(probabilities, target)
    assert only_dice[0].item() == pytest.approx(1 - dice0, abs=1e-5)


def test_dice_bce_gradient_for_empty_prediction():
    """An all-background prediction of a small object gets a clear push towards the object's pixels."""
    target = torch.zeros(1, 1, 32, 32)
    target[0, 0, 10:14, 10:14] = 1
    logits = torch.full((1, 1, 32, 32), -6.0, requires_grad=True)
    DiceBCELoss(bce_weight=1.0)(torch.sigmoid(logits), target).sum().backward()
    inside, outside = logits.grad[0, 0, 11, 11].item(), logits.grad[0, 0, 0, 0].item()
    assert inside < 0 and abs(inside) > 10 * abs(outside)


def test_dice_bce_bad_input():
    with pytest.raises(ValueError, match="bce_weight"):
        DiceBCELoss(bce_weight=-1)
    with pytest.raises(ValueError, match="same"):
        DiceBCELoss()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4))
