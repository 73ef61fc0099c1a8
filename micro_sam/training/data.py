"""Datasets and loaders for training SAM, built on torch_em; checks that the data suits the training.

Supported inputs (as in torch_em): image files (tif, png, ...) given as a list of paths or as a folder with a glob
pattern as key, container files (hdf5, zarr, n5) with the dataset name as key, and lists of numpy arrays / torch
tensors. Images are 2D, optionally RGB; volumes are sampled as 2D patches.

Samples are ``(x, y)``: x (C, H, W) images with values in [0, 255], y (1, H, W) instance labels, or with the
segmentation decoder y (4, H, W): instance labels, foreground, distance to the object centre and distance to
the object boundary (both normalised to [0, 1] per object), from ``torch_em``'s ``PerObjectDistanceTransform``.
"""
from __future__ import annotations

import os
from glob import glob
from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .util import require_8bit

__all__ = ["default_sam_dataset", "default_sam_loader", "check_instance_labels", "check_raw_range"]

FilePath = Union[str, os.PathLike]

# Size of the crops of label / raw data that are checked before a dataset is built.
_CHECK_CROP = 1024
_CHECK_N_ITEMS = 3


#
# Checks of the data
#

def check_instance_labels(labels: np.ndarray, name: str = "labels") -> None:
    """Check that an array holds instance labels: non-negative integer ids, not a binary / semantic mask.

    A mask where every id consists of three or more separate connected pieces (e.g. a binary mask of many
    nuclei) is taken as a semantic mask.

    Args:
        labels: The label image or volume.
        name: How the data is called in error messages.

    Raises:
        ValueError: With the reason and how to fix it.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.astype("uint8")
    if not np.issubdtype(labels.dtype, np.number):
        raise ValueError(f"The {name} must be numeric instance labels, got dtype {labels.dtype}.")
    if np.issubdtype(labels.dtype, np.floating):
        if not np.all(np.isfinite(labels)):
            raise ValueError(f"The {name} contain NaN or infinite values; instance labels must be integer ids.")
        fractional = labels[labels != np.round(labels)]
        if fractional.size:
            raise ValueError(
                f"The {name} are not instance labels: they hold non-integer values (e.g. {float(fractional[0])!r}). "
                "Instance labels give every object its own integer id (0 = background)."
            )
    if labels.size and labels.min() < 0:
        raise ValueError(f"The {name} hold negative values (minimum {labels.min()}); instance ids must be >= 0.")
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if len(ids) == 0 or len(ids) > 3:
        return
    pieces = [ndimage.label(labels == i)[1] for i in ids]
    if all(n >= 3 for n in pieces):
        raise ValueError(
            f"The {name} look like a binary or semantic mask, not instance labels: the values "
            f"{ids.tolist()} each mark several separate objects ({pieces} pieces). Give every object its own id, "
            "e.g. with skimage.measure.label(mask) for a mask of non-touching objects."
        )


def check_raw_range(raw: np.ndarray, raw_transform: Optional[Callable], name: str = "images") -> None:
    """Check that the images end up in SAM's input range [0, 255] after the raw transform.

    Raises:
        ValueError: The transformed data has values outside [0, 255].
    """
    raw = np.asarray(raw)
    transformed = np.asarray((raw_transform or require_8bit)(raw.astype("float32")))
    low, high = float(transformed.min()), float(transformed.max())
    if low < 0 or high > 255:
        hint = ("pass raw_transform=micro_sam.training.util.get_raw_transform('normalize_percentile') (or "
                "'normalize_minmax') to scale the data to [0, 255]") if raw_transform is None else \
            "the given raw_transform must produce values in [0, 255]"
        raise ValueError(
            f"The {name} have values in [{low:g}, {high:g}] after the raw transform, outside SAM's input range "
            f"[0, 255]: {hint}."
        )


def _central_crop(data) -> np.ndarray:
    """A central crop: at most _CHECK_CROP pixels in y and x, the middle plane of further leading axes.

    A trailing axis of size 3 or 4 after two larger ones is taken as RGB(A) channels and kept.
    """
    shape = tuple(data.shape)
    channels_last = len(shape) == 3 and shape[-1] in (3, 4) and min(shape[:2]) > 4
    spatial = shape[:-1] if channels_last else shape
    index = []
    for axis, size in enumerate(spatial):
        if axis >= len(spatial) - 2:
            start = max(0, (size - _CHECK_CROP) // 2)
            index.append(slice(start, start + _CHECK_CROP))
        else:
            index.append(slice(size // 2, size // 2 + 1))
    if channels_last:
        index.append(slice(None))
    return np.asarray(data[tuple(index)])


def _items(paths, key) -> List[Any]:
    """Up to _CHECK_N_ITEMS arrays (or array-likes) from the given data specification."""
    from torch_em.util import load_data

    if isinstance(paths, (np.ndarray, torch.Tensor)):
        paths = [paths]
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    items = []
    for path in list(paths)[:_CHECK_N_ITEMS]:
        if isinstance(path, torch.Tensor):
            items.append(path.detach().cpu().numpy())
        elif isinstance(path, np.ndarray):
            items.append(path)
        elif key is not None and "*" in key:
            files = sorted(glob(os.path.join(os.fspath(path), key)))
            items.extend(load_data(f) for f in files[:_CHECK_N_ITEMS])
        else:
            items.append(load_data(os.fspath(path), key))
    return items[:_CHECK_N_ITEMS]


def _check_data(raw_paths, raw_key, label_paths, label_key, raw_transform, with_channels) -> None:
    for i, labels in enumerate(_items(label_paths, label_key)):
        crop = _central_crop(labels)
        check_instance_labels(crop, name=f"labels (item {i})")
    if raw_transform is not None:
        # A custom transform may need whole images (e.g. padding to a shape); train_sam checks its output.
        return
    for i, raw in enumerate(_items(raw_paths, raw_key)):
        check_raw_range(_central_crop(raw), None, name=f"images (item {i})")


#
# Dataset construction
#

def _first_raw(raw_paths, raw_key):
    from torch_em.util import load_data

    first = raw_paths if isinstance(raw_paths, (str, os.PathLike)) else raw_paths[0]
    if isinstance(first, (np.ndarray, torch.Tensor)):
        return first
    if raw_key is not None and "*" in raw_key:
        files = sorted(glob(os.path.join(os.fspath(first), raw_key)))
        if not files:
            raise ValueError(f"No images match {os.path.join(os.fspath(first), raw_key)!r}.")
        return load_data(files[0])
    return load_data(os.fspath(first), raw_key)


def _dataset_kind(raw_paths, raw_key, label_paths, with_channels, is_seg_dataset):
    """(is_seg_dataset, with_channels, raw_paths, label_paths) as torch_em needs them."""
    if isinstance(raw_paths, (list, tuple)) and len(raw_paths) and isinstance(raw_paths[0], (np.ndarray,
                                                                                            torch.Tensor)):
        if with_channels is None:
            first = raw_paths[0]
            with_channels = first.ndim == 3 and first.shape[-1] == 3
        return False, with_channels, list(raw_paths), list(label_paths)

    first = _first_raw(raw_paths, raw_key)
    if first.ndim == 3 and first.shape[-1] == 3:
        # RGB with channels last: torch_em's image collection dataset handles it.
        is_seg_dataset = False
        raw_paths = [raw_paths] if isinstance(raw_paths, (str, os.PathLike)) else raw_paths
        label_paths = [label_paths] if isinstance(label_paths, (str, os.PathLike)) else label_paths
        with_channels = False if with_channels is None else with_channels
    elif first.ndim == 3 and first.shape[0] == 3 and with_channels is None:
        with_channels = True
    return is_seg_dataset, bool(with_channels), raw_paths, label_paths


def _data_ndim(raw_paths, raw_key) -> int:
    """Dimensionality of the (first) raw data as torch_em reads it (a glob key reads the files as a stack)."""
    from torch_em.util import load_data

    first = raw_paths if isinstance(raw_paths, (str, os.PathLike)) else raw_paths[0]
    if isinstance(first, (np.ndarray, torch.Tensor)):
        return first.ndim
    return load_data(os.fspath(first), raw_key).ndim


def _patch_shape_for(patch_shape, raw_paths, raw_key, with_channels, is_seg_dataset) -> Tuple[int, ...]:
    patch_shape = tuple(int(p) for p in patch_shape)
    if is_seg_dataset is False:  # image collections are always sampled in 2D
        return patch_shape
    ndim = _data_ndim(raw_paths, raw_key)
    if ndim == 2 and len(patch_shape) != 2:
        raise ValueError(f"The images are 2D, but patch_shape {patch_shape} is not.")
    if len(patch_shape) == 2 and ((ndim == 3 and not with_channels) or (ndim == 4 and with_channels)):
        return (1,) + patch_shape
    return patch_shape


def default_sam_dataset(
    raw_paths: Union[List[Union[np.ndarray, torch.Tensor]], List[FilePath], FilePath],
    raw_key: Optional[str],
    label_paths: Union[List[Union[np.ndarray, torch.Tensor]], List[FilePath], FilePath],
    label_key: Optional[str],
    patch_shape: Tuple[int, ...],
    with_segmentation_decoder: bool,
    with_channels: Optional[bool] = None,
    train_instance_segmentation_only: bool = False,
    sampler: Optional[Callable] = None,
    raw_transform: Optional[Callable] = None,
    n_samples: Optional[int] = None,
    is_train: bool = True,
    min_size: int = 25,
    max_sampling_attempts: Optional[int] = None,
    rois: Optional[Union[slice, Tuple[slice, ...]]] = None,
    is_multi_tensor: bool = True,
    **kwargs,
) -> Dataset:
    """A dataset of training patches for SAM.

    Before the dataset is built, a few items of the data are checked: labels must be instance labels (integer
    ids, not a binary / semantic mask or float maps) and images must be in [0, 255] after ``raw_transform``.

    Args:
        raw_paths: Image file(s), a folder (with ``raw_key`` a glob pattern), container file(s), or a list of
            numpy arrays / torch tensors.
        raw_key: Dataset name in container files, glob pattern in a folder, or None for image files / arrays.
        label_paths: The instance labels, in the same form as ``raw_paths``.
        label_key: As ``raw_key`` for the labels.
        patch_shape: (H, W) of the training patches (2D patches are also cut from volumes).
        with_segmentation_decoder: Also return the targets of the UNETR decoder (y has 4 channels).
        with_channels: Whether the images have a channel axis; None decides from the data (RGB).
        train_instance_segmentation_only: For :func:`micro_sam.training.train_instance_segmentation`: y holds only
            the 3 decoder targets; needs ``with_segmentation_decoder``.
        sampler: Rejects patches; default: patches need at least one object of ``min_size`` pixels (none when
            training only the decoder).
        raw_transform: Transform of the images; default :func:`micro_sam.training.util.require_8bit`.
        n_samples: Patches per epoch; default the number of images (at least 100 for training, 5 otherwise).
        is_train: Whether the dataset is for training (only affects the default ``n_samples``).
        min_size: Objects smaller than this (in pixels) are removed from the labels.
        max_sampling_attempts: How often a patch may be re-drawn when the sampler rejects it.
        rois: Regions of interest in the data.
        is_multi_tensor: Whether a custom ``label_transform`` (in kwargs) is applied to several tensors.
        kwargs: Further arguments of ``torch_em.default_segmentation_dataset`` (e.g. ``transform``,
            ``label_transform`` (applied before the default one)).

    Returns:
        The torch_em dataset.

    Raises:
        ValueError: For invalid settings or data (see above).
    """
    import torch_em
    from torch_em.transform.label import MinSizeLabelTransform, PerObjectDistanceTransform

    if train_instance_segmentation_only and not with_segmentation_decoder:
        raise ValueError("train_instance_segmentation_only=True needs with_segmentation_decoder=True.")
    if len(tuple(patch_shape)) not in (2, 3) or any(int(p) < 1 for p in patch_shape):
        raise ValueError(f"patch_shape must be 2 or 3 positive sizes, got {patch_shape!r}.")

    is_seg_dataset, with_channels, raw_paths, label_paths = _dataset_kind(
        raw_paths, raw_key, label_paths, with_channels, kwargs.pop("is_seg_dataset", None)
    )
    _check_data(raw_paths, raw_key, label_paths, label_key, raw_transform, with_channels)

    if sampler is None and not train_instance_segmentation_only:
        sampler = torch_em.data.sampler.MinInstanceSampler(2, min_size=min_size)
    if raw_transform is None:
        raw_transform = require_8bit

    if with_segmentation_decoder:
        default_label_transform = PerObjectDistanceTransform(
            distances=True, boundary_distances=True, directed_distances=False, foreground=True,
            instances=not train_instance_segmentation_only, min_size=min_size,
        )
    else:
        default_label_transform = MinSizeLabelTransform(min_size=min_size)
    custom_label_transform = kwargs.pop("label_transform", None)
    if custom_label_transform is None:
        label_transform = default_label_transform
    else:
        label_transform = torch_em.transform.generic.Compose(
            custom_label_transform, default_label_transform, is_multi_tensor=is_multi_tensor
        )

    patch_shape = _patch_shape_for(patch_shape, raw_paths, raw_key, with_channels, is_seg_dataset)
    common = dict(raw_paths=raw_paths, raw_key=raw_key, label_paths=label_paths, label_key=label_key,
                  patch_shape=patch_shape, raw_transform=raw_transform, with_channels=with_channels, ndim=2,
                  is_seg_dataset=is_seg_dataset, rois=rois)
    if n_samples is None:
        natural = torch_em.default_segmentation_dataset(**common, **kwargs)
        n_samples = max(len(natural), 100 if is_train else 5)
    dataset = torch_em.default_segmentation_dataset(
        **common, label_transform=label_transform, sampler=sampler, n_samples=n_samples, **kwargs,
    )
    if max_sampling_attempts is not None:
        children = dataset.datasets if hasattr(dataset, "datasets") else [dataset]
        for child in children:
            child.max_sampling_attempts = max_sampling_attempts
    return dataset


def _split_kwargs(function, kwargs):
    import inspect

    names = set(inspect.signature(function).parameters)
    return {k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names}


def default_sam_loader(**kwargs) -> DataLoader:
    """A data loader over :func:`default_sam_dataset`.

    Args:
        kwargs: Arguments of :func:`default_sam_dataset` (and of ``torch_em.default_segmentation_dataset``), the rest
            go to ``torch.utils.data.DataLoader`` (``batch_size``, ``shuffle``, ``num_workers``, ...). Without
            ``batch_size`` the batch size is 1, and :func:`micro_sam.training.train_sam_for_configuration` may
            change it to the batch size of the hardware configuration.

    Returns:
        The loader. It remembers its DataLoader arguments (``loader.micro_sam_loader_kwargs``) and whether the batch
        size was chosen by the caller (``loader.micro_sam_batch_size_given``).
    """
    import torch_em

    sam_kwargs, rest = _split_kwargs(default_sam_dataset, kwargs)
    extra_dataset_kwargs, loader_kwargs = _split_kwargs(torch_em.default_segmentation_dataset, rest)
    dataset = default_sam_dataset(**sam_kwargs, **extra_dataset_kwargs)
    batch_size_given = "batch_size" in loader_kwargs
    batch_size = loader_kwargs.pop("batch_size", 1)
    loader_kwargs.setdefault("pin_memory", torch.cuda.is_available())
    loader = torch_em.segmentation.get_data_loader(dataset, batch_size=batch_size, **loader_kwargs)
    loader.micro_sam_loader_kwargs = dict(loader_kwargs)
    loader.micro_sam_batch_size_given = batch_size_given
    return loader


def with_batch_size(loader: DataLoader, batch_size: int) -> DataLoader:
    """A loader like one from :func:`default_sam_loader`, over the same dataset, with another batch size."""
    import torch_em

    kwargs = dict(getattr(loader, "micro_sam_loader_kwargs", {}))
    new = torch_em.segmentation.get_data_loader(loader.dataset, batch_size=batch_size, **kwargs)
    new.micro_sam_loader_kwargs = kwargs
    new.micro_sam_batch_size_given = True
    return new


def iterate_batches(loader: DataLoader, n_batches: Optional[int]) -> Iterator:
    """Up to n_batches batches of the loader (all with None)."""
    for i, batch in enumerate(loader):
        if n_batches is not None and i >= n_batches:
            return
        yield batch
