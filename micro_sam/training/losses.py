"""Losses for training: mask losses for the interactive training and a loss for the UNETR decoder.

A mask loss (``SamTrainer(mask_loss=...)`` / ``train_sam(mask_loss=...)``) receives probabilities and targets of
shape (1, C, H, W) - one channel per prompted object - and returns one loss per channel, shape (C,), like
``torch_em.loss.DiceLoss(reduce_channel=None)`` (the default).

:class:`DiceBCEDistanceLoss` is a loss for the UNETR decoder (``train_instance_segmentation(loss=...)``).
"""
import torch
import torch.nn.functional as F
import torch_em

__all__ = ["DiceBCELoss", "DiceBCEDistanceLoss"]


class DiceBCELoss(torch.nn.Module):
    """Dice loss plus ``bce_weight`` times the pixel-averaged binary cross entropy, per channel.

    The Dice loss alone gives small gradients to a model that predicts (nearly) empty masks, the usual state of a
    mask decoder trained from scratch; the cross entropy pulls every pixel towards its target from the first
    iteration. For finetuning a pretrained SAM, micro_sam's Dice loss alone is the default.

    Args:
        bce_weight: Weight of the cross entropy term; 0 gives the Dice loss.
        eps: Probabilities are clipped to [eps, 1 - eps] for the cross entropy.
    """

    def __init__(self, bce_weight: float = 1.0, eps: float = 1e-6):
        super().__init__()
        if bce_weight < 0:
            raise ValueError(f"bce_weight must be >= 0, got {bce_weight!r}.")
        self.bce_weight = float(bce_weight)
        self.eps = float(eps)
        self.dice = torch_em.loss.DiceLoss(reduce_channel=None)

    def forward(self, probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if probabilities.shape != target.shape or probabilities.ndim != 4:
            raise ValueError(f"Expected probabilities and target of the same (N, C, H, W) shape, got "
                             f"{tuple(probabilities.shape)} and {tuple(target.shape)}.")
        loss = self.dice(probabilities, target)
        if self.bce_weight:
            clipped = probabilities.clamp(self.eps, 1 - self.eps)
            bce = F.binary_cross_entropy(clipped, target.to(clipped.dtype), reduction="none")
            loss = loss + self.bce_weight * bce.mean(dim=(0, 2, 3))
        return loss


class DiceBCEDistanceLoss(torch.nn.Module):
    """The UNETR decoder's loss (foreground, centre and boundary distances) with a cross entropy on the foreground.

    micro_sam's default (``torch_em.loss.DiceBasedDistanceLoss(mask_distances_in_bg=True)``) is the sum of three
    Dice losses, the distances masked to the objects. A Dice loss is 1 for an image without objects whatever the
    prediction, so such images teach nothing; the added pixel-averaged cross entropy of the foreground channel
    pulls the foreground towards 0 there (and everywhere else towards its target).

    Args:
        bce_weight: Weight of the foreground cross entropy; 0 gives micro_sam's default loss.
        eps: Probabilities are clipped to [eps, 1 - eps] for the cross entropy.
    """

    def __init__(self, bce_weight: float = 1.0, eps: float = 1e-6):
        super().__init__()
        if bce_weight < 0:
            raise ValueError(f"bce_weight must be >= 0, got {bce_weight!r}.")
        self.bce_weight = float(bce_weight)
        self.eps = float(eps)
        self.dice_distance = torch_em.loss.DiceBasedDistanceLoss(mask_distances_in_bg=True)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of (N, 3, H, W) predictions (probabilities) for (N, 3, H, W) targets; a scalar."""
        if prediction.shape != target.shape or prediction.ndim != 4 or prediction.shape[1] != 3:
            raise ValueError(f"Expected prediction and target of the same (N, 3, H, W) shape, got "
                             f"{tuple(prediction.shape)} and {tuple(target.shape)}.")
        loss = self.dice_distance(prediction, target)
        if self.bce_weight:
            foreground = prediction[:, :1].clamp(self.eps, 1 - self.eps)
            loss = loss + self.bce_weight * F.binary_cross_entropy(foreground, target[:, :1].to(foreground.dtype))
        return loss
