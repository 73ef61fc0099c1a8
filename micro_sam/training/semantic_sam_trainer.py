"""Training SAM for semantic segmentation: one logit map per class, no prompts.

The model predicts ``num_classes`` masks per image with ``multimask_output=True``: a
:class:`~micro_sam.training.trainable_sam.TrainableSAM` around a SAM built with
``num_multimask_outputs=num_classes`` (2D), or the 3D models of :mod:`micro_sam.models.sam_3d_wrapper` and
:mod:`micro_sam.models.simple_sam_3d_wrapper`. The loaders give ``(x, y)``: images (B, 3, [D,] H, W) in [0, 255]
(normalised for the encoder for the simple 3D model) and class labels (B, 1, [D,] H, W) with values
0 .. num_classes - 1; :class:`~micro_sam.training.util.ConvertToSemanticSamInputs` turns the images into the
model's inputs.

:class:`SemanticSamTrainer` minimises Dice (on the softmax) plus cross entropy; :class:`SemanticMapsSamTrainer`
regresses continuous maps with its ``loss(target, prediction)``.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch_em
from torch import nn

from .sam_trainer import CheckpointMixin

__all__ = ["CustomDiceLoss", "SemanticMapsSamTrainer", "SemanticSamTrainer"]


class CustomDiceLoss(nn.Module):
    """Dice loss between class probabilities and class labels, summed over the classes.

    ``loss = sum_c (1 - 2 sum(p_c t_c) / (sum(p_c^2) + sum(t_c^2)))`` over all pixels of the batch, with ``p_c``
    the predicted probability of class c and ``t_c`` its one-hot target (torch_em's Dice; 0 for a perfect
    prediction, at most ``num_classes``).

    Args:
        num_classes: The number of classes, including the background.
        softmax: Apply a softmax over the class axis to the predictions first (pass logits).
    """

    def __init__(self, num_classes: int, softmax: bool = True) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2 (background and one class), got {num_classes!r}.")
        self.num_classes = num_classes
        self.dice_loss = torch_em.loss.DiceLoss()
        self.softmax = softmax

    def _one_hot_encoder(self, target: torch.Tensor) -> torch.Tensor:
        """(B, 1, ...) labels -> (B, num_classes, ...) float one-hot."""
        return torch.cat([target == c for c in range(self.num_classes)], dim=1).float()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args: pred: (B, num_classes, ...) logits (or probabilities without ``softmax``); target: (B, 1, ...)
        labels. Returns: the scalar loss."""
        if pred.shape[1] != self.num_classes:
            raise ValueError(f"Expected predictions with {self.num_classes} channels, got {tuple(pred.shape)}.")
        if self.softmax:
            pred = torch.softmax(pred, dim=1)
        return self.dice_loss(pred, self._one_hot_encoder(target))


class SemanticSamTrainer(CheckpointMixin, torch_em.trainer.DefaultTrainer):
    """Train SAM (or its 3D variants) for semantic segmentation with Dice + cross-entropy loss.

    Checkpoints hold plain data only (see :class:`~micro_sam.training.sam_trainer.CheckpointMixin`); the validation
    metric is the validation loss; the mean Dice score ``1 - metric / num_classes`` is printed after each
    validation.

    Args:
        convert_inputs: Turns the images of a batch into the model's inputs, e.g.
            :class:`~micro_sam.training.util.ConvertToSemanticSamInputs`.
        num_classes: The number of classes, including the background (>= 2).
        dice_weight: None: loss = Dice + cross entropy; w in [0, 1]: w * Dice + (1 - w) * cross entropy.
        kwargs: Arguments of ``torch_em.trainer.DefaultTrainer`` (name, train_loader, val_loader, model, optimizer,
            device, ...); ``loss`` and ``metric`` default to :class:`CustomDiceLoss`, ``logger`` to a CSV logger,
            ``compile_model`` to False.

    Raises:
        ValueError: ``num_classes`` < 2 or ``dice_weight`` outside [0, 1].
    """

    def __init__(self, convert_inputs: Callable, num_classes: int, dice_weight: Optional[float] = None, **kwargs):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2 (background and one class), got {num_classes!r}.")
        if dice_weight is not None and not 0 <= dice_weight <= 1:
            raise ValueError(f"dice_weight must lie between 0 and 1, got {dice_weight!r}.")
        kwargs.setdefault("compile_model", False)  # torch_em would compile by default: slow to start, fragile
        kwargs.setdefault("loss", CustomDiceLoss(num_classes=num_classes))
        kwargs.setdefault("metric", CustomDiceLoss(num_classes=num_classes))
        if "logger" not in kwargs:
            from .training import InstanceSegmentationLogger

            kwargs["logger"] = InstanceSegmentationLogger
        super().__init__(**kwargs)
        self.convert_inputs = convert_inputs
        self.num_classes = num_classes
        self.compute_ce_loss = nn.CrossEntropyLoss()
        self.dice_weight = dice_weight
        self._kwargs = kwargs

    def _compute_loss(self, y: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Dice + cross entropy (weighted with ``dice_weight``) of logits (B, C, ...) against labels (B, 1, ...)."""
        target = y.to(self.device, non_blocking=True)
        dice_loss = self.loss(masks, target)
        ce_loss = self.compute_ce_loss(masks, target.squeeze(1).long())
        if self.dice_weight is None:
            return dice_loss + ce_loss
        return self.dice_weight * dice_loss + (1 - self.dice_weight) * ce_loss

    def _get_model_outputs(self, batched_inputs) -> torch.Tensor:
        """The (B, C, ...) logits: via ``image_embeddings_oft`` for a TrainableSAM, else the model's forward."""
        if hasattr(self.model, "image_embeddings_oft"):
            image_embeddings, batched_inputs = self.model.image_embeddings_oft(batched_inputs)
            outputs = self.model(batched_inputs, image_embeddings, multimask_output=True)
        else:
            batched_inputs = [{"image": record["image"].to(self.device, non_blocking=True),
                               "original_size": record["original_size"]} for record in batched_inputs]
            outputs = self.model(batched_inputs, multimask_output=True)
        return torch.stack([output["masks"].squeeze(0) for output in outputs])

    def _train_epoch_impl(self, progress, forward_context, backprop):
        self.model.train()
        t_start, n_iterations = time.time(), 0
        for x, y in self.train_loader:
            self.optimizer.zero_grad()
            batched_inputs = self.convert_inputs(x, y)
            with forward_context():
                masks = self._get_model_outputs(batched_inputs)
                loss = self._compute_loss(y, masks)
            backprop(loss)
            self._iteration += 1
            n_iterations += 1
            if self.logger is not None:
                lr = self.optimizer.param_groups[0]["lr"]
                self.logger.log_train(self._iteration, loss.detach(), lr, x, y, None, log_gradients=False)
            progress.update(1)
            if self._iteration >= self.max_iteration:
                break
        return (time.time() - t_start) / max(n_iterations, 1)

    def _validate_impl(self, forward_context):
        self.model.eval()
        total, n_batches = 0.0, 0
        with torch.no_grad():
            for x, y in self.val_loader:
                batched_inputs = self.convert_inputs(x, y)
                with forward_context():
                    loss = self._compute_loss(y, self._get_model_outputs(batched_inputs))
                total += float(loss)
                n_batches += 1
        if n_batches == 0:
            raise ValueError("The validation loader is empty.")
        metric = total / n_batches
        print(f"\nMean validation Dice score of this epoch: {1 - metric / self.num_classes:.4f}")
        if self.logger is not None:
            self.logger.log_validation(self._iteration, metric, metric, x, y, None)
        return metric


class SemanticMapsSamTrainer(SemanticSamTrainer):
    """Like :class:`SemanticSamTrainer`, for continuous target maps: the loss is ``loss(target, prediction)``
    (e.g. ``torch.nn.MSELoss()``; pass it as ``loss`` and ``metric``), without the cross entropy."""

    def _compute_loss(self, y: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.loss(y.to(self.device, non_blocking=True), masks)


# Names micro_sam 1.8 exposes here (imported there from other modules), resolved on first use.
from .._lazy import lazy_attributes  # noqa: E402

__getattr__, __dir__ = lazy_attributes(globals(), {
    "DefaultTrainer": "torch_em.trainer:DefaultTrainer",
    "DiceLoss": "torch_em.loss:DiceLoss",
})
