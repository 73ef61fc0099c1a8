"""Trainer for interactive segmentation with SAM: prompts sampled from the labels, iterative correction points.

One training iteration (one batch):

1. every image is encoded once; all further steps reuse its embedding;
2. each sampled object is prompted with one positive point (three masks predicted, "multimask") in even
   iterations, or with its box (one mask) in odd iterations;
3. ``n_sub_iteration`` rounds follow: from the error of the best mask (by predicted IoU) of the previous round
   one positive and one negative correction point are added (``IterativePromptGenerator``), and with
   probability ``mask_prob`` the previous logits are given as mask prompt;
4. the loss of every round is the Dice loss of the best of the predicted masks plus the mean squared error
   between the predicted and the true IoU; the rounds' losses are averaged.

The gradients are those of the averaged loss, as in micro_sam, but they are computed piecewise: each round is
back-propagated into the (detached) image embeddings as soon as its loss is known, and the accumulated embedding
gradient is back-propagated through the image encoder once at the end. Only one round's graph is in memory at a
time instead of all ``n_sub_iteration``; with the decoder (``JointSamTrainer``) the same holds for its pass.

By default (``low_res_loss=True``) the loss and the correction points are computed on SAM's 256 x 256
low-resolution logits, against ground-truth masks area-downsampled to that grid (soft targets), instead of
upsampling every predicted mask to the input size as micro_sam does. The predicted masks that SAM returns are
upsampled from exactly these logits, so the loss sees the same information; it saves the bilinear upsampling of
N x 3 masks to 1024 x 1024 (and its backward pass) in every round. Correction points are placed at the centre
of the chosen low-resolution pixel (4 x 4 input pixels). ``low_res_loss=False`` gives micro_sam's full-resolution
computation.
"""
from __future__ import annotations

import csv
import os
import random
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torch_em
from torch_em.trainer.logger_base import TorchEmLogger

from .._lazy import lazy_attributes

__all__ = ["CheckpointMixin", "SamTrainer", "SamLogger", "plain_metadata"]


# Names micro_sam 1.8 exposes here (imported there from other modules), resolved on first use.
__getattr__, __dir__ = lazy_attributes(globals(), {
    "IterativePromptGenerator": "micro_sam.prompt_generators:IterativePromptGenerator",
    "PromptGeneratorBase": "micro_sam.prompt_generators:PromptGeneratorBase",
    "make_grid": "torchvision.utils:make_grid",
})


def _link_or_copy(source: str, target: str) -> None:
    """Make ``target`` a hard link to ``source``, or a copy where the file system has no hard links."""
    import shutil

    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


#
# Checkpoint metadata that a weights-only loader can read
#

_PLAIN_TYPES = (str, int, float, bool, type(None))


def _plain_metadata(obj: Any) -> Tuple[Any, bool]:
    """(obj restricted to tensors / numbers / strings / lists / dicts, whether anything of it is kept)."""
    if isinstance(obj, _PLAIN_TYPES) or torch.is_tensor(obj):
        return obj, True
    if isinstance(obj, np.generic):
        return obj.item(), True
    if isinstance(obj, dict):
        kept = {}
        for key, value in obj.items():
            value, ok = _plain_metadata(value)
            if ok and isinstance(key, (str, int)):
                kept[key] = value
        return kept, True
    if isinstance(obj, (list, tuple)):
        items = [_plain_metadata(v) for v in obj]
        if all(ok for _, ok in items):
            return type(obj)(v for v, _ in items), True
        return None, False
    return None, False


def plain_metadata(obj: Any) -> Any:
    """A copy of trainer metadata without objects: only tensors, numbers, strings, lists and dicts remain.

    torch_em's trainers store their construction arguments (including the datasets) in the checkpoint; that
    needs pickled classes, which ``torch.load(weights_only=True)`` refuses. Here every value that is no plain
    data is dropped (class names are already stored as strings by torch_em).
    """
    return _plain_metadata(obj)[0]


def _load_trainer_checkpoint(path: str) -> dict:
    from .._checkpoints import safe_load

    state = safe_load(path)
    if not isinstance(state, dict) or "model_state" not in state:
        raise ValueError(f"{path!r} is not a trainer checkpoint (no 'model_state').")
    return state


def _check_state_fits(own: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor], what: str, path: str) -> None:
    """Raise a ValueError when ``state`` does not fit the state dict ``own`` exactly (another architecture)."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"The checkpoint {path!r} does not fit the {what} being trained: it was written for another model "
            f"architecture ({len(missing)} missing parameters, e.g. {missing[:2]}; {len(unexpected)} unexpected, "
            f"e.g. {unexpected[:2]}; {len(mismatched)} of another shape, e.g. {mismatched[:2]}). Resume only with "
            "the model type and settings the checkpoint was trained with, or start from a new name / save_root."
        )


class _QuietConstructorArguments(warnings.catch_warnings):
    """Silence torch_em's "constructor arguments cannot be deduced" warnings (only metadata is affected)."""

    def __enter__(self):
        result = super().__enter__()
        warnings.filterwarnings("ignore", message="Constructor arguments for")
        warnings.filterwarnings("ignore", message="DataLoader uses sampler")
        return result


@contextmanager
def _no_context():
    yield


#
# The trainer
#

class CheckpointMixin:
    """Checkpoint handling for torch_em trainers that a weights-only loader can read.

    Put it before ``torch_em.trainer.DefaultTrainer`` in the bases. Checkpoints hold only tensors, numbers,
    strings, lists and dicts (torch_em would also pickle datasets and other objects), are written atomically,
    and are read with :func:`micro_sam._checkpoints.safe_load`; a checkpoint of another architecture is a
    ``ValueError``. ``load_checkpoint`` also accepts a file path. A resumed run keeps its best metric.
    """

    def _initialize(self, iterations, load_from_checkpoint, epochs=None):
        # torch_em starts every fit with an infinite best metric; a resumed run keeps the one of its checkpoint.
        self.best_metric = float("inf")
        with _QuietConstructorArguments():
            super()._initialize(iterations, load_from_checkpoint, epochs)
        return self.best_metric

    def save_checkpoint(self, name, current_metric, best_metric, train_time=0.0, **extra_save_dict):
        """Write ``<checkpoint_folder>/<name>.pt`` atomically, with plain-data metadata only."""
        extra_init = extra_save_dict.pop("init", {})
        save_dict = {
            "iteration": int(self._iteration),
            "epoch": int(self._epoch),
            "best_epoch": int(self._best_epoch),
            "best_metric": float(best_metric),
            "current_metric": float(current_metric),
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "init": plain_metadata({**getattr(self, "init_data", {}), **extra_init}),
            "train_time": float(train_time),
            "timestamp": datetime.now().strftime("%d-%m-%Y (%H:%M:%S)"),
        }
        from ..models.tiny_vit import TinyViT

        image_size = getattr(self.model, "img_size", 1024)
        encoder = getattr(getattr(self.model, "sam", None), "image_encoder", None)
        if image_size != 1024 and isinstance(encoder, TinyViT):  # vit_t at another input size
            save_dict["image_size"] = int(image_size)
        save_dict.update(extra_save_dict)
        if self.scaler is not None:
            save_dict["scaler_state"] = self.scaler.state_dict()
        if self.lr_scheduler is not None:
            save_dict["scheduler_state"] = plain_metadata(self.lr_scheduler.state_dict())
        if getattr(self, "rank", None) not in (None, 0):
            return
        os.makedirs(self.checkpoint_folder, exist_ok=True)
        path = os.path.join(self.checkpoint_folder, f"{name}.pt")
        tmp_path = f"{path}.tmp-{os.getpid()}"
        # torch_em saves "best" and then "latest" with the same state after an improved epoch: write it once
        # and link the second name to the same file (a later save replaces the name, not the shared file).
        content_key = self._checkpoint_content_key(save_dict, extra_save_dict)
        previous = getattr(self, "_last_checkpoint", None)
        try:
            if previous is not None and previous[0] == content_key and os.path.isfile(previous[1]):
                _link_or_copy(previous[1], tmp_path)
            else:
                torch.save(save_dict, tmp_path)
            os.replace(tmp_path, path)
        finally:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
        self._last_checkpoint = (content_key, path)

    # Extra checkpoint entries that are computed from the tensors of _checkpoint_tensors (e.g. a decoder state).
    _DERIVED_CHECKPOINT_KEYS = frozenset()

    def _checkpoint_tensors(self) -> List[torch.Tensor]:
        """The tensors whose values make up a checkpoint: model parameters and buffers, optimizer state."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        for group in self.optimizer.param_groups:
            tensors.extend(group["params"])
        for state in self.optimizer.state.values():
            tensors.extend(value for value in state.values() if torch.is_tensor(value))
        return tensors

    def _checkpoint_content_key(self, save_dict: Dict[str, Any], extra_save_dict: Dict[str, Any]):
        """What identifies a checkpoint's content: counters, metrics and the in-place version of each tensor of
        :meth:`_checkpoint_tensors` (bumped by every optimizer step, load or running-statistics update).
        None (never reuse) with other extra content."""
        if set(extra_save_dict) - self._DERIVED_CHECKPOINT_KEYS:
            return None
        try:
            versions = tuple((id(t), t._version) for t in self._checkpoint_tensors())
        except RuntimeError:  # inference tensors have no version counter
            return None
        scalars = tuple(save_dict[k] for k in ("iteration", "epoch", "best_epoch", "best_metric",
                                               "current_metric", "train_time"))
        return scalars, versions

    def _checkpoint_path(self, checkpoint: str) -> str:
        if os.path.isfile(checkpoint):
            return os.fspath(checkpoint)
        return os.path.join(self.checkpoint_folder, f"{checkpoint}.pt")

    def load_checkpoint(self, checkpoint="best"):
        """Restore model, optimizer, scheduler and counters from a checkpoint.

        Args:
            checkpoint: "best" / "latest" (in the checkpoint folder), a path to a checkpoint file, or a loaded dict.

        Returns:
            The checkpoint dict, or None (with a warning) when the named checkpoint does not exist.

        Raises:
            ValueError: The checkpoint was written for another architecture or optimizer setup.
        """
        if isinstance(checkpoint, dict):
            save_dict, path = checkpoint, "<dict>"
        elif isinstance(checkpoint, (str, os.PathLike)):
            path = self._checkpoint_path(os.fspath(checkpoint))
            if not os.path.exists(path):
                warnings.warn(f"Cannot load checkpoint: {path} does not exist.")
                return None
            save_dict = _load_trainer_checkpoint(path)
        else:
            raise ValueError(f"checkpoint must be 'best', 'latest', a file path or a dict, got {checkpoint!r}.")

        model_state = OrderedDict((k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k, v)
                                  for k, v in save_dict["model_state"].items())
        _check_state_fits(self.model.state_dict(), model_state, "model", path)
        self.model.load_state_dict(model_state)
        self.model.to(self.device)
        try:
            self.optimizer.load_state_dict(save_dict["optimizer_state"])
        except (ValueError, KeyError) as error:
            raise ValueError(
                f"The optimizer state in {path!r} does not fit this training setup ({error}); were other model parts "
                "frozen or another optimizer used?"
            ) from None
        scaler_state = save_dict.get("scaler_state")
        if self.scaler is not None and scaler_state:
            self.scaler.load_state_dict(scaler_state)
        if self.lr_scheduler is not None and save_dict.get("scheduler_state") is not None:
            self.lr_scheduler.load_state_dict(save_dict["scheduler_state"])
        self._iteration = int(save_dict["iteration"])
        self._epoch = int(save_dict["epoch"]) + 1
        self._best_epoch = int(save_dict["best_epoch"])
        self.best_metric = float(save_dict["best_metric"])
        self.current_metric = float(save_dict["current_metric"])
        self.train_time = float(save_dict.get("train_time", 0.0))
        return save_dict

    def _verify_if_training_completed(self, checkpoint="latest"):
        path = self._checkpoint_path(checkpoint)
        if not os.path.exists(path):
            return False
        return int(_load_trainer_checkpoint(path).get("iteration", -1)) == self.max_iteration


class SamTrainer(CheckpointMixin, torch_em.trainer.DefaultTrainer):
    """Trainer for the interactive segmentation of SAM (iterative prompting), based on torch_em's DefaultTrainer.

    Use :func:`micro_sam.training.train_sam` for the complete setup. The loaders yield ``(x, y)`` with x images
    (B, 1 or 3, H, W) in [0, 255] and y instance labels (B, 1, H, W). The model is a
    :class:`~micro_sam.training.trainable_sam.TrainableSAM`.

    Checkpoints (``best.pt``, ``latest.pt`` under ``<save_root>/checkpoints/<name>/``) hold only tensors, numbers,
    strings, lists and dicts, so they load with ``torch.load(weights_only=True)``; loading a checkpoint of another
    architecture is a ``ValueError``.

    Args:
        convert_inputs: Turns a batch into SAM inputs with prompts, e.g.
            :class:`~micro_sam.training.util.ConvertToSamInputs`.
        n_sub_iteration: Prompting rounds per batch (the first with the initial prompt, then corrections).
        n_objects_per_batch: Objects sampled per image for the loss; None uses all. Within a batch all images use
            the smallest number of objects any of them has.
        mse_loss: The loss between predicted and true IoU.
        prompt_generator: Gives the correction points from (ground truth, prediction); default
            :class:`micro_sam.prompt_generators.IterativePromptGenerator`.
        mask_prob: Probability to give the previous logits as mask prompt in a correction round.
        mask_loss: The mask loss, applied per object with objects on the channel axis; default
            ``torch_em.loss.DiceLoss(reduce_channel=None)``.
        low_res_loss: Compute the loss and correction points on the 256 x 256 logits (see the module docstring);
            False upsamples every mask to the input size as micro_sam does.
        kwargs: Arguments of ``torch_em.trainer.DefaultTrainer`` (name, train_loader, val_loader, model, optimizer,
            device, lr_scheduler, logger, log_image_interval, mixed_precision, early_stopping, save_root, ...).
    """

    def __init__(
        self,
        convert_inputs: Callable,
        n_sub_iteration: int,
        n_objects_per_batch: Optional[int] = None,
        mse_loss: torch.nn.Module = torch.nn.MSELoss(),
        prompt_generator=None,
        mask_prob: float = 0.5,
        mask_loss: Optional[torch.nn.Module] = None,
        low_res_loss: bool = True,
        **kwargs,
    ):
        if prompt_generator is None:
            from ..prompt_generators import IterativePromptGenerator

            prompt_generator = IterativePromptGenerator()
        if int(n_sub_iteration) != n_sub_iteration or n_sub_iteration < 1:
            raise ValueError(f"n_sub_iteration must be a positive integer, got {n_sub_iteration!r}.")
        if n_objects_per_batch is not None and (int(n_objects_per_batch) != n_objects_per_batch
                                                or n_objects_per_batch < 1):
            raise ValueError(f"n_objects_per_batch must be a positive integer or None, got {n_objects_per_batch!r}.")
        if not 0.0 <= mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be a probability in [0, 1], got {mask_prob!r}.")
        self.mask_loss = torch_em.loss.DiceLoss(reduce_channel=None) if mask_loss is None else mask_loss
        super().__init__(loss=self.mask_loss, metric=self.mask_loss, **kwargs)
        self.convert_inputs = convert_inputs
        self.mse_loss = mse_loss
        self.n_objects_per_batch = n_objects_per_batch
        self.n_sub_iteration = int(n_sub_iteration)
        self.prompt_generator = prompt_generator
        self.mask_prob = float(mask_prob)
        self.low_res_loss = bool(low_res_loss)
        self._kwargs = kwargs
        # Seconds of each training iteration of the last epoch (for benchmarks and the progress display).
        self.iteration_times: List[float] = []

    #
    # Prompt choices
    #

    def _get_prompt_and_multimasking_choices(self, current_iteration: int):
        """Even iterations: one positive point, three masks. Odd iterations: a box, one mask."""
        if current_iteration % 2 == 0:
            return 1, 0, False, True
        return 0, 0, True, False

    def _get_prompt_and_multimasking_choices_for_val(self, current_iteration: int):
        """Cycle through: a point; a box; 1-4 positive and 0-4 negative points; a box with points."""
        kind = current_iteration % 4
        if kind == 0:
            return 1, 0, False, True
        if kind == 1:
            return 0, 0, True, False
        n_pos = np.random.randint(1, 5)
        if kind == 2:
            # (1, 0) is the first kind already: one positive point comes with at least one negative one.
            n_neg = np.random.randint(1, 5) if n_pos == 1 else np.random.randint(0, 5)
            return n_pos, n_neg, False, False
        return n_pos, np.random.randint(0, 5), True, False

    #
    # Targets and losses
    #

    def _preprocess_batch(self, batched_inputs, y, sampled_ids):
        """One binary target per sampled object (B, N, 1, H, W); all images restricted to the same N."""
        if len(y) != len(sampled_ids):
            raise ValueError(f"Got {len(sampled_ids)} id lists for a batch of {len(y)} label images.")
        n_objects = min(len(ids) for ids in sampled_ids)
        y = y.to(self.device, non_blocking=True)
        y_one_hot = torch.stack([
            torch.stack([target == int(seg_id) for seg_id in ids[:n_objects]]) for target, ids in zip(y, sampled_ids)
        ]).float()
        restricted = []
        for record in batched_inputs:
            restricted.append({k: (v[:n_objects] if k in ("point_coords", "point_labels", "boxes") else v)
                               for k, v in record.items()})
        return restricted, y_one_hot

    def _low_res_shape(self, input_size) -> Tuple[int, int, float]:
        """(h, w) of the valid part of the low-res logits and the input pixels per low-res pixel."""
        low_res = 4 * int(self.model.sam.prompt_encoder.image_embedding_size[0])
        scale = self.model.img_size / low_res
        return int(np.ceil(input_size[0] / scale)), int(np.ceil(input_size[1] / scale)), scale

    def _loss_targets(self, batched_inputs, y_one_hot) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per image, the soft and the binary targets (N, 1, h, w) at the resolution of the loss."""
        targets = []
        for record, objects in zip(batched_inputs, y_one_hot):
            if not self.low_res_loss:
                targets.append((objects, objects > 0.5))
                continue
            h, w, _ = self._low_res_shape(record["input_size"])
            downsampling = objects.shape[-2] >= h and objects.shape[-1] >= w
            soft = F.interpolate(objects, (h, w), mode="area" if downsampling else "bilinear",
                                 **({} if downsampling else {"align_corners": False}))
            binary = soft >= 0.5
            # Objects smaller than a low-res pixel keep their most covered pixel.
            empty = ~binary.flatten(1).any(dim=1)
            if empty.any():
                flat = binary.flatten(1).clone()
                best = soft.flatten(1).argmax(dim=1)
                flat[empty, best[empty]] = True
                binary = flat.view_as(binary)
            targets.append((soft, binary))
        return targets

    def _prediction_logits(self, output: Dict[str, torch.Tensor], record) -> torch.Tensor:
        if not self.low_res_loss:
            return output["masks"]
        h, w, _ = self._low_res_shape(record["input_size"])
        return output["low_res_masks"][..., :h, :w]

    def _compute_iou(self, pred, true, eps=1e-7):
        """IoU between binarised probabilities (N, 1, h, w) and binary targets, per object."""
        pred_mask = pred > 0.5
        overlap = (pred_mask & true).sum(dim=(1, 2, 3))
        union = (pred_mask | true).sum(dim=(1, 2, 3))
        return overlap / (union + eps)

    def _image_loss(self, logits: torch.Tensor, iou_predictions: torch.Tensor, soft: torch.Tensor,
                    binary: torch.Tensor):
        """Mask loss of the best of the M masks per object, averaged, and the IoU regression loss."""
        probabilities = torch.sigmoid(logits.float())
        soft = soft.float()
        n_masks = probabilities.shape[1]
        dice = torch.stack([
            self.mask_loss(probabilities[:, i:i + 1].swapaxes(0, 1), soft.swapaxes(0, 1)) for i in range(n_masks)
        ])
        dice = dice.min(dim=0).values
        with torch.no_grad():
            true_iou = torch.stack([self._compute_iou(probabilities[:, i:i + 1], binary) for i in range(n_masks)])
        iou_loss = self.mse_loss(true_iou.swapaxes(0, 1), iou_predictions.float())
        return dice.mean(), iou_loss

    def _compute_loss(self, batched_outputs, batched_inputs, targets):
        """Loss, mask loss and IoU loss of one prompting round, averaged over the batch."""
        mask_loss, iou_loss = 0.0, 0.0
        for output, record, (soft, binary) in zip(batched_outputs, batched_inputs, targets):
            this_mask, this_iou = self._image_loss(
                self._prediction_logits(output, record), output["iou_predictions"], soft, binary
            )
            mask_loss = mask_loss + this_mask
            iou_loss = iou_loss + this_iou
        mask_loss = mask_loss / len(batched_outputs)
        iou_loss = iou_loss / len(batched_outputs)
        return mask_loss + iou_loss, mask_loss, iou_loss

    #
    # Iterative prompting
    #

    def _update_prompts(self, batched_inputs, batched_outputs, targets):
        """Add one positive and one negative correction point per object; maybe set the mask prompt."""
        for record, output, (_, binary) in zip(batched_inputs, batched_outputs, targets):
            n = output["iou_predictions"].shape[0]
            best = output["iou_predictions"].argmax(dim=1)
            index = torch.arange(n, device=best.device)
            best_logits = output["low_res_masks"][index, best].unsqueeze(1)
            prediction = (self._prediction_logits(output, record)[index, best].unsqueeze(1) > 0).float()
            coords, labels, _, _ = self.prompt_generator(binary.float(), prediction)
            if self.low_res_loss:
                _, _, scale = self._low_res_shape(record["input_size"])
                coords = (coords.float() + 0.5) * scale - 0.5
            else:
                coords = self.model.transform.apply_coords_torch(coords, record["original_size"])
            coords = coords.to(self.device)
            labels = labels.to(self.device)
            if record.get("point_coords") is not None:
                coords = torch.cat([record["point_coords"].to(self.device).float(), coords], dim=1)
                labels = torch.cat([record["point_labels"].to(self.device).to(labels.dtype), labels], dim=1)
            record["point_coords"], record["point_labels"] = coords, labels
            if self.mask_prob > 0 and random.random() < self.mask_prob:
                record["mask_inputs"] = best_logits.detach()
            else:
                record.pop("mask_inputs", None)
        return batched_inputs

    def _compute_iterative_loss(self, batched_inputs, y_one_hot, num_subiter, multimask_output,
                                image_embeddings=None, forward_context=None, backward=False):
        """Losses averaged over ``num_subiter`` prompting rounds; the image is encoded once.

        With ``backward=True`` each round's share of the loss is back-propagated right away (gradients accumulate),
        so that only one round's graph is kept in memory; the returned losses are then detached.
        """
        context = _no_context if forward_context is None else forward_context
        if image_embeddings is None:
            with context():
                image_embeddings, batched_inputs = self.model.image_embeddings_oft(batched_inputs)
        targets = self._loss_targets(batched_inputs, y_one_hot)
        loss, mask_loss, iou_loss, model_iou = 0.0, 0.0, 0.0, 0.0
        for i in range(num_subiter):
            with context():
                outputs = self.model(batched_inputs=batched_inputs, image_embeddings=image_embeddings,
                                     multimask_output=multimask_output if i == 0 else False,
                                     upsample_masks=not self.low_res_loss)
                this_loss, this_mask, this_iou = self._compute_loss(outputs, batched_inputs, targets)
            if backward:
                self._backward(this_loss / num_subiter)
                this_loss, this_mask, this_iou = this_loss.detach(), this_mask.detach(), this_iou.detach()
            loss, mask_loss, iou_loss = loss + this_loss, mask_loss + this_mask, iou_loss + this_iou
            with torch.no_grad():
                model_iou = model_iou + torch.stack([o["iou_predictions"].float().mean() for o in outputs]).mean()
                if i < num_subiter - 1:
                    batched_inputs = self._update_prompts(batched_inputs, outputs, targets)
        return loss / num_subiter, mask_loss / num_subiter, iou_loss / num_subiter, model_iou / num_subiter

    def _interactive_train_iteration(self, x, y):
        """The interactive losses of a batch (with their graph; not back-propagated)."""
        n_pos, n_neg, get_boxes, multimask_output = self._get_prompt_and_multimasking_choices(self._iteration)
        batched_inputs, sampled_ids = self.convert_inputs(x, y, n_pos, n_neg, get_boxes, self.n_objects_per_batch)
        batched_inputs, y_one_hot = self._preprocess_batch(batched_inputs, y, sampled_ids)
        loss, mask_loss, iou_loss, model_iou = self._compute_iterative_loss(
            batched_inputs, y_one_hot, self.n_sub_iteration, multimask_output,
        )
        return loss, mask_loss, iou_loss, model_iou, y_one_hot

    #
    # One training step with incremental back-propagation
    #

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _split_targets(self, y):
        """(instance labels (B, 1, H, W), further targets or None)."""
        return y, None

    def _auxiliary_backward(self, x, targets, embeddings, input_size, forward_context) -> Dict[str, torch.Tensor]:
        """Back-propagate further losses computed from the shared embeddings; returns them (detached) by name."""
        return {}

    def _train_step(self, x, y, forward_context):
        """Compute and back-propagate all losses of a batch; the optimizer step is left to the caller.

        The image encoder runs once. Its output is detached into a leaf tensor that every decoder pass uses; each
        pass (the UNETR decoder, then every prompting round) is back-propagated right after it, accumulating the
        gradient of the leaf, which is finally back-propagated through the encoder once. The gradients are those
        of the summed loss, but only one decoder graph is alive at a time.
        """
        labels, targets = self._split_targets(y)
        n_pos, n_neg, get_boxes, multimask_output = self._get_prompt_and_multimasking_choices(self._iteration)
        batched_inputs, sampled_ids = self.convert_inputs(x, labels, n_pos, n_neg, get_boxes,
                                                          self.n_objects_per_batch)
        batched_inputs, y_one_hot = self._preprocess_batch(batched_inputs, labels, sampled_ids)
        with forward_context():
            embeddings, batched_inputs = self.model.image_embeddings_oft(batched_inputs)
        shared = embeddings.detach().requires_grad_(embeddings.requires_grad)
        extra = self._auxiliary_backward(x, targets, shared, batched_inputs[0]["input_size"], forward_context)
        loss, mask_loss, iou_loss, model_iou = self._compute_iterative_loss(
            batched_inputs, y_one_hot, self.n_sub_iteration, multimask_output, image_embeddings=shared,
            forward_context=forward_context, backward=True,
        )
        if embeddings.requires_grad and shared.grad is not None:
            embeddings.backward(shared.grad)  # the gradient is already scaled when a scaler is used
        return loss, mask_loss, iou_loss, model_iou, y_one_hot, extra

    def _interactive_val_iteration(self, x, y, val_iteration):
        n_pos, n_neg, get_boxes, multimask_output = self._get_prompt_and_multimasking_choices_for_val(val_iteration)
        batched_inputs, sampled_ids = self.convert_inputs(x, y, n_pos, n_neg, get_boxes, self.n_objects_per_batch)
        batched_inputs, y_one_hot = self._preprocess_batch(batched_inputs, y, sampled_ids)
        image_embeddings, batched_inputs = self.model.image_embeddings_oft(batched_inputs)
        outputs = self.model(batched_inputs=batched_inputs, image_embeddings=image_embeddings,
                             multimask_output=multimask_output, upsample_masks=not self.low_res_loss)
        targets = self._loss_targets(batched_inputs, y_one_hot)
        loss, mask_loss, iou_loss = self._compute_loss(outputs, batched_inputs, targets)
        model_iou = torch.stack([o["iou_predictions"].float().mean() for o in outputs]).mean()
        return loss, mask_loss, iou_loss, model_iou, y_one_hot, mask_loss

    def _check_input_normalization(self, x, input_check_done):
        if not input_check_done:
            if x.min() < 0 or x.max() < 1:
                warnings.warn(
                    "The training images look normalised (values below 0 or all below 1). SAM normalises its inputs "
                    "itself and expects values in [0, 255]; remove the normalisation from the data pipeline."
                )
        return True

    #
    # Training and validation loops
    #

    def _log_train(self, x, y, y_one_hot, losses, extra):
        if self.logger is None:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        samples = y_one_hot if self._iteration % self.log_image_interval == 0 else None
        self.logger.log_train(self._iteration, *losses[:1], lr, x, y[:, :1], samples, *losses[1:], **extra)

    def _train_epoch_impl(self, progress, forward_context, backprop):
        # ``backprop`` (torch_em's backward + optimizer step) is not used: the losses are back-propagated
        # piecewise in ``_train_step``.
        self.model.train()
        input_check_done = False
        self.iteration_times = []
        t_start = time.time()
        for x, y in self.train_loader:
            t_iteration = time.perf_counter()
            input_check_done = self._check_input_normalization(x, input_check_done)
            self.optimizer.zero_grad()
            loss, mask_loss, iou_loss, model_iou, y_one_hot, extra = self._train_step(x, y, forward_context)
            self._optimizer_step()
            self.iteration_times.append(time.perf_counter() - t_iteration)
            self._log_train(x, y, y_one_hot, (loss, mask_loss, iou_loss, model_iou), extra)
            self._iteration += 1
            progress.update(1)  # the last iteration counts too (torch_em's loop leaves the bar one short)
            if self._iteration >= self.max_iteration:
                break
        return (time.time() - t_start) / max(len(self.iteration_times), 1)

    def _validate_impl(self, forward_context):
        self.model.eval()
        input_check_done = False
        totals = np.zeros(5)
        n_batches = 0
        with torch.no_grad():
            for val_iteration, (x, y) in enumerate(self.val_loader):
                input_check_done = self._check_input_normalization(x, input_check_done)
                with forward_context():
                    loss, mask_loss, iou_loss, model_iou, y_one_hot, metric = self._interactive_val_iteration(
                        x, y, val_iteration
                    )
                totals += [float(metric), float(loss), float(mask_loss), float(iou_loss), float(model_iou)]
                n_batches += 1
        if n_batches == 0:
            raise ValueError("The validation loader is empty.")
        metric, loss, mask_loss, iou_loss, model_iou = totals / n_batches
        if self.logger is not None:
            self.logger.log_validation(self._iteration, metric, loss, x, y, y_one_hot, mask_loss, iou_loss, model_iou)
        return float(metric)


#
# Logging
#

class SamLogger(TorchEmLogger):
    """Logs scalars to ``<save_root>/logs/<name>/metrics.csv`` and, if tensorboard is installed, images and scalars
    to tensorboard in the same folder."""

    def __init__(self, trainer, save_root, **unused_kwargs):
        super().__init__(trainer, save_root)
        self.log_dir = os.path.join("." if save_root is None else save_root, "logs", trainer.name)
        os.makedirs(self.log_dir, exist_ok=True)
        self.log_image_interval = trainer.log_image_interval
        self.csv_path = os.path.join(self.log_dir, "metrics.csv")
        if not os.path.exists(self.csv_path):
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(["step", "tag", "value"])
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.tb = None
        else:
            self.tb = SummaryWriter(self.log_dir)

    def _scalars(self, prefix: str, step: int, values: Dict[str, Any]) -> None:
        rows = [(int(step), f"{prefix}/{tag}", float(value)) for tag, value in values.items()]
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerows(rows)
        if self.tb is not None:
            for _, tag, value in rows:
                self.tb.add_scalar(tag=tag, scalar_value=value, global_step=step)

    def add_image(self, x, y, samples, name, step):
        """Add the first input, its labels and the sampled object masks to tensorboard."""
        if self.tb is None or samples is None:
            return
        from torchvision.utils import make_grid

        image = x[0].float()
        image = (image - image.min()) / (image.max() - image.min() + 1e-7)
        self.tb.add_image(tag=f"{name}/input", img_tensor=image, global_step=step)
        labels = y[0, :1].float()
        self.tb.add_image(tag=f"{name}/target", img_tensor=labels / (labels.max() + 1e-7), global_step=step)
        grid = make_grid([sample.float().cpu() for sample in samples[0]], nrow=4, padding=4)
        self.tb.add_image(tag=f"{name}/samples", img_tensor=grid, global_step=step)

    def log_train(self, step, loss, lr, x, y, samples, mask_loss, iou_regression_loss, model_iou):
        """Log the training losses, the model's IoU and the learning rate of an iteration (scalars only)."""
        self._scalars("train", step, {"loss": loss, "mask_loss": mask_loss, "iou_loss": iou_regression_loss,
                                      "model_iou": model_iou, "learning_rate": lr})
        if step % self.log_image_interval == 0:
            self.add_image(x, y, samples, "train", step)

    def log_validation(self, step, metric, loss, x, y, samples, mask_loss, iou_regression_loss, model_iou):
        """Log the validation metric, losses and the model's IoU (scalars only)."""
        self._scalars("validation", step, {"loss": loss, "mask_loss": mask_loss, "iou_loss": iou_regression_loss,
                                           "model_iou": model_iou, "metric": metric})
        self.add_image(x, y, samples, "validation", step)
