"""Batched prompt-based segmentation: many prompts for one image, run through SAM's decoder in batches.

Unlike :mod:`micro_sam.prompt_based_segmentation`, prompts here follow SAM's own conventions (as in
micro_sam): boxes are XYXY ``[min_x, min_y, max_x, max_y]`` with shape (N, 4), points are (x, y) with shape
(N, P, 2) (P points per prompt), point labels (N, P) with 1 = foreground, 0 = background and -1 = padding.

Each batch of prompts is one call of ``predictor.predict_torch`` (computed by
:func:`micro_sam.models.fast_mask_decoder.predict_torch`); thresholding, stability scores and
bounding boxes are computed for the whole batch at once.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from . import _tiling
from . import util
from ._masks import relabel_consecutive
from .models.fast_mask_decoder import predict_torch
from ._lazy import lazy_attributes
from ._mask_tensors import batched_mask_to_box

__all__ = ["batched_inference", "batched_tiled_inference"]


# Names micro_sam 1.8 exposes here (imported there from other modules), resolved on first use.
__getattr__, __dir__ = lazy_attributes(globals(), {
    "ResizeLongestSide": "segment_anything.utils.transforms:ResizeLongestSide",
    "SamPredictor": "segment_anything:SamPredictor",
    "tqdm": "tqdm:tqdm",
})


# --- validation ------------------------------------------------------------------------------------------
def _as_array(value, name: str, dtype="float64") -> np.ndarray:
    if torch.is_tensor(value):
        value = value.detach().cpu().numpy()
    array = np.asarray(value, dtype=dtype)
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain NaN or infinite values.")
    return array


def _validate_inputs(batch_size, boxes, points, point_labels, multimasking, reduce_multimasking,
                     segmentation_ids, logits_masks, mask_threshold):
    """Check the prompts; return (n_prompts, boxes, points, point_labels, logits_masks) as arrays / tensors."""
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if (points is None) != (point_labels is None):
        raise ValueError("points and point_labels must be passed together (or neither).")
    if points is None and boxes is None:
        raise ValueError("Pass box prompts (boxes), point prompts (points, point_labels) or both.")
    if mask_threshold is not None and mask_threshold != "auto" and not isinstance(mask_threshold, (int, float)):
        raise ValueError(f"mask_threshold must be None, a number or 'auto', got {mask_threshold!r}.")

    n_prompts = None
    if boxes is not None:
        boxes = _as_array(boxes, "boxes")
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape (N, 4) with XYXY rows, got {boxes.shape}.")
        bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if bad.any():
            raise ValueError(f"boxes {boxes[bad].tolist()} have max < min; boxes are [min_x, min_y, max_x, max_y].")
        n_prompts = len(boxes)
    if points is not None:
        points = _as_array(points, "points")
        point_labels = _as_array(point_labels, "point_labels", dtype="int64")
        if points.ndim == 2 and point_labels.ndim == 1:  # one point per prompt
            points, point_labels = points[:, None], point_labels[:, None]
        if points.ndim != 3 or points.shape[2] != 2:
            raise ValueError(f"points must have shape (N, P, 2) with (x, y) coordinates, got {points.shape}.")
        if point_labels.shape != points.shape[:2]:
            raise ValueError(f"point_labels must have shape (N, P) = {points.shape[:2]}, got {point_labels.shape}.")
        if not np.isin(point_labels, (-1, 0, 1)).all():
            raise ValueError(f"point_labels must be 1, 0 or -1 (padding), got {np.unique(point_labels).tolist()}.")
        if n_prompts is not None and len(points) != n_prompts:
            raise ValueError(f"Got {len(points)} point prompts but {n_prompts} box prompts; they must match.")
        n_prompts = len(points)
    if n_prompts == 0:
        raise ValueError("The prompts are empty.")
    if logits_masks is not None:
        logits_masks = torch.as_tensor(logits_masks, dtype=torch.float32)
        if logits_masks.ndim != 4 or logits_masks.shape[0] != n_prompts or logits_masks.shape[1] != 1:
            raise ValueError(f"logits_masks must have shape ({n_prompts}, 1, 256, 256), "
                             f"got {tuple(logits_masks.shape)}.")
    if segmentation_ids is not None:
        if len(segmentation_ids) != n_prompts:
            raise ValueError(f"Got {len(segmentation_ids)} segmentation_ids for {n_prompts} prompts.")
        if multimasking and not reduce_multimasking:
            raise ValueError("segmentation_ids cannot be used with multimasking=True and reduce_multimasking=False.")
    return n_prompts, boxes, points, point_labels, logits_masks


def _check_points_in_image(points, shape) -> None:
    if points is None:
        return
    valid = (points[..., 0] >= 0) & (points[..., 0] < shape[1]) & (points[..., 1] >= 0) & (points[..., 1] < shape[0])
    if not valid.all():
        prompt_ids = np.unique(np.where(~valid)[0]).tolist()
        raise ValueError(f"points of the prompts {prompt_ids[:10]} lie outside the image of shape {tuple(shape)} "
                         "(points are (x, y) with 0 <= x < width and 0 <= y < height).")


# --- post-processing -------------------------------------------------------------------------------------
def _box_sums(values: torch.Tensor, window: int) -> torch.Tensor:
    """Sums over ``window`` x ``window`` neighbourhoods (zero padded, same size), via an integral image."""
    pad = window // 2
    padded = torch.nn.functional.pad(values, (pad + 1, pad, pad + 1, pad))
    integral = padded.cumsum(-1).cumsum(-2)
    h, w = values.shape[-2:]
    return (integral[..., window:window + h, window:window + w] - integral[..., :h, window:window + w]
            - integral[..., window:window + h, :w] + integral[..., :h, :w])


def _local_otsu_threshold(logits: torch.Tensor, window_size: int = 31, num_bins: int = 64,
                          eps: float = 1e-6) -> torch.Tensor:
    """One threshold per mask from its (M, H, W) logits: Otsu's threshold in the ``window_size`` neighbourhood
    of every pixel (values normalised to [0, 1] per mask, ``num_bins`` bins, the zero padding at the border
    counted as the lowest bin), mapped back to logits; the maximum over all pixels, at least 0.

    Returns thresholds of shape (M, 1, 1).
    """
    x = logits.to(torch.float32)
    m = x.shape[0]
    low = x.flatten(1).min(dim=1).values.view(m, 1, 1)
    value_range = (x.flatten(1).max(dim=1).values.view(m, 1, 1) - low).clamp_min(eps)
    bins = (((x - low) / value_range) * (num_bins - 1)).long().clamp(0, num_bins - 1)

    n_window = float(window_size * window_size)
    total_mean = _box_sums(bins.double(), window_size) / n_window
    best_score = torch.full(x.shape, -1.0, dtype=torch.float64, device=x.device)
    best_bin = torch.zeros(x.shape, dtype=torch.long, device=x.device)
    for b in range(num_bins):
        below = bins <= b
        # padding pixels sit in bin 0, i.e. below every threshold
        weight = 1.0 - _box_sums((~below).double(), window_size) / n_window
        mean = _box_sums((bins * below).double(), window_size) / n_window
        mean_low = mean / weight.clamp_min(eps)
        mean_high = (total_mean - mean) / (1.0 - weight).clamp_min(eps)
        score = weight * (1.0 - weight) * (mean_low - mean_high) ** 2
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_bin = torch.where(better, torch.full_like(best_bin, b), best_bin)
    thresholds = (low + best_bin.to(torch.float32) / (num_bins - 1) * value_range).clamp_min(0.0)
    return thresholds.flatten(1).max(dim=1).values.view(m, 1, 1)


def _masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """XYXY boxes (inclusive max, as segment_anything's AMG) of (M, H, W) boolean masks; zeros when empty."""
    h, w = masks.shape[-2:]
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    y_index = torch.arange(h, device=masks.device)
    x_index = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, y_index, h).min(dim=1).values
    y1 = torch.where(rows, y_index, -1).max(dim=1).values
    x0 = torch.where(cols, x_index, w).min(dim=1).values
    x1 = torch.where(cols, x_index, -1).max(dim=1).values
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    return torch.where(rows.any(dim=1)[:, None], boxes, torch.zeros_like(boxes))


def _process_batch(masks, ious, low_res, mask_threshold, return_highres_logits) -> Dict[str, torch.Tensor]:
    """Threshold a batch of (B, C, H, W) logits; stability scores and boxes for all masks at once."""
    logits = (masks if return_highres_logits else low_res).flatten(0, 1)[:, None]
    masks, ious = masks.flatten(0, 1), ious.flatten(0, 1)
    if mask_threshold == "auto":
        threshold = _local_otsu_threshold(low_res.flatten(0, 1))
    else:
        threshold = torch.tensor(float(mask_threshold), device=masks.device)
    # stability: IoU of the masks thresholded at threshold +- 1
    strict = (masks > threshold + 1.0).flatten(1).sum(dim=1, dtype=torch.int64)
    loose = (masks > threshold - 1.0).flatten(1).sum(dim=1, dtype=torch.int64)
    binary = masks > threshold
    return {
        "masks": binary, "iou_preds": ious, "logits": logits, "stability_scores": strict / loose,
        "boxes": _masks_to_boxes(binary), "areas": binary.flatten(1).sum(dim=1),
    }


def _records(data: Dict[str, torch.Tensor], segmentation_ids) -> List[Dict[str, Any]]:
    boxes = data["boxes"].cpu().numpy()
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
    areas, ious = data["areas"].tolist(), data["iou_preds"].tolist()
    stabilities = data["stability_scores"].tolist()
    return [
        {
            "segmentation": data["masks"][k],
            "area": areas[k],
            "bbox": xywh[k],
            "predicted_iou": ious[k],
            "stability_score": stabilities[k],
            "seg_id": k + 1 if segmentation_ids is None else int(segmentation_ids[k]),
            "logits": data["logits"][k],
        }
        for k in range(len(areas))
    ]


# --- public functions ------------------------------------------------------------------------------------
@torch.no_grad()
def batched_inference(
    predictor,
    image: Optional[np.ndarray],
    batch_size: int,
    boxes: Optional[np.ndarray] = None,
    points: Optional[np.ndarray] = None,
    point_labels: Optional[np.ndarray] = None,
    multimasking: bool = False,
    embedding_path: Optional[Union[str, os.PathLike]] = None,
    return_instance_segmentation: bool = True,
    segmentation_ids: Optional[list] = None,
    reduce_multimasking: bool = True,
    logits_masks: Optional[torch.Tensor] = None,
    verbose_embeddings: bool = True,
    mask_threshold: Optional[Union[float, str]] = None,
    return_highres_logits: bool = False,
    i: Optional[int] = None,
) -> Union[List[Dict[str, Any]], np.ndarray]:
    """Segment one object per prompt, running the prompts through SAM in batches.

    Args:
        predictor: The SAM predictor.
        image: The image (or volume, with ``i``); None to use the image / embeddings set on the predictor.
        batch_size: Number of prompts per decoder call.
        boxes: Box prompts (N, 4) as XYXY ``[min_x, min_y, max_x, max_y]``.
        points: Point prompts (N, P, 2) as (x, y); (N, 2) for one point per prompt.
        point_labels: Labels (N, P) (or (N,)): 1 foreground, 0 background, -1 padding.
        multimasking: Predict three masks per prompt.
        embedding_path: Zarr path to cache the image embeddings at.
        return_instance_segmentation: Return a label image instead of the mask records.
        segmentation_ids: Ids to give the objects of the prompts (in the records' ``seg_id``).
        reduce_multimasking: With ``multimasking``, keep only the mask with the highest predicted IoU.
        logits_masks: Mask prompts (N, 1, 256, 256), e.g. the ``logits`` of a previous call.
        verbose_embeddings: Show progress while computing the embeddings.
        mask_threshold: Threshold on the logits; None for the model's (0), or "auto" for a threshold per mask
            from a local Otsu filter on its low resolution logits.
        return_highres_logits: Store the full resolution logits in the records instead of the 256 x 256 ones.
        i: Slice / frame index of ``image`` for 3D data.

    Returns:
        A uint32 label image (H, W), or one record per mask (N, or 3N without reduction) with
        ``segmentation`` (bool tensor (H, W) on the predictor's device), ``area``, ``bbox`` (XYWH),
        ``predicted_iou``, ``stability_score``, ``seg_id`` and ``logits`` ((1, 256, 256) or (1, H, W) tensor).
    """
    n_prompts, boxes, points, point_labels, logits_masks = _validate_inputs(
        batch_size, boxes, points, point_labels, multimasking, reduce_multimasking, segmentation_ids,
        logits_masks, mask_threshold,
    )
    if image is None:
        if not getattr(predictor, "is_image_set", False):
            raise ValueError("image is None, but no image or embeddings are set on the predictor.")
    else:
        embeddings = util.precompute_image_embeddings(
            predictor, image if i is None else image[i], embedding_path, ndim=2, verbose=verbose_embeddings,
        )
        util.set_precomputed(predictor, embeddings)
    shape = tuple(int(s) for s in predictor.original_size)
    _check_points_in_image(points, shape)

    device = predictor.device
    if boxes is not None:
        boxes = torch.as_tensor(predictor.transform.apply_boxes(boxes, shape), dtype=torch.float32, device=device)
    if points is not None:
        points = torch.as_tensor(predictor.transform.apply_coords(points, shape), dtype=torch.float32, device=device)
        point_labels = torch.as_tensor(point_labels, dtype=torch.float32, device=device)
    if logits_masks is not None:
        logits_masks = logits_masks.to(device)
    threshold = predictor.model.mask_threshold if mask_threshold is None else mask_threshold

    batches = []
    for start in range(0, n_prompts, batch_size):
        batch = slice(start, min(start + batch_size, n_prompts))
        masks, ious, low_res = predict_torch(
            predictor,
            point_coords=None if points is None else points[batch],
            point_labels=None if point_labels is None else point_labels[batch],
            boxes=None if boxes is None else boxes[batch],
            mask_input=None if logits_masks is None else logits_masks[batch],
            multimask_output=multimasking,
            return_logits=True,
        )
        if multimasking and reduce_multimasking:
            best = ious.argmax(dim=1)
            rows = torch.arange(len(best), device=best.device)
            masks, ious, low_res = masks[rows, best][:, None], ious[rows, best][:, None], low_res[rows, best][:, None]
        batches.append(_process_batch(masks, ious, low_res, threshold, return_highres_logits))
        del masks, low_res

    data = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    records = _records(data, segmentation_ids)
    if return_instance_segmentation:
        return util.mask_data_to_segmentation(records, shape=shape, min_object_size=0)
    return records


def _require_tiled_embeddings(predictor, image, image_embeddings, embedding_path, tile_shape, halo, verbose, i):
    if image_embeddings is None:
        if image is None:
            raise ValueError("Pass the image or its tiled image_embeddings.")
        if tile_shape is None or halo is None:
            raise ValueError("tile_shape and halo are needed to compute tiled embeddings.")
        image_embeddings = util.precompute_image_embeddings(
            predictor, image, embedding_path, ndim=2 if i is None else 3, tile_shape=tile_shape, halo=halo,
            verbose=verbose,
        )
    if image_embeddings.get("input_size", 0) is not None:
        raise ValueError("image_embeddings are not tiled; use batched_inference for untiled embeddings.")
    attrs = image_embeddings["features"].attrs
    saved_tile_shape, saved_halo = tuple(attrs["tile_shape"]), tuple(attrs["halo"])
    if tile_shape is not None and tuple(tile_shape) != saved_tile_shape:
        raise ValueError(f"tile_shape {tuple(tile_shape)} does not match the embeddings' {saved_tile_shape}.")
    if halo is not None and tuple(halo) != saved_halo:
        raise ValueError(f"halo {tuple(halo)} does not match the embeddings' {saved_halo}.")
    return image_embeddings, tuple(int(s) for s in attrs["shape"]), saved_tile_shape, saved_halo


def _route_prompts(shape, tile_shape, halo, n_prompts, boxes, points):
    """Assign every prompt to a tile (by its box centre, else its first point) and move it into the tile."""
    tiles, local_boxes, local_points = [], None, None
    if boxes is not None:
        local_boxes = np.zeros_like(boxes)
    if points is not None:
        local_points = np.zeros_like(points)
    for k in range(n_prompts):
        if boxes is not None:
            x0, y0, x1, y1 = boxes[k]
            center = ((y0 + y1) / 2, (x0 + x1) / 2)
        else:
            center = (points[k, 0, 1], points[k, 0, 0])
        tile = _tiling.tile_of_point(np.round(center), shape, tile_shape, halo)
        (oy, ox), (th, tw) = tile.offset, [s.stop - s.start for s in tile.outer]
        if boxes is not None:
            x0, y0, x1, y1 = boxes[k]
            local_boxes[k] = [max(x0 - ox, 0), max(y0 - oy, 0), min(x1 - ox, tw), min(y1 - oy, th)]
        if points is not None:
            local = points[k] - np.array([ox, oy])
            if ((local < 0) | (local >= np.array([tw, th]))).any():
                raise ValueError(f"The points of prompt {k} lie outside tile {tile.tile_id} (outer block "
                                 f"{tile.outer}), the tile the prompt was assigned to.")
            local_points[k] = local
        tiles.append(tile.tile_id)
    return np.array(tiles), local_boxes, local_points


def _stitch(tile_segmentations, shape, tile_shape, halo, overlap_threshold=0.75) -> np.ndarray:
    """Combine per-tile label images (unique ids across tiles): earlier tiles win; a new object whose pixels
    fall on existing objects for more than ``overlap_threshold`` of its area is dropped."""
    segmentation = np.zeros(shape, dtype="uint32")
    for tile_id, tile_seg in tile_segmentations:
        tile = _tiling.get_tile(tile_id, shape, tile_shape, halo)
        existing = segmentation[tile.outer]
        ids, sizes = np.unique(tile_seg, return_counts=True)
        covered_ids, covered = np.unique(tile_seg[existing != 0], return_counts=True)
        covered_fraction = dict(zip(covered_ids.tolist(), covered.tolist()))
        drop = [i for i, s in zip(ids.tolist(), sizes.tolist())
                if i != 0 and covered_fraction.get(i, 0) > overlap_threshold * s]
        new = tile_seg.copy()
        if drop:
            new[np.isin(new, drop)] = 0
        free = existing == 0
        existing[free] = new[free]
    return relabel_consecutive(segmentation)


@torch.no_grad()
def batched_tiled_inference(
    predictor,
    image: Optional[np.ndarray],
    batch_size: int,
    image_embeddings: Optional[dict] = None,
    boxes: Optional[np.ndarray] = None,
    points: Optional[np.ndarray] = None,
    point_labels: Optional[np.ndarray] = None,
    multimasking: bool = False,
    embedding_path: Optional[Union[str, os.PathLike]] = None,
    return_instance_segmentation: bool = True,
    reduce_multimasking: bool = True,
    logits_masks: Optional[torch.Tensor] = None,
    verbose_embeddings: bool = True,
    mask_threshold: Optional[Union[float, str]] = None,
    tile_shape: Optional[Tuple[int, int]] = None,
    halo: Optional[Tuple[int, int]] = None,
    optimize_memory: bool = False,
    i: Optional[int] = None,
    **nms_kwargs,
) -> Union[List[Dict[str, Any]], np.ndarray]:
    """:func:`batched_inference` for tiled embeddings of a large image.

    Each prompt goes to the tile containing its box centre (or its first point) and is predicted there;
    the records get a ``global_bbox`` (XYWH in the full image) next to their tile-local ``bbox``.

    Args:
        predictor: The SAM predictor.
        image: The image; may be None when ``image_embeddings`` are given.
        batch_size: Number of prompts per decoder call.
        image_embeddings: Tiled embeddings from :func:`micro_sam.util.precompute_image_embeddings`.
        boxes: Box prompts (N, 4), XYXY in full image coordinates.
        points: Point prompts (N, P, 2), (x, y) in full image coordinates.
        point_labels: Labels (N, P).
        multimasking: Predict three masks per prompt.
        embedding_path: Zarr path to cache the embeddings at, when they are computed here.
        return_instance_segmentation: Return a label image of the full image instead of the records.
        reduce_multimasking: With ``multimasking``, keep only the best mask per prompt.
        logits_masks: Not supported for tiled inference; must be None.
        verbose_embeddings: Show progress while computing the embeddings.
        mask_threshold: As in :func:`batched_inference`.
        tile_shape: Tile shape, to compute the embeddings (or checked against the given ones).
        halo: Halo, as ``tile_shape``.
        optimize_memory: Reduce each tile's masks to a label image right away (non-maximum suppression
            with ``nms_kwargs``, see :func:`micro_sam.util.apply_nms`) and stitch the tiles; returns the label image.
        i: Slice index for 3D tiled embeddings.
        nms_kwargs: Keyword arguments of :func:`micro_sam.util.apply_nms`, for ``optimize_memory``.

    Returns:
        A uint32 label image of the full image, or the list of mask records.
    """
    if logits_masks is not None:
        raise ValueError("logits_masks are not supported for tiled inference.")
    n_prompts, boxes, points, point_labels, _ = _validate_inputs(
        batch_size, boxes, points, point_labels, multimasking, reduce_multimasking, None, None, mask_threshold,
    )
    image_embeddings, shape, tile_shape, halo = _require_tiled_embeddings(
        predictor, image, image_embeddings, embedding_path, tile_shape, halo, verbose_embeddings, i,
    )
    _check_points_in_image(points, shape)
    tile_ids, local_boxes, local_points = _route_prompts(shape, tile_shape, halo, n_prompts, boxes, points)

    records, tile_segmentations, id_offset = [], [], 0
    for tile_id in np.unique(tile_ids).tolist():
        selected = tile_ids == tile_id
        util.set_precomputed(predictor, image_embeddings, i=i, tile_id=tile_id)
        tile_records = batched_inference(
            predictor, image=None, batch_size=batch_size,
            boxes=None if local_boxes is None else local_boxes[selected],
            points=None if local_points is None else local_points[selected],
            point_labels=None if point_labels is None else point_labels[selected],
            multimasking=multimasking, return_instance_segmentation=False,
            reduce_multimasking=reduce_multimasking, mask_threshold=mask_threshold,
        )
        if optimize_memory:
            tile_seg = util.apply_nms(tile_records, **{"min_size": 0, **nms_kwargs}).astype("uint32")
            tile_seg[tile_seg != 0] += id_offset
            id_offset = max(id_offset, int(tile_seg.max()))
            tile_segmentations.append((tile_id, tile_seg))
        else:
            oy, ox = _tiling.get_tile(tile_id, shape, tile_shape, halo).offset
            for record in tile_records:
                x, y, w, h = record["bbox"]
                record["global_bbox"] = [x + ox, y + oy, w, h]
            records.extend(tile_records)

    if optimize_memory:
        return _stitch(tile_segmentations, shape, tile_shape, halo)
    if return_instance_segmentation:
        return util.mask_data_to_segmentation(records, shape=shape, min_object_size=0)
    return records
