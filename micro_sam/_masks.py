"""Turning lists of mask records (AMG / batched prompt outputs) into label images: NMS and painting.

A mask record is a dict with ``segmentation`` (bool array or tensor, full image or tile shape), ``area``,
``bbox`` (XYWH as in segment_anything), ``predicted_iou``, ``stability_score`` and, for tiled predictions,
``global_bbox`` (XYWH of the same box in full image coordinates).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np


def _to_numpy(mask) -> np.ndarray:
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask)


def relabel_consecutive(segmentation: np.ndarray) -> np.ndarray:
    """Relabel ids to 1..N in order of first appearance of their sorted values; 0 stays background."""
    ids, inverse = np.unique(segmentation, return_inverse=True)
    offset = 0 if ids[0] == 0 else 1
    return (inverse.reshape(segmentation.shape) + offset).astype("uint32")


def mask_data_to_segmentation(
    masks: List[Dict[str, Any]],
    shape: Optional[Tuple[int, int]] = None,
    min_object_size: int = 0,
    max_object_size: Optional[int] = None,
    label_masks: bool = True,
    with_background: bool = False,
    merge_exclusively: bool = True,
) -> np.ndarray:
    """See :func:`micro_sam.util.mask_data_to_segmentation`."""
    from skimage.measure import label

    if shape is None:
        if not masks:
            raise ValueError("shape must be given when the list of masks is empty.")
        shape = _to_numpy(masks[0]["segmentation"]).shape
    segmentation = np.zeros(shape, dtype="uint32")
    next_id = 1
    for record in sorted(masks, key=lambda r: r["area"], reverse=True):
        area = record["area"]
        if area < min_object_size or (max_object_size is not None and area > max_object_size):
            continue
        mask = _to_numpy(record["segmentation"]).astype(bool)
        seg_id = record.get("seg_id", next_id)
        if "global_bbox" in record:
            x, y, w, h = (int(v) for v in record["bbox"])
            gx, gy, gw, gh = (int(v) for v in record["global_bbox"])
            mask = mask[y:y + h, x:x + w]
            target = segmentation[gy:gy + gh, gx:gx + gw]
        else:
            target = segmentation
        if merge_exclusively:
            mask = mask & (target == 0)
        target[mask] = seg_id
        next_id = seg_id + 1

    if label_masks:
        # connected components of each id separately: label the id image with connectivity per id
        segmentation = label(segmentation, background=0, connectivity=1).astype("uint32")
    ids, sizes = np.unique(segmentation, return_counts=True)
    remove = ids[(sizes < min_object_size) & (ids != 0)]
    if with_background and len(ids) > 0:
        remove = np.append(remove, ids[np.argmax(sizes)])
    if len(remove):
        segmentation[np.isin(segmentation, remove)] = 0
    return relabel_consecutive(segmentation)


def _xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype="float64").reshape(-1, 4).copy()
    boxes[:, 2] += boxes[:, 0]
    boxes[:, 3] += boxes[:, 1]
    return boxes


def _global_masks(predictions, shape):
    """Flattened boolean masks of all records in full image coordinates, as a sparse-friendly list."""
    out = []
    for record in predictions:
        mask = _to_numpy(record["segmentation"]).astype(bool)
        if "global_bbox" in record:
            x, y, w, h = (int(v) for v in record["bbox"])
            gx, gy, gw, gh = (int(v) for v in record["global_bbox"])
            full = np.zeros(shape, dtype=bool)
            full[gy:gy + gh, gx:gx + gw] = mask[y:y + h, x:x + w]
            mask = full
        out.append(mask)
    return out


def mask_nms(masks: List[np.ndarray], scores: np.ndarray, nms_thresh: float,
             intersection_over_min: bool = False) -> np.ndarray:
    """Greedy non-maximum suppression on masks. Returns the kept indices, best score first."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    flat = [np.flatnonzero(masks[i].ravel()) for i in range(len(masks))]
    kept: List[int] = []
    for i in order:
        suppressed = False
        for j in kept:
            inter = np.intersect1d(flat[i], flat[j], assume_unique=True).size
            if inter == 0:
                continue
            if intersection_over_min:
                overlap = inter / max(min(flat[i].size, flat[j].size), 1)
            else:
                overlap = inter / max(flat[i].size + flat[j].size - inter, 1)
            if overlap > nms_thresh:
                suppressed = True
                break
        if not suppressed:
            kept.append(int(i))
    return np.array(kept, dtype="int64")


def box_nms(boxes_xyxy: np.ndarray, scores: np.ndarray, nms_thresh: float) -> np.ndarray:
    """Greedy non-maximum suppression on XYXY boxes (torchvision's rule). Returns kept indices."""
    import torch
    from torchvision.ops import nms

    keep = nms(torch.as_tensor(boxes_xyxy, dtype=torch.float32), torch.as_tensor(scores, dtype=torch.float32),
               float(nms_thresh))
    return keep.numpy()


def _infer_tiled_shape(predictions) -> Tuple[int, int]:
    boxes = np.array([p["global_bbox"] for p in predictions])
    return int((boxes[:, 1] + boxes[:, 3]).max()), int((boxes[:, 0] + boxes[:, 2]).max())


def apply_nms(
    predictions: List[Dict[str, Any]],
    min_size: int,
    shape: Optional[Tuple[int, int]] = None,
    perform_box_nms: bool = False,
    nms_thresh: float = 0.9,
    max_size: Optional[int] = None,
    intersection_over_min: bool = False,
) -> np.ndarray:
    """See :func:`micro_sam.util.apply_nms`."""
    if not predictions:
        if shape is None:
            raise ValueError("shape must be given when there are no predictions.")
        return np.zeros(shape, dtype="uint32")
    is_tiled = "global_bbox" in predictions[0]
    if shape is None:
        shape = _infer_tiled_shape(predictions) if is_tiled else _to_numpy(predictions[0]["segmentation"]).shape
    areas = np.array([int(_to_numpy(p["segmentation"]).sum()) for p in predictions])
    keep = areas > min_size if min_size > 0 else np.ones(len(predictions), dtype=bool)
    if max_size is not None:
        keep &= areas < max_size
    predictions = [p for p, k in zip(predictions, keep) if k]
    areas = areas[keep]
    if not predictions:
        return np.zeros(shape, dtype="uint32")
    scores = np.array([float(p["predicted_iou"]) * float(p["stability_score"]) for p in predictions])
    if perform_box_nms:
        if intersection_over_min:
            raise ValueError("intersection_over_min is only supported for mask NMS (perform_box_nms=False).")
        boxes = _xywh_to_xyxy([p["global_bbox" if is_tiled else "bbox"] for p in predictions])
        kept = box_nms(boxes, scores, nms_thresh)
    else:
        kept = mask_nms(_global_masks(predictions, shape), scores, nms_thresh, intersection_over_min)
    records = []
    for i in kept:
        record = {"segmentation": predictions[i]["segmentation"], "area": int(areas[i]),
                  "bbox": predictions[i]["bbox"]}
        if is_tiled:
            record["global_bbox"] = predictions[i]["global_bbox"]
        records.append(record)
    return mask_data_to_segmentation(records, shape=shape, min_object_size=min_size)
