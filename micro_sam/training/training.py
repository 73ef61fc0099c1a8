"""Training entry points: ``train_sam``, ``train_sam_for_configuration``, ``train_instance_segmentation``.

Checkpoints are written to ``<save_root>/checkpoints/<name>/`` (``best.pt`` after the epoch with the best
validation metric, ``latest.pt`` after every epoch), logs to ``<save_root>/logs/<name>/``; ``save_root`` defaults
to the working directory. ``load_from_checkpoint="latest"`` continues a run: model, optimizer, scheduler and the
iteration / epoch counters are restored, and ``n_iterations`` / ``n_epochs`` count on from there.

The data is checked before anything is trained (see ``verify_n_labels_in_loader``), so that bad input fails at
once: images must have 1 or 3 channels with values in [0, 255], labels must be instance labels and hold enough
objects for ``n_objects_per_batch``.
"""
from __future__ import annotations

import os
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader

import torch_em

from ..models.peft_sam import ClassicalSurgery  # noqa: F401 (micro_sam 1.8 has it here)
from ..util import export_custom_sam_model, get_device, get_model_names, get_sam_model  # noqa: F401
from .configurations import CONFIGURATIONS, find_best_configuration, get_training_configuration
from .data import (check_instance_labels, default_sam_dataset, default_sam_loader, iterate_batches,
                   with_batch_size)
from .sam_trainer import CheckpointMixin, SamLogger, SamTrainer
from .joint_sam_trainer import JointSamLogger, JointSamTrainer, commute_upsamplers
from .trainable_sam import frozen_parts_to_eval
from .util import ConvertToSamInputs, get_trainable_sam_model
from .._lazy import lazy_attributes

__all__ = [
    "CONFIGURATIONS", "default_sam_dataset", "default_sam_loader", "export_instance_segmentation_model",
    "train_instance_segmentation", "train_sam", "train_sam_for_configuration",
]


# Names micro_sam 1.8 exposes here (imported there from other modules), resolved on first use.
__getattr__, __dir__ = lazy_attributes(globals(), {
    "Dataset": "torch.utils.data:Dataset",
    "random_split": "torch.utils.data:random_split",
    "Optimizer": "torch.optim:Optimizer",
    "export_custom_sam_model": "micro_sam.util:export_custom_sam_model",
    "get_model_names": "micro_sam.util:get_model_names",
    "get_sam_model": "micro_sam.util:get_sam_model",
    "get_raw_transform": "micro_sam.training.util:get_raw_transform",
    "require_8bit": "micro_sam.training.util:require_8bit",
    "get_unetr": "micro_sam.instance_segmentation:get_unetr",
    "load_data": "torch_em.util.image:load_data",
    "split_kwargs": "torch_em.data.datasets.util:split_kwargs",
    "tqdm": "tqdm:tqdm",
})

FilePath = Union[str, os.PathLike]


#
# Checks of the loaders
#

def _check_instance_channel(labels: torch.Tensor, where: str) -> int:
    """Check one (H, W) instance label patch; return its number of objects."""
    values = torch.unique(labels)
    if (values < 0).any():
        raise ValueError(f"{where}: the instance labels hold negative values; ids must be >= 0.")
    if not torch.allclose(values, values.round(), atol=1e-6):
        raise ValueError(f"{where}: the instance labels hold non-integer values (e.g. "
                         f"{float(values[values != values.round()][0])}); every object needs an integer id.")
    n_objects = int((values != 0).sum())
    if n_objects == 0:
        raise ValueError(f"{where}: a patch without any object. Training needs objects in every patch; use a "
                         "sampler that rejects empty patches (default_sam_dataset has one).")
    check_instance_labels(labels.cpu().numpy(), name=f"{where} instance labels")
    return n_objects


def _check_loader(loader, with_segmentation_decoder: bool, name: Optional[str] = None,
                  verify_n_labels_in_loader: Optional[int] = None, n_objects_per_batch: Optional[int] = None,
                  train_instance_segmentation_only: bool = False) -> None:
    """Check images and labels of the first batches of a loader; raise a ValueError for unsuitable data."""
    where = f"The {name} loader" if name else "The loader"
    try:
        x, _ = next(iter(loader))
    except StopIteration:
        raise ValueError(f"{where} is empty.") from None
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{where} gives images of shape {tuple(x.shape)}; expected (B, C, H, W) with 1 or 3 "
                         "channels.")
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 255 or high < 1:
        raise ValueError(
            f"{where} gives images with values in [{low:g}, {high:g}]; SAM needs values in [0, 255] (8 bit). Use "
            "raw_transform=micro_sam.training.util.get_raw_transform('normalize_percentile') (or "
            "'normalize_minmax') in the dataset, or remove a normalisation to [0, 1] / zero mean."
        )

    expected = (3 if train_instance_segmentation_only else 4) if with_segmentation_decoder else 1
    counts = []
    for x, y in iterate_batches(loader, verify_n_labels_in_loader):
        if y.ndim != 4 or y.shape[1] != expected:
            what = ("the 3 decoder targets" if train_instance_segmentation_only else
                    "instance labels and the 3 decoder targets") if with_segmentation_decoder else "instance labels"
            raise ValueError(
                f"{where} gives targets of shape {tuple(y.shape)}; expected (B, {expected}, H, W) with {what}. "
                "default_sam_dataset(with_segmentation_decoder=...) must match the training."
            )
        if tuple(y.shape[-2:]) != tuple(x.shape[-2:]):
            raise ValueError(f"{where} gives images {tuple(x.shape)} and targets {tuple(y.shape)} of different size.")
        if with_segmentation_decoder:
            targets = y if train_instance_segmentation_only else y[:, 1:]
            t_low, t_high = float(targets.min()), float(targets.max())
            if t_low < 0 or t_high > 1:
                raise ValueError(f"{where} gives decoder targets (foreground and normalised distances) in "
                                 f"[{t_low:g}, {t_high:g}]; they must be in [0, 1].")
        if not train_instance_segmentation_only:
            for sample in y[:, 0]:
                counts.append(_check_instance_channel(sample, where))
    if n_objects_per_batch is not None and counts and max(counts) < n_objects_per_batch:
        raise ValueError(
            f"{where} gives patches with at most {max(counts)} objects (checked {len(counts)} patches), fewer than "
            f"n_objects_per_batch={n_objects_per_batch}. Set n_objects_per_batch to at most {max(counts)}, or use "
            "larger patches / a sampler that requires more objects."
        )


#
# Shared helpers
#

class _ProgressBarWrapper:
    """A tqdm-like progress bar that forwards to napari's progress signals (pbar_total, pbar_update, ...)."""

    def __init__(self, signals):
        self._signals = signals
        self._total = None

    @property
    def total(self):
        return self._total

    @total.setter
    def total(self, value):
        self._signals.pbar_total.emit(value)
        self._total = value

    def update(self, steps):
        self._signals.pbar_update.emit(steps)

    def set_description(self, desc, **kwargs):
        self._signals.pbar_description.emit(desc)


@contextmanager
def _filter_warnings(ignore_warnings: bool):
    if ignore_warnings:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    else:
        yield


def _count_parameters(model_parameters) -> float:
    n_params = sum(p.numel() for p in model_parameters if p.requires_grad) / 1e6
    print(f"The model has {n_params:.2f}M trainable parameters.")
    return n_params


def _get_trainer_fit_params(n_epochs, n_iterations, save_every_kth_epoch, pbar_signals, overwrite_training,
                            load_from_checkpoint=None) -> Dict[str, Any]:
    params = {"epochs": n_epochs} if n_iterations is None else {"iterations": n_iterations}
    if save_every_kth_epoch is not None:
        params["save_every_kth_epoch"] = save_every_kth_epoch
    if pbar_signals is not None:
        params["progress"] = _ProgressBarWrapper(pbar_signals)
    params["overwrite_training"] = overwrite_training
    if load_from_checkpoint is not None:
        params["load_from_checkpoint"] = load_from_checkpoint
    return params


def _get_optimizer_and_scheduler(model_params, lr, optimizer_class, scheduler_class, scheduler_kwargs):
    optimizer = optimizer_class(model_params, lr=lr)
    if scheduler_kwargs is None:
        scheduler_kwargs = {"mode": "min", "factor": 0.9, "patience": 3}
    scheduler = None if scheduler_class is None else scheduler_class(optimizer=optimizer, **scheduler_kwargs)
    return optimizer, scheduler


def _check_run_settings(name, n_epochs, n_iterations, lr, load_from_checkpoint, overwrite_training):
    if not isinstance(name, str) or not name or os.sep in name:
        raise ValueError(f"name must be a non-empty string without path separators, got {name!r}.")
    if n_iterations is None:
        if int(n_epochs) != n_epochs or n_epochs < 1:
            raise ValueError(f"n_epochs must be a positive integer, got {n_epochs!r}.")
    elif int(n_iterations) != n_iterations or n_iterations < 1:
        raise ValueError(f"n_iterations must be a positive integer or None, got {n_iterations!r}.")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}.")
    if load_from_checkpoint is not None:
        if not isinstance(load_from_checkpoint, (str, os.PathLike)):
            raise ValueError(f"load_from_checkpoint must be 'latest', 'best' or a file path, got "
                             f"{load_from_checkpoint!r}.")
        if load_from_checkpoint not in ("latest", "best") and not os.path.isfile(load_from_checkpoint):
            raise ValueError(f"The checkpoint to resume from, {os.fspath(load_from_checkpoint)!r}, does not exist.")
        if not overwrite_training:
            raise ValueError("load_from_checkpoint and overwrite_training=False cannot be combined.")


def _resume_source(load_from_checkpoint, save_root, name) -> Optional[str]:
    """The checkpoint to resume from, or None when the named one ("latest" / "best") does not exist yet."""
    if load_from_checkpoint is None:
        return None
    if load_from_checkpoint in ("latest", "best"):
        path = os.path.join("." if save_root is None else os.fspath(save_root), "checkpoints", name,
                            f"{load_from_checkpoint}.pt")
        if not os.path.exists(path):
            print(f"No checkpoint {path} to resume from: training starts from the beginning.")
            return None
        return path
    return os.fspath(load_from_checkpoint)


def _report_time(t_start: float) -> None:
    t_run = time.time() - t_start
    hours, rest = divmod(int(round(t_run)), 3600)
    minutes, seconds = divmod(rest, 60)
    print(f"Training took {t_run:.1f} seconds (= {hours:02}:{minutes:02}:{seconds:02} hours)")


#
# train_sam
#

def _build_sam_trainer(
    name, model_type, train_loader, val_loader, early_stopping, n_objects_per_batch, checkpoint_path,
    with_segmentation_decoder, freeze, device, lr, n_sub_iteration, save_root, mask_prob, scheduler_class,
    scheduler_kwargs, optimizer_class, peft_kwargs, box_distortion_factor, strict_decoder_loading, low_res_loss,
    mask_loss=None, **model_kwargs,
) -> SamTrainer:
    """The trainer that :func:`train_sam` runs (model, decoder, optimizer and scheduler set up)."""
    device = get_device(device)
    model, state = get_trainable_sam_model(
        model_type=model_type, device=device, freeze=freeze, checkpoint_path=checkpoint_path, return_state=True,
        peft_kwargs=peft_kwargs, **model_kwargs,
    )
    convert_inputs = ConvertToSamInputs(transform=model.transform, box_distortion_factor=box_distortion_factor)

    trainable = [p for p in model.parameters() if p.requires_grad]
    unetr = None
    if with_segmentation_decoder:
        from ..instance_segmentation import get_unetr

        unetr = get_unetr(image_encoder=model.sam.image_encoder, decoder_state=state.get("decoder_state"),
                          device=device, flexible_load_checkpoint=not strict_decoder_loading)
        trainable += [p for n, p in unetr.named_parameters() if not n.startswith("encoder")]
    _count_parameters(trainable)
    optimizer, scheduler = _get_optimizer_and_scheduler(trainable, lr, optimizer_class, scheduler_class,
                                                        scheduler_kwargs)
    common = dict(
        name=name, save_root=save_root, train_loader=train_loader, val_loader=val_loader, model=model,
        optimizer=optimizer, device=device, lr_scheduler=scheduler, log_image_interval=100,
        mixed_precision=torch.device(device).type == "cuda", convert_inputs=convert_inputs,
        n_objects_per_batch=n_objects_per_batch, n_sub_iteration=n_sub_iteration, compile_model=False,
        early_stopping=early_stopping, mask_prob=mask_prob, low_res_loss=low_res_loss, mask_loss=mask_loss,
    )
    if with_segmentation_decoder:
        instance_loss = torch_em.loss.DiceBasedDistanceLoss(mask_distances_in_bg=True)
        trainer = JointSamTrainer(unetr=unetr, instance_loss=instance_loss, instance_metric=instance_loss,
                                  logger=JointSamLogger, **common)
    else:
        trainer = SamTrainer(logger=SamLogger, **common)
    return trainer


def train_sam(
    name: str,
    model_type: str,
    train_loader: DataLoader,
    val_loader: DataLoader,
    n_epochs: int = 100,
    early_stopping: Optional[int] = 10,
    n_objects_per_batch: Optional[int] = 25,
    checkpoint_path: Optional[FilePath] = None,
    with_segmentation_decoder: bool = True,
    freeze: Optional[List[str]] = None,
    device: Optional[Union[str, torch.device]] = None,
    lr: float = 1e-5,
    n_sub_iteration: int = 8,
    save_root: Optional[FilePath] = None,
    mask_prob: float = 0.5,
    n_iterations: Optional[int] = None,
    scheduler_class: Optional[type] = torch.optim.lr_scheduler.ReduceLROnPlateau,
    scheduler_kwargs: Optional[Dict[str, Any]] = None,
    save_every_kth_epoch: Optional[int] = None,
    pbar_signals: Optional[Any] = None,
    optimizer_class: Optional[type] = torch.optim.AdamW,
    peft_kwargs: Optional[Dict] = None,
    ignore_warnings: bool = True,
    verify_n_labels_in_loader: Optional[int] = 50,
    box_distortion_factor: Optional[float] = 0.025,
    overwrite_training: bool = True,
    strict_decoder_loading: bool = True,
    load_from_checkpoint: Optional[Union[str, os.PathLike]] = None,
    low_res_loss: bool = True,
    mask_loss: Optional[torch.nn.Module] = None,
    **model_kwargs,
) -> None:
    """Train SAM for interactive segmentation, optionally with the UNETR decoder for automatic segmentation.

    Args:
        name: Name of the run: checkpoints go to ``<save_root>/checkpoints/<name>/``, logs to
            ``<save_root>/logs/<name>/``.
        model_type: The model to start from (a registered name such as "vit_b_lm", or the architecture of
            ``checkpoint_path``).
        train_loader: Training batches (x, y); see :func:`default_sam_loader`.
        val_loader: Validation batches.
        n_epochs: Epochs to train (ignored when ``n_iterations`` is given).
        early_stopping: Stop after this many epochs without a better validation metric; None: never.
        n_objects_per_batch: Objects per image used for the interactive loss (randomly chosen); None: all.
        checkpoint_path: Weights to start from instead of the registered ones.
        with_segmentation_decoder: Also train the UNETR decoder (the loaders must give 4 target channels).
        freeze: Model parts that are not trained ("image_encoder", "prompt_encoder", "mask_decoder").
        device: "cpu", "cuda", "mps"; None picks the best available. Mixed precision is used on CUDA.
        lr: Learning rate.
        n_sub_iteration: Prompting rounds per batch (initial prompt plus corrections).
        save_root: Folder for checkpoints and logs; default the working directory.
        mask_prob: Probability to use the previous logits as mask prompt in a correction round.
        n_iterations: Iterations to train; overrides ``n_epochs``.
        scheduler_class: Learning rate scheduler class (stepped with the validation metric after every epoch).
        scheduler_kwargs: Its arguments; default ``{"mode": "min", "factor": 0.9, "patience": 3}``.
        save_every_kth_epoch: Also keep ``epoch-<k>.pt`` every k epochs.
        pbar_signals: napari progress signals (``pbar_total``, ``pbar_update``, ``pbar_description``).
        optimizer_class: Optimizer class.
        peft_kwargs: Parameter-efficient finetuning of the image encoder: arguments of
            :class:`micro_sam.models.peft_sam.PEFT_Sam`, e.g. ``{"rank": 4, "peft_module": "lora"}`` (see
            :func:`micro_sam.training.util.get_trainable_sam_model`).
        ignore_warnings: Silence warnings during training.
        verify_n_labels_in_loader: Batches of each loader checked before training; None: all.
        box_distortion_factor: Random enlargement of box prompts (fraction of the box size).
        overwrite_training: False skips training if ``latest.pt`` already reached the requested iterations.
        strict_decoder_loading: Require a decoder state in the checkpoint to fit the decoder exactly.
        load_from_checkpoint: Continue from "latest" or "best" of this run (if it exists) or from a checkpoint
            file; ``n_iterations`` / ``n_epochs`` are counted on from its iteration.
        low_res_loss: Compute the loss on SAM's 256 x 256 logits (faster; see
            :mod:`micro_sam.training.sam_trainer`); False upsamples masks to the input size as micro_sam does.
        mask_loss: The loss of the predicted masks (see :mod:`micro_sam.training.losses`); None: micro_sam's
            Dice loss. It is also the validation metric.
        model_kwargs: Further arguments of :func:`micro_sam.training.util.get_trainable_sam_model` (e.g.
            ``embedding_cache_size`` for a frozen image encoder, ``gradient_checkpointing`` to recompute the
            trainable encoder's activations in the backward pass) and :func:`micro_sam.util.get_sam_model`.

    Raises:
        ValueError: For unsuitable data (see the module docstring), a checkpoint of another architecture, or
            invalid settings; before anything is trained.
    """
    _check_run_settings(name, n_epochs, n_iterations, lr, load_from_checkpoint, overwrite_training)
    with _filter_warnings(ignore_warnings):
        t_start = time.time()
        if verify_n_labels_in_loader is None or verify_n_labels_in_loader > 0:
            _check_loader(train_loader, with_segmentation_decoder, "train", verify_n_labels_in_loader,
                          n_objects_per_batch)
            _check_loader(val_loader, with_segmentation_decoder, "validation", verify_n_labels_in_loader,
                          n_objects_per_batch)

        trainer = _build_sam_trainer(
            name=name, model_type=model_type, train_loader=train_loader, val_loader=val_loader,
            early_stopping=early_stopping, n_objects_per_batch=n_objects_per_batch, checkpoint_path=checkpoint_path,
            with_segmentation_decoder=with_segmentation_decoder, freeze=freeze, device=device, lr=lr,
            n_sub_iteration=n_sub_iteration, save_root=save_root, mask_prob=mask_prob,
            scheduler_class=scheduler_class, scheduler_kwargs=scheduler_kwargs, optimizer_class=optimizer_class,
            peft_kwargs=peft_kwargs, box_distortion_factor=box_distortion_factor,
            strict_decoder_loading=strict_decoder_loading, low_res_loss=low_res_loss, mask_loss=mask_loss,
            **model_kwargs,
        )
        fit_params = _get_trainer_fit_params(n_epochs, n_iterations, save_every_kth_epoch, pbar_signals,
                                             overwrite_training, _resume_source(load_from_checkpoint, save_root, name))
        trainer.fit(**fit_params)
        _report_time(t_start)


#
# Instance segmentation only
#

class InstanceSegmentationTrainer(CheckpointMixin, torch_em.trainer.DefaultTrainer):
    """torch_em's DefaultTrainer for the UNETR, with checkpoints that a weights-only loader can read.

    A frozen image encoder stays in evaluation mode while the decoder trains (:func:`frozen_parts_to_eval`).
    """

    def _forward_and_loss(self, x, y):
        if self.model.training:  # DefaultTrainer switched the whole model to training mode for this epoch
            frozen_parts_to_eval(self.model)
        return super()._forward_and_loss(x, y)


class InstanceSegmentationLogger(SamLogger):
    """Scalars of :class:`InstanceSegmentationTrainer` to ``<save_root>/logs/<name>/metrics.csv`` (+ tensorboard)."""

    def log_train(self, step, loss, lr, x, y, prediction, log_gradients=False):
        self._scalars("train", step, {"loss": loss, "learning_rate": lr})

    def log_validation(self, step, metric, loss, x, y, prediction):
        self._scalars("validation", step, {"loss": loss, "metric": metric})


def train_instance_segmentation(
    name: str,
    model_type: str,
    train_loader: DataLoader,
    val_loader: DataLoader,
    n_epochs: int = 100,
    early_stopping: Optional[int] = 10,
    loss: Optional[torch.nn.Module] = None,
    metric: Optional[torch.nn.Module] = None,
    checkpoint_path: Optional[FilePath] = None,
    freeze: Optional[List[str]] = None,
    device: Optional[Union[str, torch.device]] = None,
    lr: float = 1e-5,
    save_root: Optional[FilePath] = None,
    n_iterations: Optional[int] = None,
    scheduler_class: Optional[type] = torch.optim.lr_scheduler.ReduceLROnPlateau,
    scheduler_kwargs: Optional[Dict[str, Any]] = None,
    save_every_kth_epoch: Optional[int] = None,
    pbar_signals: Optional[Any] = None,
    optimizer_class: Optional[type] = torch.optim.AdamW,
    peft_kwargs: Optional[Dict] = None,
    ignore_warnings: bool = True,
    overwrite_training: bool = True,
    strict_decoder_loading: bool = True,
    verify_n_labels_in_loader: Optional[int] = 50,
    load_from_checkpoint: Optional[Union[str, os.PathLike]] = None,
    **model_kwargs,
) -> None:
    """Train only the UNETR for automatic instance segmentation (SAM's image encoder + decoder).

    The prompt encoder and mask decoder are not trained. The checkpoint in ``checkpoints/<name>/`` holds the
    UNETR (``encoder.*`` and decoder parameters); :func:`export_instance_segmentation_model` turns it into a
    micro_sam model file. The loaders give (x, y) with y the 3 decoder targets (see
    ``default_sam_dataset(..., train_instance_segmentation_only=True)``).

    Args:
        name: Name of the run (checkpoint and log folder).
        model_type: The SAM model to start from.
        train_loader: Training batches.
        val_loader: Validation batches.
        n_epochs: Epochs to train (ignored when ``n_iterations`` is given).
        early_stopping: Stop after this many epochs without improvement; None: never.
        loss: Loss between output and targets; default ``torch_em.loss.DiceBasedDistanceLoss``.
        metric: Validation metric; default the loss.
        checkpoint_path: Weights to start from.
        freeze: Parts not to train; only "image_encoder" is meaningful here.
        device: The device; None picks the best available.
        lr: Learning rate.
        save_root: Folder for checkpoints and logs.
        n_iterations: Iterations to train; overrides ``n_epochs``.
        scheduler_class: Learning rate scheduler class.
        scheduler_kwargs: Its arguments.
        save_every_kth_epoch: Also keep ``epoch-<k>.pt`` every k epochs.
        pbar_signals: napari progress signals.
        optimizer_class: Optimizer class.
        peft_kwargs: Parameter-efficient finetuning of the image encoder: arguments of
            :class:`micro_sam.models.peft_sam.PEFT_Sam`, e.g. ``{"rank": 4, "peft_module": "lora"}`` (see
            :func:`micro_sam.training.util.get_trainable_sam_model`).
        ignore_warnings: Silence warnings during training.
        overwrite_training: False skips training if ``latest.pt`` already reached the requested iterations.
        strict_decoder_loading: Require a decoder state in the checkpoint to fit exactly.
        verify_n_labels_in_loader: Batches of each loader checked before training; None: all.
        load_from_checkpoint: Continue from "latest", "best" or a checkpoint file.
        model_kwargs: Further arguments of :func:`micro_sam.util.get_sam_model`.
    """
    _check_run_settings(name, n_epochs, n_iterations, lr, load_from_checkpoint, overwrite_training)
    with _filter_warnings(ignore_warnings):
        t_start = time.time()
        if verify_n_labels_in_loader is None or verify_n_labels_in_loader > 0:
            for which, loader in (("train", train_loader), ("validation", val_loader)):
                _check_loader(loader, True, which, verify_n_labels_in_loader, None,
                              train_instance_segmentation_only=True)
        from ..instance_segmentation import get_unetr

        device = get_device(device)
        sam_model, state = get_trainable_sam_model(
            model_type=model_type, device=device, checkpoint_path=checkpoint_path, return_state=True,
            peft_kwargs=peft_kwargs, freeze=freeze, **model_kwargs,
        )
        model = get_unetr(image_encoder=sam_model.sam.image_encoder, decoder_state=state.get("decoder_state"),
                          device=device, flexible_load_checkpoint=not strict_decoder_loading)
        commute_upsamplers(model)  # the same function, its 1x1 convolutions on 4x fewer pixels (as in joint training)
        loss = torch_em.loss.DiceBasedDistanceLoss(mask_distances_in_bg=True) if loss is None else loss
        trainable = [p for p in model.parameters() if p.requires_grad]
        _count_parameters(trainable)
        optimizer, scheduler = _get_optimizer_and_scheduler(trainable, lr, optimizer_class, scheduler_class,
                                                            scheduler_kwargs)
        trainer = InstanceSegmentationTrainer(
            name=name, model=model, train_loader=train_loader, val_loader=val_loader, device=device,
            mixed_precision=torch.device(device).type == "cuda", log_image_interval=50, compile_model=False,
            save_root=save_root, loss=loss, metric=loss if metric is None else metric, optimizer=optimizer,
            lr_scheduler=scheduler, early_stopping=early_stopping, logger=InstanceSegmentationLogger,
        )
        fit_params = _get_trainer_fit_params(n_epochs, n_iterations, save_every_kth_epoch, pbar_signals,
                                             overwrite_training, _resume_source(load_from_checkpoint, save_root, name))
        trainer.fit(**fit_params)
        _report_time(t_start)


def export_instance_segmentation_model(
    trained_model_path: FilePath,
    output_path: FilePath,
    model_type: str,
    initial_checkpoint_path: Optional[FilePath] = None,
) -> None:
    """Export a checkpoint of :func:`train_instance_segmentation` as a micro_sam model file.

    The file holds ``{"model_state": <SAM state dict>, "decoder_state": <UNETR decoder state>}``, loadable with
    :func:`micro_sam.util.get_sam_model` and :func:`micro_sam.instance_segmentation.get_predictor_and_decoder`.
    The image encoder comes from the trained UNETR, prompt encoder and mask decoder from the initial model (they
    were not trained, so the model is meant for automatic segmentation). An encoder trained with PEFT
    (``peft_kwargs``) keeps its PEFT parameters: load the file with the same ``peft_kwargs``.

    Args:
        trained_model_path: The trained checkpoint (``checkpoints/<name>/best.pt``).
        output_path: Where to write the model file.
        model_type: The model the training started from.
        initial_checkpoint_path: The checkpoint the training started from, if not the registered model.

    Raises:
        ValueError: The trained checkpoint does not fit the model.
    """
    from .._checkpoints import safe_load
    from ..models._peft_layout import infer_peft_kwargs
    from ..models.peft_sam import PEFT_Sam

    state = safe_load(trained_model_path)
    trained = state.get("model_state", state) if isinstance(state, dict) else None
    if not isinstance(trained, dict) or not any(k.startswith("encoder.") for k in trained):
        raise ValueError(f"{os.fspath(trained_model_path)!r} is no UNETR checkpoint (no 'encoder.*' parameters).")
    encoder_state = {k[len("encoder."):]: v for k, v in trained.items() if k.startswith("encoder.")}
    decoder_state = OrderedDict((k, v) for k, v in trained.items() if not k.startswith("encoder"))

    from .. import util  # looked up at call time (tests replace util.get_sam_model)

    predictor = util.get_sam_model(model_type=model_type, checkpoint_path=initial_checkpoint_path, device="cpu")
    sam = predictor.model
    peft_kwargs = infer_peft_kwargs({f"image_encoder.{k}": v for k, v in encoder_state.items()})
    if peft_kwargs is not None:  # the layout of the trained encoder (its PEFT parameters come from the checkpoint)
        sam = PEFT_Sam(sam, **peft_kwargs).sam
    model_state = OrderedDict(sam.state_dict())
    own_encoder = [k[len("image_encoder."):] for k in model_state if k.startswith("image_encoder.")]
    missing = [k for k in own_encoder if k not in encoder_state]
    mismatched = [k for k in own_encoder if k in encoder_state
                  and tuple(encoder_state[k].shape) != tuple(model_state["image_encoder." + k].shape)]
    if missing or mismatched or len(encoder_state) != len(own_encoder):
        raise ValueError(
            f"The encoder in {os.fspath(trained_model_path)!r} does not fit a {predictor.model_type} model "
            f"({len(missing)} missing, {len(mismatched)} of another shape); pass the model_type it was trained with."
        )
    for k in own_encoder:
        model_state["image_encoder." + k] = encoder_state[k]
    output_path = os.fspath(output_path)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    to_save = {"model_state": model_state, "decoder_state": decoder_state}
    image_size = int(predictor.model.image_encoder.img_size)
    if getattr(predictor, "model_type", None) == "vit_t" and image_size != 1024:  # see models.build_sam
        to_save["image_size"] = image_size
    torch.save(to_save, output_path)


#
# Hardware configurations
#

def _find_best_configuration() -> str:
    """micro_sam's name for the configuration closest to this machine (see ``find_best_configuration``)."""
    return find_best_configuration()


def _adapt_batch_size(loader: DataLoader, batch_size: int, configuration: str, which: str) -> DataLoader:
    if loader.batch_size == batch_size:
        return loader
    if getattr(loader, "micro_sam_batch_size_given", True) is False:
        return with_batch_size(loader, batch_size)
    warnings.warn(
        f"The {which} loader has batch size {loader.batch_size}, but the configuration {configuration!r} was tested "
        f"with batch size {batch_size}; a larger batch may not fit into memory. Build the loader with "
        "default_sam_loader(...) without batch_size to get the configuration's batch size."
    )
    return loader


def train_sam_for_configuration(
    name: str,
    train_loader: DataLoader,
    val_loader: DataLoader,
    configuration: Optional[str] = None,
    checkpoint_path: Optional[FilePath] = None,
    with_segmentation_decoder: bool = True,
    train_instance_segmentation_only: bool = False,
    model_type: Optional[str] = None,
    **kwargs,
) -> None:
    """Train with the settings tested for a hardware resource (see :mod:`micro_sam.training.configurations`).

    The configuration sets the model type (unless given), the frozen parts and the objects per batch; a
    training loader from :func:`default_sam_loader` built without ``batch_size`` gets the configuration's
    batch size, another loader with a different batch size gives a warning. ``kwargs`` override the settings.

    Args:
        name: Name of the run.
        train_loader: Training batches.
        val_loader: Validation batches.
        configuration: A resource or configuration name ("CPU", "CPU_32GB", "CPU_64GB", "gtx1080", "GTX1080Ti",
            "rtx5000", "RTX5000", "V100", "A100"); None picks the closest match for this machine.
        checkpoint_path: Weights to start from.
        with_segmentation_decoder: Also train the UNETR decoder.
        train_instance_segmentation_only: Train only the UNETR (:func:`train_instance_segmentation`).
        model_type: The model to start from; its architecture must be tested on the resource. Default the
            resource's vit_b row.
        kwargs: Further arguments of :func:`train_sam` (or :func:`train_instance_segmentation`).

    Raises:
        ValueError: Unknown configuration, or a model type not tested on it.
    """
    if configuration is None:
        configuration = find_best_configuration()
        print(f"Using the training configuration {configuration!r}, the closest match for this machine.")
    settings = get_training_configuration(configuration, model_type)
    model_type = settings["model_type"] if model_type is None else model_type
    train_loader = _adapt_batch_size(train_loader, settings["batch_size"], configuration, "training")

    train_kwargs = {"n_objects_per_batch": settings["n_objects_per_batch"], "freeze": settings["freeze"] or None}
    train_kwargs.update(kwargs)
    if train_instance_segmentation_only:
        # The objects per batch only concern the interactive training.
        train_kwargs.pop("n_objects_per_batch", None)
        train_instance_segmentation(name=name, train_loader=train_loader, val_loader=val_loader,
                                    checkpoint_path=checkpoint_path, model_type=model_type, **train_kwargs)
    else:
        train_sam(name=name, train_loader=train_loader, val_loader=val_loader, checkpoint_path=checkpoint_path,
                  with_segmentation_decoder=with_segmentation_decoder, model_type=model_type, **train_kwargs)


#
# Command line
#

def _export_helper(save_root, checkpoint_name, output_path, model_type, with_segmentation_decoder):
    best = os.path.join(os.getcwd() if save_root is None else os.fspath(save_root), "checkpoints", checkpoint_name,
                        "best.pt")
    if not os.path.exists(best):
        raise FileNotFoundError(f"The trained model was not found at {best!r}.")
    if not output_path:
        return best
    if os.path.splitext(output_path)[1] not in (".pt", ".pth"):
        raise ValueError(f"output_path must end with .pt or .pth, got {output_path!r}.")
    export_custom_sam_model(checkpoint_path=best, model_type=model_type[:5], save_path=output_path,
                            with_segmentation_decoder=with_segmentation_decoder)
    return output_path


def _parse_segmentation_decoder(segmentation_decoder) -> Tuple[bool, bool]:
    if segmentation_decoder in (None, "None", "none"):
        return False, False
    if segmentation_decoder == "instances":
        return True, False
    if segmentation_decoder == "instances_only":
        return True, True
    raise ValueError(f"segmentation_decoder must be 'instances', 'instances_only' or 'None', got "
                     f"{segmentation_decoder!r}.")


def main(argv: Optional[List[str]] = None) -> int:
    """The ``micro_sam.train`` command line: finetune SAM on images and instance labels (see
    :mod:`micro_sam.training._train_cli` and ``micro_sam.train --help``).

    Args:
        argv: The arguments; None reads them from ``sys.argv``.

    Returns:
        The exit code: 0 when the model was trained (and exported), 2 for invalid arguments or data (reported in one
        line before anything is loaded), 1 for a failure during training.
    """
    from ._train_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
