"""Joint training of SAM's interactive segmentation and the UNETR decoder for automatic instance segmentation.

The loaders yield ``(x, y)`` with y (B, 4, H, W): instance labels, foreground, normalised distance to the object
centre and to the object boundary (see :func:`micro_sam.training.default_sam_dataset` with
``with_segmentation_decoder=True``).

Each iteration encodes the images once. The UNETR decoder (built by
:func:`micro_sam.instance_segmentation.get_unetr` around the same image encoder) is applied to these embeddings;
the gradients of the decoder loss and of the interactive loss are accumulated and applied in one optimizer step,
with one backward pass through the encoder (see ``SamTrainer._train_step``). micro_sam instead runs the encoder a
second time inside the UNETR and takes a second optimizer step for the decoder loss.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch_em.model.unet import Upsampler, Upsampler2d

from .sam_trainer import SamLogger, SamTrainer, _check_state_fits
from .trainable_sam import frozen_parts_to_eval

__all__ = ["JointSamTrainer", "JointSamLogger"]


def _shares_encoder(unetr: torch.nn.Module, model: torch.nn.Module) -> bool:
    """Whether the UNETR decoder can run on the embeddings that the SAM model computed for the same batch.

    True for micro_sam's UNETR: the same encoder module, no skip connections, SAM's normalisation and the same
    resizing and padding of the input.
    """
    try:
        from torch_em.model.unetr import UNETRBase
    except ImportError:  # pragma: no cover
        return False
    if not isinstance(unetr, UNETRBase) or getattr(unetr, "encoder", None) is not model.sam.image_encoder:
        return False
    if getattr(unetr, "use_skip_connection", True) or not getattr(unetr, "use_sam_stats", False):
        return False
    if not getattr(unetr, "resize_input", False) or getattr(unetr, "backbone", "sam") != "sam":
        return False
    sam_mean = torch.tensor([123.675, 116.28, 103.53])
    sam_std = torch.tensor([58.395, 57.12, 57.375])
    return bool(torch.allclose(model.sam.pixel_mean.flatten().cpu(), sam_mean)
                and torch.allclose(model.sam.pixel_std.flatten().cpu(), sam_std))


class _Commuted:
    """torch_em's upsampler (interpolation, then 1x1 convolution) computed as convolution, then interpolation.

    Both steps are linear and the interpolation weights of each output pixel sum to one, so the result is the same
    (up to rounding), while the convolution runs on 4x fewer pixels.
    """

    def forward(self, x):
        return torch.nn.functional.interpolate(self.conv(x), scale_factor=self.scale_factor, mode=self.mode,
                                               align_corners=False)


class CommutedUpsampler(_Commuted, Upsampler):
    pass


class CommutedUpsampler2d(_Commuted, Upsampler2d):
    pass


_COMMUTED = {Upsampler: CommutedUpsampler, Upsampler2d: CommutedUpsampler2d}


def commute_upsamplers(module: torch.nn.Module) -> int:
    """Let the bilinear upsamplers of a torch_em UNETR convolve before they interpolate (same function, faster).

    The classes of the sub-modules are swapped in place; parameters and state-dict keys do not change.

    Returns:
        The number of swapped modules.
    """
    swapped = 0
    for sub in module.modules():
        replacement = _COMMUTED.get(type(sub))
        if replacement is None or sub.mode not in ("bilinear", "linear") or tuple(sub.conv.kernel_size) != (1, 1):
            continue
        sub.__class__ = replacement
        swapped += 1
    return swapped


class JointSamTrainer(SamTrainer):
    """Train SAM for interactive segmentation together with the UNETR decoder for instance segmentation.

    Checkpoints additionally hold ``decoder_state``: the UNETR parameters except the shared encoder's, under
    torch_em's names, as micro_sam stores them.

    Args:
        unetr: The UNETR whose encoder is the SAM image encoder (``model.sam.image_encoder``).
        instance_loss: Loss between the UNETR output and the 3 target channels.
        instance_metric: Validation metric for the UNETR output (lower is better).
        kwargs: Arguments of :class:`~micro_sam.training.sam_trainer.SamTrainer`.
    """

    def __init__(self, unetr: torch.nn.Module, instance_loss: torch.nn.Module, instance_metric: torch.nn.Module,
                 **kwargs):
        super().__init__(**kwargs)
        self.unetr = unetr
        self.instance_loss = instance_loss
        self.instance_metric = instance_metric
        self.unetr.to(self.device)
        commute_upsamplers(self.unetr)

    def _decoder_state(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((k, v) for k, v in self.unetr.state_dict().items() if not k.startswith("encoder"))

    _DERIVED_CHECKPOINT_KEYS = frozenset({"decoder_state"})

    def _checkpoint_tensors(self):
        return super()._checkpoint_tensors() + list(self.unetr.parameters()) + list(self.unetr.buffers())

    def save_checkpoint(self, name, current_metric, best_metric, **extra_save_dict):
        super().save_checkpoint(name, current_metric=current_metric, best_metric=best_metric,
                                decoder_state=self._decoder_state(), **extra_save_dict)

    def load_checkpoint(self, checkpoint="best"):
        save_dict = super().load_checkpoint(checkpoint)
        if save_dict is None:
            return None
        path = checkpoint if isinstance(checkpoint, str) else "<dict>"
        decoder_state = save_dict.get("decoder_state")
        if decoder_state is None:
            raise ValueError(f"The checkpoint {path!r} has no 'decoder_state'; it was not trained with the "
                             "instance segmentation decoder.")
        _check_state_fits(self._decoder_state(), decoder_state, "instance segmentation decoder", path)
        full_state = self.unetr.state_dict()
        full_state.update(decoder_state)
        self.unetr.load_state_dict(full_state)
        self.unetr.to(self.device)
        return save_dict

    def _instance_iteration(self, x, y, metric_for_val=False, image_embeddings=None, input_size=None):
        """The UNETR loss (and metric) for targets y (B, 3, H, W), on shared embeddings where possible."""
        y = y.to(self.device, non_blocking=True)
        if image_embeddings is not None and _shares_encoder(self.unetr, self.model):
            outputs = self.unetr.decode((image_embeddings, None, None), tuple(input_size), tuple(x.shape[-2:]))
        else:
            outputs = self.unetr(x.to(self.device, non_blocking=True).float())
        outputs = outputs.float()
        loss = self.instance_loss(outputs, y)
        if metric_for_val:
            return loss, self.instance_metric(outputs, y)
        return loss

    def _split_targets(self, y):
        return y[:, :1], y[:, 1:]

    def _auxiliary_backward(self, x, targets, embeddings, input_size, forward_context):
        with forward_context():
            unetr_loss = self._instance_iteration(x, targets, image_embeddings=embeddings, input_size=input_size)
        self._backward(unetr_loss)
        return {"instance_loss": unetr_loss.detach()}

    def _train_epoch_impl(self, progress, forward_context, backprop):
        frozen_parts_to_eval(self.unetr.train())
        return super()._train_epoch_impl(progress, forward_context, backprop)

    def _validate_impl(self, forward_context):
        self.model.eval()
        self.unetr.eval()
        input_check_done = False
        totals = np.zeros(6)
        n_batches = 0
        with torch.no_grad():
            for val_iteration, (x, y) in enumerate(self.val_loader):
                labels, targets = y[:, :1], y[:, 1:]
                input_check_done = self._check_input_normalization(x, input_check_done)
                with forward_context():
                    n_pos, n_neg, get_boxes, multimask = self._get_prompt_and_multimasking_choices_for_val(
                        val_iteration
                    )
                    batched_inputs, sampled_ids = self.convert_inputs(x, labels, n_pos, n_neg, get_boxes,
                                                                      self.n_objects_per_batch)
                    batched_inputs, y_one_hot = self._preprocess_batch(batched_inputs, labels, sampled_ids)
                    image_embeddings, batched_inputs = self.model.image_embeddings_oft(batched_inputs)
                    outputs = self.model(batched_inputs=batched_inputs, image_embeddings=image_embeddings,
                                         multimask_output=multimask, upsample_masks=not self.low_res_loss)
                    targets_for_loss = self._loss_targets(batched_inputs, y_one_hot)
                    loss, mask_loss, iou_loss = self._compute_loss(outputs, batched_inputs, targets_for_loss)
                    model_iou = torch.stack([o["iou_predictions"].float().mean() for o in outputs]).mean()
                    unetr_loss, unetr_metric = self._instance_iteration(
                        x, targets, metric_for_val=True, image_embeddings=image_embeddings,
                        input_size=batched_inputs[0]["input_size"],
                    )
                metric = float(mask_loss) + float(unetr_metric) / 3
                totals += [metric, float(loss), float(mask_loss), float(iou_loss), float(model_iou), float(unetr_loss)]
                n_batches += 1
        if n_batches == 0:
            raise ValueError("The validation loader is empty.")
        metric, loss, mask_loss, iou_loss, model_iou, unetr_loss = totals / n_batches
        if self.logger is not None:
            self.logger.log_validation(self._iteration, metric, loss, x, labels, y_one_hot, mask_loss, iou_loss,
                                       model_iou, unetr_loss)
        return float(metric)


class JointSamLogger(SamLogger):
    """:class:`~micro_sam.training.sam_trainer.SamLogger` that also logs the instance segmentation loss."""

    def log_train(self, step, loss, lr, x, y, samples, mask_loss, iou_regression_loss, model_iou,
                  instance_loss=None):
        """Log the interactive training scalars and, if given, the instance segmentation loss."""
        super().log_train(step, loss, lr, x, y, samples, mask_loss, iou_regression_loss, model_iou)
        if instance_loss is not None:
            self._scalars("train", step, {"instance_loss": instance_loss})

    def log_validation(self, step, metric, loss, x, y, samples, mask_loss, iou_regression_loss, model_iou,
                       instance_loss=None):
        """Log the validation scalars and, if given, the instance segmentation loss."""
        super().log_validation(step, metric, loss, x, y, samples, mask_loss, iou_regression_loss, model_iou)
        if instance_loss is not None:
            self._scalars("validation", step, {"instance_loss": instance_loss})
