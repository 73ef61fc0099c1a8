"""Automatic prompt generation (APG): SAM prompted with points derived from the AIS decoder's maps.

The decoder's maps are thresholded into seed regions (as for AIS, without smoothing); the most central pixel of
each seed region becomes a point prompt, SAM turns the prompts into masks (``micro_sam.inference``), and the
masks are merged with mask NMS (``util.apply_nms``). Optionally the masks are refined with a second round of
box prompts.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np

from .ais import InstanceSegmentationWithDecoder
from .postprocessing import label_components, segmentation_to_masks
from .tiled import TiledInstanceSegmentationWithDecoder

__all__ = ["AutomaticPromptGenerator", "TiledAutomaticPromptGenerator"]


def object_centers(segmentation: np.ndarray, avoid_image_border: bool = True) -> np.ndarray:
    """The most central pixel of each object: the maximum of the distance to the object boundaries.

    Args:
        segmentation: (Y, X) label image.
        avoid_image_border: Treat the image border as boundary, so centres keep away from it.

    Returns:
        (N, 2) array of (y, x) centres, in increasing object id order.
    """
    from scipy import ndimage
    from skimage.segmentation import find_boundaries

    segmentation = np.asarray(segmentation)
    ids = np.unique(segmentation)
    ids = ids[ids != 0]
    if len(ids) == 0:
        return np.zeros((0, 2), dtype="int64")
    inside = ~find_boundaries(segmentation, mode="outer")
    if avoid_image_border:
        inside[0, :] = inside[-1, :] = False
        inside[:, 0] = inside[:, -1] = False
    distances = ndimage.distance_transform_edt(inside)
    centers = ndimage.maximum_position(distances, labels=segmentation, index=ids)
    return np.array(centers, dtype="int64").reshape(-1, 2)


def derive_point_prompts(
    foreground: np.ndarray,
    center_distances: np.ndarray,
    boundary_distances: np.ndarray,
    foreground_threshold: float = 0.5,
    center_distance_threshold: float = 0.5,
    boundary_distance_threshold: float = 0.5,
) -> Optional[Dict[str, np.ndarray]]:
    """One positive point prompt per seed region of the decoder's maps.

    Returns:
        ``{"points": (N, 1, 2) (x, y), "point_labels": (N, 1)}`` for ``micro_sam.inference.batched_inference``,
        or None if there is no seed.
    """
    seeds = (np.asarray(center_distances) < center_distance_threshold) & \
        (np.asarray(boundary_distances) < boundary_distance_threshold)
    seeds &= ~(np.asarray(foreground) < foreground_threshold)
    components, n = label_components(seeds)
    if n == 0:
        return None
    centers = object_centers(components)
    return {"points": centers[:, None, ::-1].astype("float64"), "point_labels": np.ones((len(centers), 1))}


def derive_box_prompts(predictions: List[Dict[str, Any]], box_extension: float = 0.01) -> Dict[str, np.ndarray]:
    """Box prompts (x0, y0, x1, y1) around mask records, enlarged by ``box_extension`` of their size."""
    height, width = np.asarray(predictions[0]["segmentation"]).shape[-2:]
    boxes = []
    for record in predictions:
        x, y, w, h = record["bbox"]
        boxes.append([max(x - w * box_extension, 0), max(y - h * box_extension, 0),
                      min(x + (1 + box_extension) * w, width), min(y + (1 + box_extension) * h, height)])
    return {"boxes": np.array(boxes, dtype="float64")}


def _finish(segmentation, output_mode):
    if output_mode == "instance_segmentation":
        return segmentation
    return segmentation_to_masks(segmentation)


def _check_output_mode(output_mode):
    if output_mode not in ("instance_segmentation", "binary_mask"):
        raise ValueError(f"Invalid output_mode {output_mode!r}; choose 'instance_segmentation' or 'binary_mask'.")


class AutomaticPromptGenerator(InstanceSegmentationWithDecoder):
    """Instance segmentation with SAM prompted by points derived from the decoder (APG).

    Same interface as :class:`InstanceSegmentationWithDecoder`; ``generate`` runs SAM's mask decoder for
    the derived prompts, so the predictor must hold this image's embeddings (as after ``initialize``).
    """

    def generate(
        self,
        min_size: int = 25,
        center_distance_threshold: float = 0.5,
        boundary_distance_threshold: float = 0.5,
        foreground_threshold: float = 0.5,
        multimasking: bool = False,
        batch_size: int = 32,
        nms_threshold: float = 0.9,
        intersection_over_min: bool = False,
        output_mode: str = "instance_segmentation",
        mask_threshold: Optional[Union[float, str]] = None,
        refine_with_box_prompts: bool = False,
        prompt_function: Optional[Callable] = None,
    ) -> Union[List[Dict[str, Any]], np.ndarray]:
        """Segment the initialized image with prompts derived from the decoder's maps.

        Args:
            min_size: Objects with fewer pixels are removed.
            center_distance_threshold: Seeds need a centre distance below this value.
            boundary_distance_threshold: Seeds need a boundary distance below this value.
            foreground_threshold: Seeds need a foreground probability of at least this value.
            multimasking: Predict three masks per prompt and keep the best.
            batch_size: Prompts per mask decoder pass.
            nms_threshold: Mask overlap above which the lower scoring of two masks is removed.
            intersection_over_min: Measure overlap as intersection over the smaller mask instead of IoU.
            output_mode: "instance_segmentation" (label image) or "binary_mask" (records).
            mask_threshold: Logit threshold for the masks (None: the model's; "auto" see micro_sam.inference).
            refine_with_box_prompts: Predict again with box prompts around the first masks.
            prompt_function: Custom ``f(foreground, center_distances, boundary_distances, **thresholds)``
                returning prompts for ``micro_sam.inference.batched_inference`` (or None for none).

        Returns:
            The (H, W) uint32 label image or the object records.
        """
        from .. import util
        from ..inference import batched_inference

        if not self.is_initialized:
            raise RuntimeError(f"{type(self).__name__} has not been initialized. Call initialize first.")
        _check_output_mode(output_mode)
        prompts = (prompt_function or derive_point_prompts)(
            foreground=self._foreground, center_distances=self._center_distances,
            boundary_distances=self._boundary_distances, foreground_threshold=foreground_threshold,
            center_distance_threshold=center_distance_threshold,
            boundary_distance_threshold=boundary_distance_threshold,
        )
        shape = self._foreground.shape
        if prompts is None:
            return _finish(np.zeros(shape, dtype="uint32"), output_mode)
        common = dict(image=None, batch_size=batch_size, return_instance_segmentation=False,
                      multimasking=multimasking, mask_threshold=mask_threshold, i=self._i)
        predictions = batched_inference(self._predictor, **common, **prompts)
        if refine_with_box_prompts and predictions:
            predictions = batched_inference(self._predictor, **common, **derive_box_prompts(predictions))
        segmentation = util.apply_nms(predictions, min_size=min_size, shape=shape, nms_thresh=nms_threshold,
                                      intersection_over_min=intersection_over_min)
        return _finish(segmentation, output_mode)


class TiledAutomaticPromptGenerator(TiledInstanceSegmentationWithDecoder):
    """:class:`AutomaticPromptGenerator` for tiled embeddings (prompts are routed to the tiles)."""

    def generate(
        self,
        min_size: int = 25,
        center_distance_threshold: float = 0.5,
        boundary_distance_threshold: float = 0.5,
        foreground_threshold: float = 0.5,
        multimasking: bool = False,
        batch_size: int = 32,
        nms_threshold: float = 0.9,
        intersection_over_min: bool = False,
        output_mode: str = "instance_segmentation",
        mask_threshold: Optional[Union[float, str]] = None,
        refine_with_box_prompts: bool = False,
        prompt_function: Optional[Callable] = None,
        optimize_memory: bool = False,
    ) -> Union[List[Dict[str, Any]], np.ndarray]:
        """As :meth:`AutomaticPromptGenerator.generate`; box refinement is not supported with tiling.

        Args:
            optimize_memory: Merge the masks tile by tile (needs output_mode="instance_segmentation").
        """
        from .. import util
        from ..inference import batched_tiled_inference

        if not self.is_initialized:
            raise RuntimeError(f"{type(self).__name__} has not been initialized. Call initialize first.")
        _check_output_mode(output_mode)
        if refine_with_box_prompts:
            raise ValueError("refine_with_box_prompts is not supported for tiled automatic prompt generation.")
        if optimize_memory and output_mode != "instance_segmentation":
            raise ValueError("optimize_memory needs output_mode='instance_segmentation'.")
        if getattr(self, "_image_embeddings", None) is None:
            raise RuntimeError("The tiled embeddings are not available (set_state does not restore them); "
                               "call initialize.")
        prompts = (prompt_function or derive_point_prompts)(
            foreground=self._foreground, center_distances=self._center_distances,
            boundary_distances=self._boundary_distances, foreground_threshold=foreground_threshold,
            center_distance_threshold=center_distance_threshold,
            boundary_distance_threshold=boundary_distance_threshold,
        )
        shape = self._foreground.shape
        if prompts is None:
            return _finish(np.zeros(shape, dtype="uint32"), output_mode)
        extra = dict(min_size=min_size, nms_thresh=nms_threshold, intersection_over_min=intersection_over_min) \
            if optimize_memory else {}
        predictions = batched_tiled_inference(
            self._predictor, image=None, batch_size=batch_size, image_embeddings=self._image_embeddings,
            return_instance_segmentation=False, multimasking=multimasking, mask_threshold=mask_threshold,
            optimize_memory=optimize_memory, i=self._i, **prompts, **extra,
        )
        if optimize_memory:
            return predictions
        segmentation = util.apply_nms(predictions, shape=shape, min_size=min_size, nms_thresh=nms_threshold,
                                      intersection_over_min=intersection_over_min)
        return _finish(segmentation, output_mode)
