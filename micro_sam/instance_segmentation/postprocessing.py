"""Pure numpy / scipy post-processing for automatic instance segmentation.

- Decoder-based segmentation (AIS): seeded watershed from the predicted foreground, centre distance and
  boundary distance maps (:func:`watershed_from_center_and_boundary_distances`).
- Mask filtering helpers shared by the mask generators: size filters, relabelling, removal of small holes and
  islands in binary masks, conversion of label images to per-object records.

All functions take numpy arrays, return new arrays and never modify their inputs. Label images are
(Y, X) or (Z, Y, X) integer arrays with 0 as background.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
from scipy import ndimage

__all__ = [
    "gaussian_smoothing", "label_components", "relabel_sequential", "size_filter", "remove_small_regions",
    "watershed_from_center_and_boundary_distances", "segmentation_to_masks",
]


def gaussian_smoothing(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing with the kernel size and border treatment of vigra / bioimage_cpp.

    The kernel is cut at three standard deviations and the border is mirrored without repeating the edge
    pixel, which reproduces ``gaussianSmoothing`` as used by micro_sam up to float32 rounding.

    Args:
        image: 2D or 3D array.
        sigma: Standard deviation in pixels; values <= 0 return a float32 copy.

    Returns:
        The smoothed image as float32.
    """
    image = np.asarray(image, dtype="float32")
    if sigma <= 0:
        return image.copy()
    return ndimage.gaussian_filter(image, sigma, mode="mirror", truncate=3.0, output=np.float32)


def label_components(mask: np.ndarray, connectivity: int = None) -> Tuple[np.ndarray, int]:
    """Connected components of a binary mask, numbered 1..N in raster order of their first pixel.

    Args:
        mask: Binary 2D or 3D mask.
        connectivity: 1 for direct neighbours only, ``mask.ndim`` (default) for full (diagonal) connectivity.

    Returns:
        The label image (uint32) and the number of components.
    """
    mask = np.asarray(mask, dtype=bool)
    connectivity = mask.ndim if connectivity is None else connectivity
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    labels, n = ndimage.label(mask, structure=structure, output=np.uint32)
    return labels, int(n)


def _dense_ids(segmentation: np.ndarray) -> bool:
    """Whether the ids are small enough for lookup tables (bincount) instead of sorting."""
    return segmentation.size > 0 and np.issubdtype(segmentation.dtype, np.integer) and \
        segmentation.min() >= 0 and int(segmentation.max()) <= 4 * segmentation.size + 1024


def relabel_sequential(segmentation: np.ndarray) -> np.ndarray:
    """Map the ids of a label image to 1..N, keeping their order; 0 stays 0. Returns uint32."""
    segmentation = np.asarray(segmentation)
    if _dense_ids(segmentation):
        present = np.bincount(segmentation.ravel()) > 0
        present[0] = False
        lut = np.zeros(len(present), dtype="uint32")
        lut[present] = np.arange(1, int(present.sum()) + 1, dtype="uint32")
        return lut[segmentation]
    ids, inverse = np.unique(segmentation, return_inverse=True)
    new_ids = np.arange(len(ids), dtype="uint32") + (0 if ids[0] == 0 else 1)
    return new_ids[inverse.reshape(segmentation.shape)]


def size_filter(segmentation: np.ndarray, min_size: int) -> np.ndarray:
    """Remove objects with fewer than ``min_size`` pixels and relabel the rest to 1..N (keeping their order).
    ``min_size <= 0`` returns the segmentation unchanged (as a copy)."""
    segmentation = np.asarray(segmentation)
    if min_size <= 0:
        return segmentation.copy()
    if _dense_ids(segmentation):
        sizes = np.bincount(segmentation.ravel())
        keep = sizes >= min_size
        keep[0] = False
        lut = np.zeros(len(sizes), dtype="uint32")
        lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype="uint32")
        return lut[segmentation]
    ids, sizes = np.unique(segmentation, return_counts=True)
    small = ids[(sizes < min_size) & (ids != 0)]
    segmentation = segmentation.copy()
    if len(small):
        segmentation[np.isin(segmentation, small)] = 0
    return relabel_sequential(segmentation)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Fill small holes in, or remove small islands from, a binary mask (segment_anything's AMG rule).

    Components are 8-connected. ``mode="holes"``: components of the background smaller than ``area_thresh``
    are filled. ``mode="islands"``: components of the mask smaller than ``area_thresh`` are removed; if that
    would remove all of them, the largest is kept.

    Args:
        mask: 2D binary mask.
        area_thresh: Components with fewer pixels than this are small.
        mode: "holes" or "islands".

    Returns:
        The new mask and whether it changed.
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}.")
    mask = np.asarray(mask, dtype=bool)
    fill_holes = mode == "holes"
    working = ~mask if fill_holes else mask
    regions, n = label_components(working, connectivity=2)
    if n == 0:
        return mask, False
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
    small = sizes < area_thresh
    if not small.any():
        return mask, False
    if fill_holes:
        keep_label = np.concatenate([[True], small])  # the mask itself (label 0 of `working`) and small holes
    else:
        keep_label = np.concatenate([[False], ~small])
        if not keep_label.any():
            keep_label[int(np.argmax(sizes)) + 1] = True
    return keep_label[regions], True


def watershed_from_center_and_boundary_distances(
    center_distances: np.ndarray,
    boundary_distances: np.ndarray,
    foreground_map: np.ndarray,
    center_distance_threshold: float = 0.5,
    boundary_distance_threshold: float = 0.5,
    foreground_threshold: float = 0.5,
    distance_smoothing: float = 1.6,
    min_size: int = 0,
) -> np.ndarray:
    """Instance segmentation from the three maps predicted by the AIS decoder.

    Seeds are the connected components (full connectivity) of the pixels where the smoothed centre distance
    and the smoothed boundary distance are both below their thresholds, inside the foreground
    (``foreground_map > foreground_threshold``). The seeds are grown by a watershed on the smoothed boundary
    distances (direct-neighbour connectivity), restricted to the foreground. Both distance maps are per-object
    normalised distances: 0 at the object centre, 1 at the farthest point / the boundary.

    Args:
        center_distances: (Y, X) or (Z, Y, X) distance to the object centres, in [0, 1].
        boundary_distances: Same shape, inverted distance to the object boundaries, in [0, 1].
        foreground_map: Same shape, foreground probability.
        center_distance_threshold: Seeds need a centre distance below this value.
        boundary_distance_threshold: Seeds need a boundary distance below this value.
        foreground_threshold: Foreground pixels have a probability above this value.
        distance_smoothing: Sigma of the Gaussian applied to both distance maps (0 for none).
        min_size: Objects with fewer pixels are removed (and the rest relabelled).

    Returns:
        The label image (uint32), objects numbered 1..N.
    """
    from skimage.segmentation import watershed

    shape = np.shape(foreground_map)
    if np.shape(center_distances) != shape or np.shape(boundary_distances) != shape:
        raise ValueError(
            "center_distances, boundary_distances and foreground_map must have the same shape, got "
            f"{np.shape(center_distances)}, {np.shape(boundary_distances)} and {shape}."
        )
    center_distances = gaussian_smoothing(center_distances, distance_smoothing)
    boundary_distances = gaussian_smoothing(boundary_distances, distance_smoothing)
    foreground = np.asarray(foreground_map) > foreground_threshold
    seed_mask = (center_distances < center_distance_threshold) & (boundary_distances < boundary_distance_threshold)
    seed_mask &= foreground
    seeds, n_seeds = label_components(seed_mask)
    if n_seeds == 0:
        return np.zeros(shape, dtype="uint32")
    segmentation = watershed(boundary_distances, markers=seeds, mask=foreground).astype("uint32")
    return size_filter(segmentation, min_size)


def _bbox_xywh(bbox: Tuple[int, ...]) -> List[int]:
    # skimage's (min_0, ..., max_0, ...) -> (x, y[, z]) of the start, then the extents (w, h[, d]).
    ndim = len(bbox) // 2
    begin, end = bbox[:ndim], bbox[ndim:]
    return [int(b) for b in begin[::-1]] + [int(e - b) for b, e in zip(begin[::-1], end[::-1])]


def segmentation_to_masks(segmentation: np.ndarray) -> List[Dict[str, Any]]:
    """Per-object records of a label image (the ``binary_mask`` output mode of the decoder-based segmenters).

    Args:
        segmentation: (Y, X) or (Z, Y, X) label image.

    Returns:
        One dict per object, in increasing id order, with ``segmentation`` (bool mask of the full image),
        ``area`` (pixels), ``bbox`` (XYWH as segment_anything: [x0, y0, w, h], for 3D [x0, y0, z0, w, h, d];
        the published micro_sam writes [x0, w, y0, h] here, inconsistently with its AMG records),
        ``crop_box`` (the full image, same convention) and ``seg_id``.
    """
    from skimage.measure import regionprops

    segmentation = np.asarray(segmentation)
    if segmentation.ndim not in (2, 3):
        raise ValueError(f"Expect a 2D or 3D label image, got shape {segmentation.shape}.")
    full = tuple(0 for _ in segmentation.shape) + tuple(segmentation.shape)
    crop_box = _bbox_xywh(full)
    records = []
    for prop in regionprops(segmentation.astype("int64", copy=False)):
        records.append({
            "segmentation": segmentation == prop.label,
            "area": int(prop.area),
            "bbox": _bbox_xywh(prop.bbox),
            "crop_box": crop_box,
            "seg_id": int(prop.label),
        })
    return records
