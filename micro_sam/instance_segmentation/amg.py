"""Automatic mask generation (AMG): segment everything with a grid of point prompts.

The algorithm is segment_anything's ``SamAutomaticMaskGenerator`` (as extended by micro_sam), split into an
expensive :meth:`~AutomaticMaskGenerator.initialize` (one mask decoder pass per batch of grid points) and a
cheap :meth:`~AutomaticMaskGenerator.generate` (filter by predicted IoU and stability score, drop masks cut
by crop borders, box NMS, paint the label image), so that thresholds can be tuned interactively.

Implementation notes (same results as micro_sam 1.8, several times faster):

- the mask decoder (:func:`micro_sam.models.fast_mask_decoder.decode_prompts`) runs on batches of grid points;
  its low resolution logits are upsampled in chunks as SAM's ``postprocess_masks`` does (``upscale_masks``)
  and reduced right away (stability score, threshold, box), so memory is bounded for large images;
- each mask is kept as the bit-packed content of its bounding box (no run-length encoding), all per-mask
  quantities live in numpy arrays: filtering and NMS are vectorised, and only surviving masks are decoded.

Coordinates: images are (Y, X[, C]); boxes in mask records are XYWH (segment_anything's convention, derived
from inclusive XYXY boxes), point coordinates are (x, y).
"""
from __future__ import annotations

from abc import ABC
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from . import _mask_store as store
from .postprocessing import remove_small_regions

__all__ = ["AMGBase", "AutomaticMaskGenerator"]

_OUTPUT_MODES = ("instance_segmentation", "binary_mask", "rle", "coco_rle")
_EDGE_TOLERANCE = 20.0  # masks whose box is this close to a crop border (that is not an image border) are cut


# --- helpers shared with the tiled generator ------------------------------------------------------------
def _check_image(image, name: str = "image") -> None:
    if not hasattr(image, "shape") or len(image.shape) not in (2, 3) or 0 in image.shape:
        shape = getattr(image, "shape", None)
        raise ValueError(f"{name} must be a 2D image of shape (Y, X) or (Y, X, C), got shape {shape}.")


def _select_image(image, i: Optional[int]):
    """The 2D image to segment: ``image[i]`` for a volume / time series and a slice index, else ``image``."""
    from .._image import infer_ndim

    if i is not None and len(image.shape) >= 3 and infer_ndim(image, None) == 3:
        if not 0 <= int(i) < image.shape[0]:
            raise ValueError(f"Slice index i={i} is out of range for a volume of {image.shape[0]} slices.")
        image = image[int(i)]
    _check_image(image)
    return np.asarray(image)


def _check_embeddings_shape(image_embeddings, shape: Tuple[int, int]) -> None:
    """Raise if untiled embeddings were computed for an image of another shape."""
    original_size = image_embeddings.get("original_size")
    if original_size is None:
        features = image_embeddings["features"]
        if hasattr(features, "keys") and not hasattr(features, "shape"):
            raise ValueError(
                "The image embeddings are tiled; use the tiled segmenter (is_tiled=True / tile_shape) for them."
            )
        return
    if tuple(int(s) for s in original_size) != tuple(shape):
        raise ValueError(
            f"The image embeddings were computed for an image of shape {tuple(int(s) for s in original_size)}, "
            f"but the image has shape {tuple(shape)}; recompute the embeddings for this image."
        )


def _check_output_mode(output_mode: str) -> None:
    if output_mode not in _OUTPUT_MODES:
        raise ValueError(f"Invalid output_mode {output_mode!r}; choose one of {', '.join(_OUTPUT_MODES)}.")


def _nms(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> np.ndarray:
    """torchvision's box NMS (as used by segment_anything), returns kept indices ordered by score."""
    import torch
    from torchvision.ops.boxes import batched_nms

    if len(boxes) == 0:
        return np.zeros(0, dtype="int64")
    boxes_t = torch.as_tensor(np.asarray(boxes)).float()
    keep = batched_nms(boxes_t, torch.as_tensor(scores), torch.zeros(len(boxes_t)), iou_threshold=float(thresh))
    return keep.numpy()


def _near_crop_edge(boxes_global: np.ndarray, crop_box, original_size) -> np.ndarray:
    """Boxes (global XYXY) within the tolerance of a crop border that is not also an image border."""
    crop = np.asarray(crop_box, dtype="float32")[None]
    image_box = np.array([[0, 0, original_size[1], original_size[0]]], dtype="float32")
    boxes = boxes_global.astype("float32")
    near_crop = np.abs(boxes - crop) <= _EDGE_TOLERANCE
    near_image = np.abs(boxes - image_box) <= _EDGE_TOLERANCE
    return np.any(near_crop & ~near_image, axis=1)


def _xyxy_to_xywh(box) -> List[int]:
    x0, y0, x1, y1 = (int(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def _box_of_mask(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return np.zeros(4, dtype="int64")
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype="int64")


def _from_micro_sam_mask_data(mask_data, crop_box) -> store.MaskTable:
    """Convert one crop of a micro_sam 1.8 AMG state (segment_anything ``MaskData``) to a mask table.

    micro_sam keeps crop-local boxes and points, and run-length encoded masks of the full image.
    """
    rles = list(mask_data["rles"])
    if len(rles) == 0:
        return store.empty_table()
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    local = np.stack([store.rle_decode(rle)[y0:y1, x0:x1] for rle in rles])
    boxes = np.asarray(mask_data["boxes"], dtype="int64").reshape(-1, 4)
    bits, offsets, areas = store.pack(local, boxes)
    if "points" in mask_data._stats:
        points = np.asarray(mask_data["points"], dtype="float64")
    else:
        points = np.full((len(rles), 2), np.nan)
    return {
        "iou_preds": np.asarray(mask_data["iou_preds"], dtype="float32"),
        "stability_score": np.asarray(mask_data["stability_score"], dtype="float32"),
        "boxes": boxes, "points": points, "areas": areas, "mask_bits": bits, "mask_offsets": offsets,
    }


# --- the base class ------------------------------------------------------------------------------------
class AMGBase(ABC):
    """Base class of the automatic mask generators: the initialized state and the cheap ``generate`` step.

    The state is one table of predicted masks per crop (``crop_list``), the crop boxes (XYXY, exclusive right
    / bottom) and the original image size.
    """

    def __init__(self) -> None:
        self._is_initialized = False
        self._crop_list = None
        self._crop_boxes = None
        self._original_size = None

    @property
    def is_initialized(self) -> bool:
        """Whether ``initialize`` (or ``set_state``) has been called."""
        return self._is_initialized

    @property
    def crop_list(self) -> Optional[List[Dict[str, np.ndarray]]]:
        """The per-crop tables of predicted masks."""
        return self._crop_list

    @property
    def crop_boxes(self) -> Optional[List[List[int]]]:
        """The crop boxes [x0, y0, x1, y1] in image coordinates."""
        return self._crop_boxes

    @property
    def original_size(self) -> Optional[Tuple[int, int]]:
        """(H, W) of the image."""
        return self._original_size

    def get_state(self) -> Dict[str, Any]:
        """The initialized state: ``{"crop_list", "crop_boxes", "original_size"}`` (numpy arrays and lists).

        Raises:
            RuntimeError: Not initialized.
        """
        if not self.is_initialized:
            raise RuntimeError(f"{type(self).__name__} has not been initialized. Call initialize first.")
        return {"crop_list": self.crop_list, "crop_boxes": self.crop_boxes, "original_size": self.original_size}

    def set_state(self, state: Dict[str, Any]) -> None:
        """Set a state from :meth:`get_state` (also accepts the AMG state of micro_sam 1.8).

        Args:
            state: Dict with ``crop_list``, ``crop_boxes`` and ``original_size``.
        """
        missing = [key for key in ("crop_list", "crop_boxes", "original_size") if key not in state]
        if missing:
            raise ValueError(f"The state is missing {missing}; expected the output of get_state().")
        if len(state["crop_list"]) != len(state["crop_boxes"]):
            raise ValueError("The state has a different number of mask tables and crop boxes.")
        crop_list = []
        for table, crop_box in zip(state["crop_list"], state["crop_boxes"]):
            if hasattr(table, "_stats") and "rles" in table._stats:
                table = _from_micro_sam_mask_data(table, crop_box)
            crop_list.append({key: np.asarray(value) for key, value in table.items()})
        self._crop_list = crop_list
        self._crop_boxes = [[int(v) for v in box] for box in state["crop_boxes"]]
        self._original_size = tuple(int(s) for s in state["original_size"])
        self._is_initialized = True

    def clear_state(self) -> None:
        """Forget the initialized state."""
        self._crop_list = None
        self._crop_boxes = None
        self._original_size = None
        self._is_initialized = False

    # --- generate -----------------------------------------------------------------------------------
    def _filter_crop(self, table, crop_box, pred_iou_thresh, stability_score_thresh, box_nms_thresh):
        """Threshold, crop edge filter and NMS within one crop. Returns the kept indices (NMS order)."""
        keep = np.ones(store.n_masks(table), dtype=bool)
        if pred_iou_thresh > 0.0:
            keep &= table["iou_preds"] > np.float32(pred_iou_thresh)
        if stability_score_thresh > 0.0:
            keep &= table["stability_score"] >= np.float32(stability_score_thresh)
        x0, y0 = crop_box[0], crop_box[1]
        boxes_global = table["boxes"] + np.array([x0, y0, x0, y0])
        keep &= ~_near_crop_edge(boxes_global, crop_box, self.original_size)
        index = np.flatnonzero(keep)
        order = _nms(table["boxes"][index], table["iou_preds"][index], box_nms_thresh)
        return index[order]

    def _select_masks(self, pred_iou_thresh, stability_score_thresh, box_nms_thresh, crop_nms_thresh):
        """The surviving masks as (crop index, mask index, global box) arrays, in micro_sam's order."""
        crop_ids, mask_ids, boxes = [], [], []
        for c, (table, crop_box) in enumerate(zip(self.crop_list, self.crop_boxes)):
            kept = self._filter_crop(table, crop_box, pred_iou_thresh, stability_score_thresh, box_nms_thresh)
            x0, y0 = crop_box[0], crop_box[1]
            crop_ids.append(np.full(len(kept), c, dtype="int64"))
            mask_ids.append(kept)
            boxes.append(table["boxes"][kept] + np.array([x0, y0, x0, y0]))
        crop_ids, mask_ids = np.concatenate(crop_ids), np.concatenate(mask_ids)
        boxes = np.concatenate(boxes).reshape(-1, 4)
        if len(self.crop_boxes) > 1 and len(crop_ids) > 0:
            # Between crops prefer the masks of smaller crops (float32 scores, as torchvision gets them).
            crops = np.asarray(self.crop_boxes, dtype="int64")[crop_ids]
            areas = (crops[:, 2] - crops[:, 0]) * (crops[:, 3] - crops[:, 1])
            order = _nms(boxes, (1.0 / areas).astype("float32"), crop_nms_thresh)
            crop_ids, mask_ids, boxes = crop_ids[order], mask_ids[order], boxes[order]
        return crop_ids, mask_ids, boxes

    def _full_mask(self, crop_id: int, mask_id: int) -> np.ndarray:
        crop_box = self.crop_boxes[crop_id]
        return store.unpack_full(self.crop_list[crop_id], mask_id, self.original_size, (crop_box[0], crop_box[1]))

    def _remove_small_regions(self, crop_ids, mask_ids, boxes, min_area, nms_thresh):
        """segment_anything's small region post-processing on the selected masks (full image masks)."""
        masks, scores, new_boxes = [], [], []
        for c, k in zip(crop_ids, mask_ids):
            mask = self._full_mask(c, k)
            mask, changed_holes = remove_small_regions(mask, min_area, mode="holes")
            mask, changed_islands = remove_small_regions(mask, min_area, mode="islands")
            masks.append(mask)
            scores.append(float(not (changed_holes or changed_islands)))
            new_boxes.append(_box_of_mask(mask))
        new_boxes = np.stack(new_boxes)
        keep = _nms(new_boxes, np.asarray(scores, dtype="float32"), nms_thresh)
        boxes = boxes.copy()
        changed = np.asarray(scores) == 0.0
        boxes[changed] = new_boxes[changed]
        return [masks[i] for i in keep], boxes[keep], keep

    def _postprocess(self, crop_ids, mask_ids, boxes, min_mask_region_area, box_nms_thresh, crop_nms_thresh,
                     output_mode, with_background):
        tables = self.crop_list
        full_masks = None
        if min_mask_region_area > 0 and len(crop_ids) > 0:
            full_masks, boxes, keep = self._remove_small_regions(
                crop_ids, mask_ids, boxes, min_mask_region_area, max(box_nms_thresh, crop_nms_thresh)
            )
            crop_ids, mask_ids = crop_ids[keep], mask_ids[keep]

        if output_mode == "instance_segmentation":
            from ..util import mask_data_to_segmentation

            records = []
            for n, (c, k) in enumerate(zip(crop_ids, mask_ids)):
                if full_masks is not None:
                    mask = full_masks[n]
                    records.append({"segmentation": mask, "area": int(mask.sum())})
                    continue
                content = store.unpack_box(tables[c], k)
                x0, y0 = int(boxes[n][0]), int(boxes[n][1])
                h, w = content.shape
                records.append({"segmentation": content, "area": int(tables[c]["areas"][k]),
                                "bbox": [0, 0, w, h], "global_bbox": [x0, y0, w, h]})
            return mask_data_to_segmentation(
                records, shape=self.original_size, with_background=with_background, merge_exclusively=False
            )

        records = []
        for n, (c, k) in enumerate(zip(crop_ids, mask_ids)):
            mask = full_masks[n] if full_masks is not None else self._full_mask(c, k)
            if output_mode == "binary_mask":
                segmentation = mask
            elif output_mode == "rle":
                segmentation = store.rle_encode(mask)
            else:
                segmentation = _coco_rle(mask)
            crop_box = self.crop_boxes[c]
            point = tables[c]["points"][k] + np.array([crop_box[0], crop_box[1]])
            records.append({
                "segmentation": segmentation,
                "area": int(mask.sum()),
                "bbox": _xyxy_to_xywh(boxes[n]),
                "predicted_iou": float(tables[c]["iou_preds"][k]),
                "stability_score": float(tables[c]["stability_score"][k]),
                "crop_box": _xyxy_to_xywh(crop_box),
                "point_coords": [point.tolist()],
            })
        return records

    def _generate(self, pred_iou_thresh, stability_score_thresh, box_nms_thresh, crop_nms_thresh,
                  min_mask_region_area, output_mode, with_background, select=None):
        if not self.is_initialized:
            raise RuntimeError(f"{type(self).__name__} has not been initialized. Call initialize first.")
        _check_output_mode(output_mode)
        crop_ids, mask_ids, boxes = self._select_masks(
            pred_iou_thresh, stability_score_thresh, box_nms_thresh, crop_nms_thresh
        )
        if select is not None:
            keep = select(crop_ids, mask_ids, boxes)
            crop_ids, mask_ids, boxes = crop_ids[keep], mask_ids[keep], boxes[keep]
        return self._postprocess(crop_ids, mask_ids, boxes, min_mask_region_area, box_nms_thresh,
                                 crop_nms_thresh, output_mode, with_background)


def _coco_rle(mask: np.ndarray) -> Dict[str, Any]:
    try:
        from pycocotools import mask as mask_utils
    except ImportError as error:
        raise ImportError("output_mode='coco_rle' needs pycocotools (pip install pycocotools); "
                          "use output_mode='rle' for uncompressed run-length encoding.") from error
    rle = mask_utils.frPyObjects(store.rle_encode(mask), *mask.shape)
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


# --- the point grid generator -----------------------------------------------------------------------------
class AutomaticMaskGenerator(AMGBase):
    """Segment everything in an image with a grid of point prompts (SAM's automatic mask generation).

    Usage::

        amg = AutomaticMaskGenerator(predictor)
        amg.initialize(image)                          # expensive: embeddings and masks for all grid points
        labels = amg.generate(pred_iou_thresh=0.8)     # cheap: filter and merge, repeat with other thresholds

    Args:
        predictor: The segment_anything ``SamPredictor``.
        points_per_side: Points along each side of the image (the grid has ``points_per_side ** 2`` points).
            Set to None to use ``point_grids``.
        points_per_batch: Points passed through the mask decoder together; None: 64 (16 on "mps").
        crop_n_layers: If > 0, masks are also predicted on 4, 16, ... crops of the image (needs the image
            encoder for every crop; precomputed embeddings are then not used).
        crop_overlap_ratio: Overlap of the crops relative to the short image side.
        crop_n_points_downscale_factor: Points per side are divided by this factor per crop layer.
        point_grids: Explicit grids, one (N, 2) array of (x, y) in [0, 1] per crop layer
            (requires ``points_per_side=None``).
        stability_score_offset: Logit offset for the stability score (IoU of the masks at +-offset).
    """

    def __init__(
        self,
        predictor,
        points_per_side: Optional[int] = 32,
        points_per_batch: Optional[int] = None,
        crop_n_layers: int = 0,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        stability_score_offset: float = 1.0,
    ) -> None:
        from segment_anything.utils.amg import build_all_layer_point_grids

        super().__init__()
        if crop_n_layers < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}.")
        if points_per_side is not None:
            if point_grids is not None:
                raise ValueError("Pass either points_per_side or point_grids (with points_per_side=None), not both.")
            if int(points_per_side) < 1:
                raise ValueError(f"points_per_side must be a positive integer, got {points_per_side}.")
            self.point_grids = build_all_layer_point_grids(
                int(points_per_side), crop_n_layers, crop_n_points_downscale_factor
            )
        elif point_grids is not None:
            self.point_grids = [np.asarray(grid, dtype="float64").reshape(-1, 2) for grid in point_grids]
            if len(self.point_grids) != crop_n_layers + 1:
                raise ValueError(
                    f"point_grids must have one grid per crop layer ({crop_n_layers + 1}), got {len(point_grids)}."
                )
        else:
            raise ValueError("Either points_per_side or point_grids must be given.")

        if points_per_batch is None:
            points_per_batch = 16 if str(getattr(predictor, "device", "cpu")) == "mps" else 64
        if int(points_per_batch) < 1:
            raise ValueError(f"points_per_batch must be a positive integer, got {points_per_batch}.")
        self._predictor = predictor
        self._points_per_side = points_per_side
        self._points_per_batch = int(points_per_batch)
        self._crop_n_layers = crop_n_layers
        self._crop_overlap_ratio = crop_overlap_ratio
        self._crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self._stability_score_offset = stability_score_offset

    # --- mask prediction --------------------------------------------------------------------------------
    def _n_batches(self, n_points: int) -> int:
        return -(-n_points // self._points_per_batch)

    def _predict_points(self, points: np.ndarray, crop_hw: Tuple[int, int]) -> store.MaskTable:
        """Masks (3 per point) for a batch of (x, y) points in crop coordinates, reduced to a mask table."""
        import torch

        from ..models.fast_mask_decoder import decode_prompts, upscale_masks

        predictor = self._predictor
        model = predictor.model
        coords = predictor.transform.apply_coords(points, crop_hw)
        in_points = torch.as_tensor(coords, device=predictor.device, dtype=torch.float)[:, None, :]
        in_labels = torch.ones((len(points), 1), dtype=torch.int, device=predictor.device)
        low_res, iou_preds = decode_prompts(model, predictor.features, (in_points, in_labels), multimask_output=True)
        n_out = low_res.shape[1]
        low_res = low_res.flatten(0, 1)[:, None]
        iou_preds = iou_preds.flatten(0, 1)

        # Upsample to the image size in chunks that bound the memory (the 1024^2 intermediate dominates).
        h, w = (int(s) for s in predictor.original_size)
        side = int(model.image_encoder.img_size)
        chunk = max(1, (1 << 27) // (4 * max(side * side, h * w)))
        tables = []
        for start in range(0, len(low_res), chunk):
            logits = upscale_masks(model, low_res[start:start + chunk], predictor.input_size,
                                   predictor.original_size)[:, 0]
            stability = store.stability_score(logits, model.mask_threshold, self._stability_score_offset)
            binary = logits > model.mask_threshold
            boxes = store.masks_to_boxes(binary)
            del logits
            boxes_np = boxes.cpu().numpy()
            bits, offsets, areas = store.pack(binary.cpu().numpy(), boxes_np)
            tables.append({
                "iou_preds": iou_preds[start:start + chunk].float().cpu().numpy(),
                "stability_score": stability.float().cpu().numpy(),
                "boxes": boxes_np, "areas": areas, "mask_bits": bits, "mask_offsets": offsets,
                "points": np.repeat(np.asarray(points, dtype="float64"), n_out, axis=0)[start:start + chunk],
            })
        return store.concatenate(tables)

    def _predict_crop(self, points_for_image: np.ndarray, crop_hw, pbar_update) -> store.MaskTable:
        tables = []
        for start in range(0, len(points_for_image), self._points_per_batch):
            tables.append(self._predict_points(points_for_image[start:start + self._points_per_batch], crop_hw))
            pbar_update(1)
        return store.concatenate(tables)

    def initialize(
        self,
        image: np.ndarray,
        image_embeddings: Optional[Dict[str, Any]] = None,
        i: Optional[int] = None,
        verbose: bool = False,
        pbar_init: Optional[callable] = None,
        pbar_update: Optional[callable] = None,
    ) -> None:
        """Predict the masks for all grid points (the expensive step).

        Args:
            image: (Y, X) or (Y, X, C) image; or a volume / time series together with the slice index ``i``.
            image_embeddings: Precomputed embeddings (see ``util.precompute_image_embeddings``) of this image;
                computed here if None. Not used with ``crop_n_layers > 0``.
            i: Slice index for 3D embeddings (and volumes).
            verbose: Show progress bars.
            pbar_init: External progress bar callback ``pbar_init(total, description)``.
            pbar_update: External progress bar callback ``pbar_update(n)``.

        Raises:
            ValueError: The embeddings belong to an image of another shape, or the image is not 2D.
        """
        import torch
        from segment_anything.utils.amg import generate_crop_boxes

        from .._image import to_image
        from ..util import handle_pbar, precompute_image_embeddings, set_precomputed

        image = _select_image(image, i)
        original_size = tuple(int(s) for s in image.shape[:2])
        crop_boxes, layer_idxs = generate_crop_boxes(original_size, self._crop_n_layers, self._crop_overlap_ratio)

        single_crop = len(crop_boxes) == 1
        if single_crop:
            if image_embeddings is None:
                image_embeddings = precompute_image_embeddings(self._predictor, image, ndim=2, verbose=verbose)
            _check_embeddings_shape(image_embeddings, original_size)
            set_precomputed(self._predictor, image_embeddings, i=i)
            sam_image = None
        else:
            sam_image = to_image(image)

        self.clear_state()
        self._original_size = original_size
        _, init, update, close = handle_pbar(verbose, pbar_init, pbar_update)
        n_total = sum(self._n_batches(len(self.point_grids[layer])) for layer in layer_idxs)
        init(n_total, "Predict masks for point grid prompts")
        crop_list = []
        try:
            with torch.inference_mode():
                for crop_box, layer in zip(crop_boxes, layer_idxs):
                    x0, y0, x1, y1 = crop_box
                    crop_hw = (y1 - y0, x1 - x0)
                    if not single_crop:
                        self._predictor.set_image(sam_image[y0:y1, x0:x1])
                    points = self.point_grids[layer] * np.array(crop_hw)[None, ::-1]
                    crop_list.append(self._predict_crop(points, crop_hw, update))
                    if not single_crop:
                        self._predictor.reset_image()
        finally:
            close()
        self._crop_list = crop_list
        self._crop_boxes = [list(box) for box in crop_boxes]
        self._is_initialized = True

    def generate(
        self,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        box_nms_thresh: float = 0.7,
        crop_nms_thresh: float = 0.7,
        min_mask_region_area: int = 0,
        output_mode: str = "instance_segmentation",
        with_background: bool = True,
    ) -> Union[List[Dict[str, Any]], np.ndarray]:
        """Filter and merge the predicted masks (cheap; call again to try other thresholds).

        Args:
            pred_iou_thresh: Keep masks whose predicted IoU is above this value (0 disables the filter).
            stability_score_thresh: Keep masks whose stability score is at least this value (0 disables it).
            box_nms_thresh: Box IoU above which the lower scoring of two masks in a crop is removed.
            crop_nms_thresh: Box IoU for removing duplicates between crops (prefers smaller crops).
            min_mask_region_area: If > 0, fill holes and remove islands smaller than this in each mask.
            output_mode: "instance_segmentation" for a label image; "binary_mask", "rle" or "coco_rle" for a
                list of records with ``segmentation``, ``area``, ``bbox`` (XYWH), ``predicted_iou``,
                ``stability_score``, ``crop_box`` (XYWH) and ``point_coords`` ([[x, y]]).
            with_background: For the label image: remove the largest object if it is larger than the
                background (it usually is the background).

        Returns:
            The (H, W) uint32 label image (objects 1..N; empty if nothing was found) or the mask records.

        Raises:
            RuntimeError: ``initialize`` was not called.
        """
        return self._generate(pred_iou_thresh, stability_score_thresh, box_nms_thresh, crop_nms_thresh,
                              min_mask_region_area, output_mode, with_background)
