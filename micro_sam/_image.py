"""Input validation and normalisation of images for SAM: one place, used everywhere."""
from __future__ import annotations

import hashlib
import warnings
from typing import Optional

import numpy as np


def validate_array(input_, name: str = "input_") -> None:
    """Reject inputs that are not arrays, are empty, or hold NaN/inf values."""
    if not hasattr(input_, "shape") or not hasattr(input_, "dtype"):
        raise ValueError(f"{name} must be an array (numpy, zarr, ...), got {type(input_).__name__}.")
    if 0 in input_.shape or len(input_.shape) == 0:
        raise ValueError(f"{name} is empty (shape {tuple(input_.shape)}); expect a 2D image or a 3D volume.")
    if np.dtype(input_.dtype).kind == "f" and isinstance(input_, np.ndarray) and not np.isfinite(input_).all():
        raise ValueError(f"{name} contains NaN or infinite values; replace them before computing embeddings.")


def infer_ndim(input_, ndim: Optional[int]) -> int:
    """The spatial dimensionality of the input (2 for images, 3 for volumes / time series).

    With ``ndim=None`` a 2D array is an image, a 3D array whose last axis has at most 4 entries is a 2D
    image with channels (e.g. RGB), any other 3D array is a volume and a 4D array a volume with channels.
    """
    shape = tuple(input_.shape)
    if ndim is None:
        if len(shape) == 2:
            return 2
        if len(shape) == 3:
            return 2 if shape[-1] <= 4 and shape[0] > 4 else 3
        if len(shape) == 4:
            return 3
        raise ValueError(
            f"Invalid input of shape {shape}: expect a 2D image (Y, X[, C]) or a 3D volume (Z, Y, X[, C])."
        )
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}.")
    if ndim == 2 and len(shape) not in (2, 3):
        raise ValueError(f"ndim=2 expects an input of shape (Y, X) or (Y, X, C), got shape {shape}.")
    if ndim == 2 and len(shape) == 3 and shape[-1] > 16:
        raise ValueError(
            f"ndim=2 was given for an input of shape {shape}, which looks like a 3D volume; pass ndim=3 or None."
        )
    if ndim == 3 and len(shape) not in (3, 4):
        raise ValueError(f"ndim=3 expects an input of shape (Z, Y, X) or (Z, Y, X, C), got shape {shape}.")
    return ndim


def to_image(image) -> np.ndarray:
    """Bring a 2D image to the uint8 (H, W, 3) format SAM expects.

    Grayscale images are repeated to three channels, two-channel images get a third channel of zeros and
    images with more than three channels keep the first three (with a warning). Each channel is then scaled to
    0..255 by its own minimum and maximum, also for uint8 input, exactly as micro_sam does, so that
    embeddings agree with embeddings computed by micro_sam.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    elif image.ndim == 3:
        n_channels = image.shape[-1]
        if n_channels == 1:
            image = np.repeat(image, 3, axis=-1)
        elif n_channels == 2:
            image = np.concatenate([image, np.zeros_like(image[..., :1])], axis=-1)
        elif n_channels > 3:
            warnings.warn(f"The image has {n_channels} channels (RGBA?); only the first three are used.", stacklevel=2)
            image = image[..., :3]
    else:
        raise ValueError(f"Expect a 2D image of shape (Y, X) or (Y, X, C), got shape {image.shape}.")
    out = image.astype("float32")
    out -= out.min(axis=(0, 1), keepdims=True)
    out /= out.max(axis=(0, 1), keepdims=True) + 1e-7
    return (out * 255).astype("uint8")


def data_signature(input_) -> str:
    """The sha1 of the raw input bytes, stored in embedding caches to recognise the image (as micro_sam)."""
    return hashlib.sha1(np.asarray(input_).tobytes()).hexdigest()
