"""Model loading, image embeddings and shared helpers: the public facade of micro_sam.

Importing this module is cheap: torch, segment_anything and zarr are imported by the functions that use them.

Conventions used throughout micro_sam:
- images are numpy arrays (Y, X), (Y, X, C), volumes (Z, Y, X);
- points passed to micro_sam functions are (y, x); boxes are [y0, x0, y1, x1];
- image embeddings are dicts with ``features``, ``input_size`` and ``original_size``
  (see :func:`precompute_image_embeddings`).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from . import _registry
from ._embeddings import ImageEmbeddings, handle_pbar
from ._embeddings import precompute_image_embeddings as _precompute
from ._embeddings import set_precomputed as _set_precomputed
from ._image import to_image as _to_image
from ._lazy import lazy_attributes
from ._masks import apply_nms, mask_data_to_segmentation
from ._registry import get_cache_directory
from ._sam_loading import _DEFAULT_MODEL, compute_hash as _compute_hash
from ._sam_loading import export_custom_sam_model, get_device, get_sam_model

__all__ = [
    "ImageEmbeddings", "SamPredictor", "VIT_T_SUPPORT", "apply_nms", "compute_iou", "export_custom_sam_model",
    "get_block_shape", "get_cache_directory", "get_centers_and_bounding_boxes", "get_device", "get_model_names",
    "get_sam_model", "handle_pbar", "load_image_data", "mask_data_to_segmentation", "micro_sam_info",
    "microsam_cachedir", "models", "precompute_image_embeddings", "sam_model_registry", "segmentation_to_one_hot",
    "set_precomputed",
]

VIT_T_SUPPORT = True
"""Whether the ``vit_t`` (MobileSAM / TinyViT) models can be used: always, the architecture is built in
(:mod:`micro_sam.models.tiny_vit`), no extra package is needed."""

# Names that micro_sam 1.8 scripts import from here, resolved on first use so that importing this module stays
# cheap (no torch, torchvision or scikit-image at import time).
__getattr__, __dir__ = lazy_attributes(globals(), {
    "SamPredictor": "segment_anything:SamPredictor",
    "sam_model_registry": "micro_sam.models.build_sam:sam_model_registry",
    "batched_nms": "torchvision.ops.boxes:batched_nms",
    "find_boundaries": "skimage.segmentation:find_boundaries",
    "regionprops": "skimage.measure:regionprops",
    "tqdm": "tqdm:tqdm",
})

# The docstrings of the re-exported functions live here, where users look for them.
get_sam_model.__doc__ = """Get a segment_anything ``SamPredictor`` for a registered model or a checkpoint file.

    Registered models are downloaded once into ``<cache>/models`` (see :func:`get_cache_directory`),
    verified against the registry's xxh128 hash; the bundled demo model needs no download.
    Checkpoints are read as data only (no code from the file is executed). Supported formats: a plain SAM
    state dict, a torch_em trainer checkpoint (``model_state`` with ``sam.``-prefixed keys, optional
    ``decoder_state``) and an exported ``{"model_state", "decoder_state"}`` file. When the weights belong to
    another architecture than ``model_type`` says, the architecture is taken from the weights, with a warning.

    Args:
        model_type: A registered model name (see :func:`get_model_names`), or with ``checkpoint_path`` the
            architecture of the checkpoint ("vit_t", "vit_b", "vit_l", "vit_h", optionally with a suffix).
        device: "cpu", "cuda", "cuda:N" or "mps"; None picks cuda, then mps, then cpu.
        checkpoint_path: A local checkpoint to load instead of the registry file.
        return_sam: Also return the ``Sam`` model.
        return_state: Also return the checkpoint's state dict (with ``decoder_state`` where the model has an
            instance segmentation decoder).
        peft_kwargs: Arguments of :class:`micro_sam.models.peft_sam.PEFT_Sam` (e.g. ``{"rank": 4, "peft_module":
            "lora"}``) for a checkpoint of a PEFT-finetuned model: the model is wrapped before its weights are
            loaded. ``quantize`` is ignored (inference runs unquantised).
        flexible_load_checkpoint: Load only the parameters whose names and shapes match (a ViT's position tables
            are resized to another ``image_size``; the others keep their initial values, with a warning).
        progress_bar_factory: Callable returning a tqdm-like progress bar for the download.
        decoder_path: A local decoder state to return in ``state["decoder_state"]``.
        model_kwargs: ``num_multimask_outputs`` and ``image_size`` of the builders in
            :mod:`micro_sam.models.build_sam` (e.g. for semantic segmentation; other values than the checkpoint's
            need ``flexible_load_checkpoint=True``).

    Returns:
        The predictor, with attributes ``model_type`` (architecture), ``model_name``, ``_hash`` ("xxh128:...")
        and ``checkpoint_path``; plus the model and/or state as requested: ``(predictor, sam, state)``,
        ``(predictor, sam)`` or ``(predictor, state)``.

    Raises:
        ValueError: unknown model name, missing checkpoint file.
        RuntimeError: unavailable device; a checkpoint that is truncated, not a SAM checkpoint, or would run code.
    """


def microsam_cachedir() -> str:
    """The top-level cache directory for models and sample data (same as :func:`get_cache_directory`)."""
    return get_cache_directory()


def models():
    """A pooch registry of all downloadable model files (re-created per call to respect MICROSAM_CACHEDIR)."""
    return _registry.models()


def get_model_names() -> list:
    """The names of all models that :func:`get_sam_model` accepts as ``model_type``."""
    return _registry.get_model_names()


def precompute_image_embeddings(
    predictor,
    input_: np.ndarray,
    save_path: Optional[Union[str, os.PathLike]] = None,
    lazy_loading: bool = False,
    ndim: Optional[int] = None,
    tile_shape: Optional[Tuple[int, int]] = None,
    halo: Optional[Tuple[int, int]] = None,
    verbose: bool = True,
    batch_size: int = 1,
    mask: Optional[np.ndarray] = None,
    pbar_init=None,
    pbar_update=None,
) -> ImageEmbeddings:
    """Compute the image embeddings of a 2D image or a 3D volume, optionally tiled and cached in zarr.

    Each 2D image (each slice, each tile) is normalised to uint8 per channel, resized to 1024 on its longest
    side and run through SAM's image encoder, exactly as ``SamPredictor.set_image`` does.

    Args:
        predictor: The SAM predictor from :func:`get_sam_model`.
        input_: (Y, X), (Y, X, C) image or (Z, Y, X) volume; any dtype; numpy or array-like (zarr, dask).
        save_path: A zarr directory to store the embeddings in (micro_sam 1.8's layout). An existing cache is
            reused; one written for another image, model or tiling is an error; an incomplete one is resumed.
        lazy_loading: For 3D data with ``save_path``: return the zarr array instead of loading it.
        ndim: 2 or 3; None infers it (see ``micro_sam._image.infer_ndim``).
        tile_shape: (y, x) tile size for tiled embeddings of large images; None for no tiling.
        halo: (y, x) overlap added on each side of a tile; must be < tile_shape / 2.
        verbose: Show a progress bar over slices / tiles.
        batch_size: Number of slices or tiles passed through the encoder together.
        mask: Optional mask of the image's shape; tiles without foreground in it are skipped.
        pbar_init: External progress bar callback ``pbar_init(total, description)``.
        pbar_update: External progress bar callback ``pbar_update(n)``.

    Returns:
        ``{"features", "input_size", "original_size"}``. Features are (1, 256, 64, 64) for 2D and
        (Z, 1, 256, 64, 64) for 3D; for tiled data a zarr group of per-tile arrays (sizes in their attributes,
        and ``input_size``/``original_size`` None at the top level).
    """
    return _precompute(predictor, input_, save_path, lazy_loading, ndim, tile_shape, halo, verbose, batch_size,
                       mask, pbar_init, pbar_update)


def set_precomputed(predictor, image_embeddings: ImageEmbeddings, i: Optional[int] = None,
                    tile_id: Optional[int] = None):
    """Set precomputed embeddings on the predictor, so prompts can be run without the encoder.

    Args:
        predictor: The SAM predictor.
        image_embeddings: Output of :func:`precompute_image_embeddings`.
        i: Slice index for 3D embeddings (required for 3D, must be None for 2D).
        tile_id: Tile index for tiled embeddings.

    Returns:
        The predictor.
    """
    return _set_precomputed(predictor, image_embeddings, i=i, tile_id=tile_id)


def compute_iou(mask1: np.ndarray, mask2: np.ndarray) -> float:
    """Intersection over union of two binary masks (pixels equal to 1 / True count as foreground)."""
    mask1, mask2 = np.asarray(mask1) == 1, np.asarray(mask2) == 1
    if mask1.shape != mask2.shape:
        raise ValueError(f"mask1 (shape {mask1.shape}) and mask2 (shape {mask2.shape}) must have the same shape.")
    overlap = np.logical_and(mask1, mask2).sum()
    union = np.logical_or(mask1, mask2).sum()
    return float(overlap) / (float(union) + 1e-7)


def get_centers_and_bounding_boxes(
    segmentation: np.ndarray, mode: str = "v"
) -> Tuple[Dict[int, tuple], Dict[int, tuple]]:
    """Centre point and bounding box of each object of a label image.

    Args:
        segmentation: Label image (0 = background), 2D or 3D.
        mode: "v": the object pixel farthest from the object's boundary (always inside the object);
            "p": the centroid (may lie outside concave objects).

    Returns:
        ``{label: center}`` with centre coordinates in array order ((y, x) for 2D), and
        ``{label: bbox}`` with skimage bounding boxes (y0, x0, y1, x1) (half-open).
    """
    from scipy.ndimage import distance_transform_edt
    from skimage.measure import regionprops
    from skimage.segmentation import find_boundaries

    if mode not in ("p", "v"):
        raise ValueError(f"mode must be 'p' (centroids) or 'v' (farthest from boundary), got {mode!r}.")
    segmentation = np.asarray(segmentation)
    properties = regionprops(segmentation.astype("int64", copy=False))
    if mode == "p":
        centers = {prop.label: prop.centroid for prop in properties}
    else:
        ndim = segmentation.ndim
        padded = np.pad(segmentation, 1)
        distances = distance_transform_edt(~find_boundaries(padded, mode="inner"))
        centers = {}
        for prop in properties:
            region = distances[tuple(slice(b + 1, e + 1) for b, e in zip(prop.bbox[:ndim], prop.bbox[ndim:]))]
            local = np.unravel_index(int(np.argmax(np.where(prop.image, region, -1.0))), region.shape)
            centers[prop.label] = tuple(int(c + o) for c, o in zip(local, prop.bbox[:ndim]))
    boxes = {prop.label: prop.bbox for prop in properties}
    return centers, boxes


def load_image_data(path: str, key: Optional[str] = None, lazy_loading: bool = False) -> np.ndarray:
    """Load image data from a file: tif/png/... via imageio, or a dataset ``key`` in zarr/n5/hdf5.

    Args:
        path: The image file, or the container (zarr / n5 folder, hdf5 file).
        key: The dataset inside a container; None for image files.
        lazy_loading: Return the zarr array of a zarr container instead of reading it.

    Returns:
        The image data.

    Raises:
        ValueError: if the path does not exist or cannot be read, or the container has no dataset ``key``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"The image path {path!r} does not exist.")
    if key is None:
        import imageio.v3 as imageio

        try:
            return imageio.imread(path)
        except Exception as error:  # noqa: BLE001
            if "backend" in str(error) or os.path.isdir(path):  # imageio found no reader for this file
                reason = "it is not an image file that imageio can read (tif, png, jpg, ...)"
            else:
                reason = " ".join(str(error).split()) or type(error).__name__
            raise ValueError(f"Could not read the image {path!r}: {reason}. Containers (zarr, n5, hdf5) need "
                             "the dataset name as key.") from None
    if str(path).endswith((".h5", ".hdf5", ".hdf")):
        import h5py

        with h5py.File(path, "r") as f:
            if key not in f:
                raise ValueError(f"{path!r} has no dataset {key!r}.")
            return f[key][()]
    import zarr

    try:
        data = zarr.open(path, mode="r")[key]
    except (KeyError, FileNotFoundError):
        raise ValueError(f"{path!r} has no dataset {key!r}.") from None
    return data if lazy_loading else data[...]


def segmentation_to_one_hot(segmentation: np.ndarray, segmentation_ids: Optional[np.ndarray] = None):
    """One binary mask per object, as a float tensor of shape (N, 1, H, W).

    Args:
        segmentation: Label image (H, W), 0 = background, ids 1..N when ``segmentation_ids`` is None.
        segmentation_ids: Optional subset of ids (no 0); masks are returned in sorted id order.

    Returns:
        torch.Tensor (N, 1, H, W) with values 0 and 1.
    """
    import torch

    segmentation = np.asarray(segmentation)
    if segmentation_ids is None:
        ids = np.arange(1, int(segmentation.max()) + 1)
    else:
        ids = np.sort(np.asarray(segmentation_ids))
        if len(ids) == 0 or 0 in ids:
            raise RuntimeError("segmentation_ids must be a non-empty list of object ids without 0.")
    masks = segmentation[None] == ids.reshape((-1,) + (1,) * segmentation.ndim)
    return torch.from_numpy(masks.astype("float32")).unsqueeze(1)


def micro_sam_info() -> None:
    """Print the micro_sam version, system, devices, package versions, cache directory and available models.

    The models are grouped by family (bundled, original SAM, light / electron microscopy, ...) and marked
    when they have an instance segmentation decoder or are already downloaded. The same report is printed by
    the ``micro_sam.info`` command, which can also download models (``micro_sam.info --download models NAME``).
    """
    from ._info import print_info

    print_info()


def get_block_shape(shape: Tuple[int]) -> Tuple[int]:
    """A chunk / block shape for an image (1024, 1024) or a volume (32, 256, 256), clipped to the shape."""
    if len(shape) == 2:
        return tuple(min(b, s) for b, s in zip((1024, 1024), shape))
    if len(shape) == 3:
        return tuple(min(b, s) for b, s in zip((32, 256, 256), shape))
    raise ValueError(f"Only 2 or 3 dimensional shapes are supported, got {len(shape)}D.")


mask_data_to_segmentation.__doc__ = """Paint a list of mask records into an instance label image.

    Records are painted from the largest to the smallest; with ``merge_exclusively`` a record only claims
    pixels no larger record holds. Records with ``global_bbox`` (tiled predictions) are pasted at that position.

    Args:
        masks: Mask records (``segmentation``, ``area``, ``bbox`` XYWH, optional ``global_bbox``, ``seg_id``).
        shape: Output shape; required for tiled records or an empty list.
        min_object_size: Objects smaller than this (in pixels) are removed.
        max_object_size: Records larger than this are skipped.
        label_masks: Split each object into its connected components.
        with_background: Remove the largest object (often the background for AMG).
        merge_exclusively: Do not let a record overwrite pixels of an earlier (larger) one.

    Returns:
        uint32 label image with consecutive ids, 0 = background.
    """

apply_nms.__doc__ = """Non-maximum suppression over SAM mask records, then paint the survivors into a label image.

    Args:
        predictions: Mask records with ``segmentation``, ``bbox`` (XYWH), ``predicted_iou``,
            ``stability_score`` and, for tiled predictions, ``global_bbox``.
        min_size: Records of at most this many pixels are dropped (when > 0).
        shape: Output shape; inferred from the masks (or the global boxes when tiled) when None.
        perform_box_nms: Suppress by box IoU instead of mask IoU.
        nms_thresh: Overlap above which the lower scoring record (score = predicted_iou * stability) is dropped.
        max_size: Records of at least this many pixels are dropped.
        intersection_over_min: Measure overlap as intersection over the smaller mask instead of IoU.

    Returns:
        uint32 label image.
    """


# Parameter-efficient finetuning (QLoRA export); see micro_sam.models.peft_sam.
from ._sam_loading import export_custom_qlora_model  # noqa: E402

__all__ += ["export_custom_qlora_model"]

export_custom_qlora_model.__doc__ = """Turn a QLoRA-finetuned checkpoint into a LoRA model file for ``get_sam_model``.

    QLoRA (``peft_kwargs={"rank": ..., "quantize": True}``, bitsandbytes on a CUDA GPU) stores the frozen image
    encoder's linear layers in bitsandbytes' packed 4-bit format. The exported file holds the base model's weights
    for them (they were frozen), the LoRA matrices and all other trained parameters of the finetuned checkpoint,
    and its ``decoder_state``; load it with ``get_sam_model(..., peft_kwargs={"rank": ...})``. Reading the
    checkpoint needs neither bitsandbytes nor a GPU.

    Args:
        checkpoint_path: The base model the finetuning started from (None: the registered ``model_type``).
        finetuned_path: The QLoRA trainer checkpoint (``checkpoints/<name>/best.pt``).
        model_type: The architecture / registered name of the base model.
        save_path: Where to write the LoRA model file (written atomically).

    Raises:
        ValueError: ``finetuned_path`` holds no LoRA parameters.
    """
