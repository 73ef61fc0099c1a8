"""Helpers for training: the trainable model, converting loader batches into SAM inputs, raw transforms.

Axis conventions: label images and masks are numpy / torch arrays in (y, x) order; prompts handed to SAM
are in its conventions, points (x, y) and boxes XYXY, in the frame of the resized model input.
"""
from __future__ import annotations

import os
import warnings
from functools import partial
from math import ceil, floor
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..util import get_centers_and_bounding_boxes, get_device, get_sam_model, segmentation_to_one_hot
from .._sam_loading import _DEFAULT_MODEL
from .trainable_sam import TrainableSAM
from .._lazy import lazy_attributes

__all__ = [
    "ConvertToSamInputs", "ConvertToSemanticSamInputs", "ResizeLabelTrafo", "ResizeRawTrafo", "get_raw_transform",
    "get_trainable_sam_model", "identity", "normalize_to_8bit", "require_8bit",
]


# Names micro_sam 1.8 exposes here (imported there from other modules), resolved on first use.
__getattr__, __dir__ = lazy_attributes(globals(), {
    "PerObjectDistanceTransform": "torch_em.transform.label:PerObjectDistanceTransform",
    "PointAndBoxPromptGenerator": "micro_sam.prompt_generators:PointAndBoxPromptGenerator",
    "ResizeLongestSide": "segment_anything.utils.transforms:ResizeLongestSide",
    "normalize": "torch_em.transform.raw:normalize",
    "normalize_percentile": "torch_em.transform.raw:normalize_percentile",
    "to_rgb": "torch_em.data.datasets.light_microscopy.neurips_cell_seg:to_rgb",
})

_MODEL_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


def identity(x):
    """Return the input unchanged.

    Used as raw transform to skip data normalisation: SAM normalises its inputs itself and expects images with
    values in [0, 255].
    """
    return x


def require_8bit(x):
    """Scale data in [0, 1] to [0, 255]; leave everything else unchanged.

    This is the default raw transform of :func:`micro_sam.training.default_sam_dataset`. Data with values above
    255 (e.g. uint16 microscopy images) is not rescaled; use :func:`get_raw_transform` for that.
    """
    if x.max() < 1:
        x = x * 255
    return x


def _to_8bit_range(image: np.ndarray, normalizer: Callable) -> np.ndarray:
    return normalizer(image) * 255


def _percentile_to_unit(image: np.ndarray) -> np.ndarray:
    from torch_em.transform.raw import normalize_percentile

    return np.clip(normalize_percentile(image), 0, 1)


def _minmax_to_unit(image: np.ndarray) -> np.ndarray:
    from torch_em.transform.raw import normalize

    return normalize(image)


def normalize_to_8bit(raw: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 255]."""
    return _minmax_to_unit(raw) * 255


def get_raw_transform(preprocess: Optional[str] = None) -> Callable:
    """The transform that brings raw images into SAM's input range [0, 255].

    Args:
        preprocess: None: :func:`require_8bit` (data must already be 8 bit, or in [0, 1]);
            "normalize_minmax": min-max normalisation; "normalize_percentile": normalisation between the 1st and
            99th percentile, clipped. Both scale to [0, 255].

    Returns:
        The transform, a picklable callable (usable in data loader workers).

    Raises:
        ValueError: For another ``preprocess`` value.
    """
    if preprocess is None:
        return require_8bit
    normalizers = {"normalize_minmax": _minmax_to_unit, "normalize_percentile": _percentile_to_unit}
    if preprocess not in normalizers:
        raise ValueError(
            f"'{preprocess}' is not a supported preprocessing; choose None, 'normalize_minmax' or "
            "'normalize_percentile'."
        )
    return partial(_to_8bit_range, normalizer=normalizers[preprocess])


def _check_freeze(freeze, sam: torch.nn.Module) -> List[str]:
    if freeze is None:
        return []
    parts = [freeze] if isinstance(freeze, str) else list(freeze)
    names = [name for name, _ in sam.named_parameters()]
    for part in parts:
        if not isinstance(part, str) or not any(name.startswith(part) for name in names):
            raise ValueError(
                f"Cannot freeze {part!r}: it is not a part of the model. Valid parts: {', '.join(_MODEL_PARTS)} "
                "(or the name prefix of any parameter, e.g. 'image_encoder.neck')."
            )
    return parts


def get_trainable_sam_model(
    model_type: str = _DEFAULT_MODEL,
    device: Optional[Union[str, torch.device]] = None,
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
    freeze: Optional[Union[str, List[str]]] = None,
    return_state: bool = False,
    peft_kwargs: Optional[Dict] = None,
    flexible_load_checkpoint: bool = False,
    embedding_cache_size: int = 0,
    gradient_checkpointing: bool = False,
    **model_kwargs,
) -> TrainableSAM:
    """Load a SAM model for training.

    Args:
        model_type: The model to start from: a registered model name (e.g. "vit_b_lm", "vit_t") or, with
            ``checkpoint_path``, the architecture of the checkpoint.
        device: The device; None picks the best available one.
        checkpoint_path: A checkpoint to start from instead of the registered weights.
        freeze: Parts whose parameters are not trained: any of "image_encoder", "prompt_encoder",
            "mask_decoder" (or a parameter name prefix). None trains everything.
        return_state: Also return the checkpoint's full state (with ``decoder_state`` where present).
        peft_kwargs: Parameter-efficient finetuning: arguments of :class:`micro_sam.models.peft_sam.PEFT_Sam`, e.g.
            ``{"rank": 4, "peft_module": "lora"}``; the image encoder is frozen except for the PEFT parameters
            (works for vit_t too). ``quantize=True`` (QLoRA) needs bitsandbytes and a CUDA GPU. The weights of
            ``model_type`` / ``checkpoint_path`` are loaded first and then wrapped; a checkpoint that already
            holds these PEFT parameters (a PEFT model trained before) is loaded into the wrapped model.
        flexible_load_checkpoint: Load only the parameters whose names and shapes match.
        embedding_cache_size: With a frozen image encoder, reuse the embeddings of up to this many distinct
            input batches (see :class:`TrainableSAM`); 0: compute them every time.
        gradient_checkpointing: Recompute the trainable encoder's activations in the backward pass instead of keeping
            them (see :class:`TrainableSAM`): far less memory when the encoder trains, about a third more compute.
        model_kwargs: Further keyword arguments for :func:`micro_sam.util.get_sam_model` (``num_multimask_outputs``,
            ``image_size``).

    Returns:
        The :class:`TrainableSAM` (in training mode), and the state with ``return_state``.

    Raises:
        ValueError: The checkpoint holds another architecture than ``model_type`` names, ``freeze`` names
            an unknown part, ``freeze`` includes the image encoder together with ``peft_kwargs``, or the PEFT
            settings are invalid.
    """
    from .._checkpoints import CheckpointError
    from ..models.peft_sam import PEFT_Sam, check_peft_kwargs

    peft_kwargs = check_peft_kwargs(peft_kwargs, model_type) if peft_kwargs else None
    if peft_kwargs and freeze is not None and "image_encoder" in ([freeze] if isinstance(freeze, str) else freeze):
        raise ValueError("PEFT trains parts of the image encoder: freeze=['image_encoder'] and peft_kwargs cannot "
                         "be combined (freeze 'prompt_encoder' / 'mask_decoder' instead, or drop peft_kwargs).")
    device = get_device(device)
    load = dict(model_type=model_type, device=device, checkpoint_path=checkpoint_path, return_sam=True,
                return_state=True, flexible_load_checkpoint=flexible_load_checkpoint, **model_kwargs)
    with warnings.catch_warnings():
        # A mismatch between model_type and the checkpoint is an error here, reported below.
        warnings.filterwarnings("ignore", message=".*asks for.*building a.*")
        try:
            predictor, sam, state = get_sam_model(**load)
            wrap = bool(peft_kwargs)
        except CheckpointError:
            if not peft_kwargs:
                raise
            # a checkpoint of a PEFT model: load it into the wrapped model
            if peft_kwargs.get("quantize"):
                raise ValueError("quantize=True starts QLoRA from the base model's weights; the checkpoint already "
                                 "holds PEFT parameters. Pass the base model as checkpoint_path.") from None
            predictor, sam, state = get_sam_model(peft_kwargs=peft_kwargs, **load)
            wrap = False
    if predictor.model_type != model_type[:5]:
        raise ValueError(
            f"The checkpoint {os.fspath(checkpoint_path)!r} holds a {predictor.model_type} model, but model_type "
            f"{model_type!r} asks for {model_type[:5]}. Pass model_type={predictor.model_type!r} to train it."
        )
    if wrap:
        sam = PEFT_Sam(sam, **peft_kwargs).sam.to(device)
    for part in _check_freeze(freeze, sam):
        for name, parameter in sam.named_parameters():
            if name.startswith(part):
                parameter.requires_grad_(False)
    model = TrainableSAM(sam, embedding_cache_size=embedding_cache_size,
                         gradient_checkpointing=gradient_checkpointing).train()
    if return_state:
        return model, state
    return model


class ConvertToSamInputs:
    """Turn a loader batch (images and instance labels) into SAM's batched inputs with sampled prompts.

    Args:
        transform: The ``ResizeLongestSide`` of the model (``TrainableSAM.transform``) that maps prompts from the
            original image to the model input frame; None keeps them in the original frame.
        dilation_strength: Margin in pixels around an object in which no negative points are placed.
        box_distortion_factor: If given, each side of a box prompt is moved outwards by a random fraction
            (uniform in [0, factor)) of the box extent, clipped to the image.
    """

    def __init__(self, transform, dilation_strength: int = 10,
                 box_distortion_factor: Optional[float] = None) -> None:
        self.transform = transform
        self.dilation_strength = dilation_strength
        self.box_distortion_factor = box_distortion_factor
        self.init_kwargs = {"transform": None if transform is None else type(transform).__name__,
                            "dilation_strength": dilation_strength, "box_distortion_factor": box_distortion_factor}

    def _distort_boxes(self, boxes: Sequence[Sequence[int]], shape: Tuple[int, int]) -> List[List[int]]:
        factor = self.box_distortion_factor
        distorted = []
        for y0, x0, y1, x1 in boxes:
            extent_y, extent_x = y1 - y0, x1 - x0
            grow = np.random.uniform(0, factor, size=4)
            distorted.append([
                int(round(max(0, y0 - grow[0] * extent_y))), int(round(max(0, x0 - grow[1] * extent_x))),
                int(round(min(shape[0], y1 + grow[2] * extent_y))), int(round(min(shape[1], x1 + grow[3] * extent_x))),
            ])
        return distorted

    def _prompts_for_image(self, labels: np.ndarray, generator, n_samples: Optional[int]):
        ids = np.unique(labels)
        ids = ids[ids != 0]
        if len(ids) == 0:
            raise ValueError("A training sample has no objects; every sample needs at least one labelled object.")
        if n_samples is not None and n_samples < len(ids):
            ids = np.sort(np.random.choice(ids, size=n_samples, replace=False))
        _, all_boxes = get_centers_and_bounding_boxes(labels, mode="p")
        boxes = [all_boxes[int(i)] for i in ids]
        if self.box_distortion_factor is not None:
            boxes = self._distort_boxes(boxes, labels.shape)
        masks = segmentation_to_one_hot(labels, ids)
        coords, point_labels, box_prompts, _ = generator(masks, boxes)
        return coords, point_labels, box_prompts, ids

    def __call__(self, x: torch.Tensor, y: torch.Tensor, n_pos: int, n_neg: int, get_boxes: bool = False,
                 n_samples: Optional[int] = None):
        """Sample the prompts for a batch.

        Args:
            x: (B, C, H, W) images.
            y: (B, 1, H, W) instance labels.
            n_pos: Positive points per object.
            n_neg: Negative points per object.
            get_boxes: Also give a box per object.
            n_samples: Objects per image (randomly chosen); None uses all objects.

        Returns:
            The batched inputs (one dict per image with ``image``, ``original_size`` and the prompts
            ``point_coords`` / ``point_labels`` / ``boxes`` in the model input frame) and, per image, the
            sorted ids of the objects the prompts belong to.
        """
        from ..prompt_generators import PointAndBoxPromptGenerator

        get_points = n_pos > 0 or n_neg > 0
        generator = PointAndBoxPromptGenerator(
            n_positive_points=n_pos, n_negative_points=n_neg, dilation_strength=self.dilation_strength,
            get_point_prompts=get_points, get_box_prompts=get_boxes,
        )
        batched_inputs, sampled_ids = [], []
        for image, labels in zip(x, y):
            labels = labels.detach().cpu().numpy().squeeze().astype("int64")
            original_size = tuple(labels.shape[-2:])
            coords, point_labels, boxes, ids = self._prompts_for_image(labels, generator, n_samples)
            record = {"image": image, "original_size": original_size}
            if get_points:
                record["point_coords"] = coords if self.transform is None else \
                    self.transform.apply_coords_torch(coords, original_size)
                record["point_labels"] = point_labels
            if get_boxes:
                record["boxes"] = boxes if self.transform is None else \
                    self.transform.apply_boxes_torch(boxes, original_size)
            batched_inputs.append(record)
            sampled_ids.append(ids)
        return batched_inputs, sampled_ids


class ConvertToSemanticSamInputs:
    """Turn a batch of images into SAM's batched inputs without prompts (for semantic segmentation)."""

    def __call__(self, x, y):
        """Return one dict per image with ``image`` and ``original_size``."""
        return [{"image": image, "original_size": tuple(image.shape[-2:])} for image in x]


#
# Transforms for training on images of different sizes (padding to one shape)
#

def _center_pad_width(shape: Sequence[int], desired: Sequence[int]) -> List[Tuple[int, int]]:
    widths = []
    for have, want in zip(shape, desired):
        if have > want:
            raise ValueError(f"Cannot pad an array of shape {tuple(shape)} to the smaller shape {tuple(desired)}.")
        half = (want - have) / 2
        widths.append((ceil(half), floor(half)))
    return widths


class ResizeRawTrafo:
    """Raw transform that pads images (centred) to ``desired_shape``, optionally making them RGB and 8 bit.

    Args:
        desired_shape: The output shape, including the channel axis for RGB data, e.g. (3, 512, 512).
        do_rescaling: Percentile-normalise and scale to [0, 255].
        valid_channels: Channel axis / axes for the percentile normalisation.
        padding: ``numpy.pad`` mode.
        ensure_rgb: Convert single-channel images to three channels (channels first).
    """

    def __init__(self, desired_shape: Tuple[int, ...], do_rescaling: bool = False,
                 valid_channels: Optional[Union[int, Tuple[int, ...]]] = None, padding: str = "constant",
                 ensure_rgb: bool = True) -> None:
        self.desired_shape = tuple(desired_shape)
        self.do_rescaling = do_rescaling
        self.valid_channels = valid_channels
        self.padding = padding
        self.ensure_rgb = ensure_rgb

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw)
        if self.ensure_rgb:
            if raw.ndim == 2:
                raw = np.stack([raw] * 3)
            elif raw.ndim == 3 and raw.shape[-1] == 3 and raw.shape[0] != 3:
                raw = np.moveaxis(raw, -1, 0)
        if self.do_rescaling:
            from torch_em.transform.raw import normalize, normalize_percentile

            raw = normalize(normalize_percentile(raw, axis=self.valid_channels)) * 255
        return np.pad(raw, _center_pad_width(raw.shape, self.desired_shape), mode=self.padding)


class ResizeLabelTrafo:
    """Label transform that computes the decoder targets and pads them (centred) to ``desired_shape``.

    Returns (4, H, W): instance labels, foreground, centre distance and boundary distance.

    Args:
        desired_shape: The spatial output shape (H, W).
        min_size: Objects smaller than this are removed.
        padding: ``numpy.pad`` mode.
    """

    def __init__(self, desired_shape: Tuple[int, ...], min_size: int = 0, padding: str = "constant") -> None:
        self.desired_shape = tuple(desired_shape)
        self.min_size = min_size
        self.padding = padding

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        from torch_em.transform.label import PerObjectDistanceTransform

        targets = PerObjectDistanceTransform(
            distances=True, boundary_distances=True, directed_distances=False, foreground=True, instances=True,
            min_size=self.min_size,
        )(labels)
        widths = [(0, 0)] + _center_pad_width(targets.shape[1:], self.desired_shape[-2:])
        return np.pad(targets, widths, mode=self.padding)
