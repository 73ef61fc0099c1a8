"""Prompts derived from ground-truth object masks, for evaluating and training prompt-based segmentation.

Inputs are stacks of binary object masks of shape (N, 1, H, W) (torch tensors or numpy arrays, e.g. from
:func:`micro_sam.util.segmentation_to_one_hot`). Outputs follow SAM's conventions, as torch tensors:
point coordinates in (x, y) order (reversed with respect to numpy's (y, x)), boxes as XYXY
``[min_x, min_y, max_x, max_y]``. Random choices use numpy's global random state, so ``np.random.seed``
makes them reproducible.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["IterativePromptGenerator", "PointAndBoxPromptGenerator", "PromptGeneratorBase"]


def _as_numpy_masks(segmentation) -> np.ndarray:
    if torch.is_tensor(segmentation):
        segmentation = segmentation.detach().cpu().numpy()
    segmentation = np.asarray(segmentation)
    if segmentation.ndim != 4 or segmentation.shape[1] != 1:
        raise ValueError(f"segmentation must be object masks of shape (N, 1, H, W), got shape {segmentation.shape}.")
    return segmentation[:, 0] != 0


class PromptGeneratorBase:
    """Interface of the prompt generators.

    A generator is called with object masks (N, 1, H, W) and further inputs specific to it, and returns
    ``(point_coords, point_labels, boxes, mask_prompts)``: point coordinates (N, P, 2) in (x, y) order,
    point labels (N, P) (1 = foreground, 0 = background), boxes (N, 4) as XYXY and mask prompts
    (N, 1, 256, 256); each None where the generator does not produce that prompt type.
    """

    def __call__(
        self,
        segmentation: torch.Tensor,
        prediction: Optional[torch.Tensor] = None,
        bbox_coordinates: Optional[List[tuple]] = None,
        center_coordinates: Optional[List[np.ndarray]] = None,
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        raise NotImplementedError("PromptGeneratorBase is an interface; use one of its subclasses.")


class PointAndBoxPromptGenerator(PromptGeneratorBase):
    """Point and / or box prompts for each object of a ground-truth segmentation.

    Positive points lie inside the object: the given centre first (if any), then random object pixels.
    Negative points are random pixels of the ring around the object: inside the object's bounding box grown
    by ``dilation_strength`` pixels on each side, but outside the object dilated by ``dilation_strength``
    pixels (3x3 square steps). If the ring has too few pixels, the remaining negatives are random
    background pixels anywhere in the image. Boxes are the given bounding boxes in XYXY order.

    Example:
        ``centers, boxes = util.get_centers_and_bounding_boxes(segmentation)``, then for the ids ``ids``:
        ``generator(masks, [boxes[i] for i in ids], [centers[i] for i in ids])`` with
        ``masks = util.segmentation_to_one_hot(segmentation, ids)``.

    Args:
        n_positive_points: Positive points per object.
        n_negative_points: Negative points per object.
        dilation_strength: Size in pixels of the margin around the object kept free of negative points, and of
            the growth of the bounding box from which they are drawn.
        get_point_prompts: Return point prompts.
        get_box_prompts: Return box prompts.
    """

    def __init__(
        self,
        n_positive_points: int,
        n_negative_points: int,
        dilation_strength: int,
        get_point_prompts: bool = True,
        get_box_prompts: bool = False,
    ) -> None:
        if not (get_point_prompts or get_box_prompts):
            raise ValueError("Request point prompts, box prompts or both (get_point_prompts / get_box_prompts).")
        for name, value in (("n_positive_points", n_positive_points), ("n_negative_points", n_negative_points),
                            ("dilation_strength", dilation_strength)):
            if int(value) != value or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        self.n_positive_points = int(n_positive_points)
        self.n_negative_points = int(n_negative_points)
        self.dilation_strength = int(dilation_strength)
        self.get_point_prompts = get_point_prompts
        self.get_box_prompts = get_box_prompts

    def _positive_points(self, mask: np.ndarray, center) -> List[Tuple[int, int]]:
        points = []
        if center is not None and self.n_positive_points > 0:
            points.append(tuple(int(c) for c in center))
        n_random = self.n_positive_points - len(points)
        if n_random > 0:
            ys, xs = np.nonzero(mask)
            if len(ys) == 0:
                raise ValueError("An object mask is empty; every object needs at least one pixel.")
            chosen = np.random.choice(len(ys), size=n_random, replace=n_random > len(ys))
            points.extend(zip(ys[chosen].tolist(), xs[chosen].tolist()))
        return points

    def _negative_points(self, mask: np.ndarray, bbox) -> List[Tuple[int, int]]:
        from scipy.ndimage import binary_dilation

        if self.n_negative_points == 0:
            return []
        d = self.dilation_strength
        h, w = mask.shape
        y0, x0 = max(int(bbox[0]) - d, 0), max(int(bbox[1]) - d, 0)
        y1, x1 = min(int(bbox[2]) + d, h), min(int(bbox[3]) + d, w)
        crop = mask[y0:y1, x0:x1]
        if d > 0 and crop.any():
            crop = binary_dilation(crop, structure=np.ones((3, 3), bool), iterations=d)
        ys, xs = np.nonzero(~crop)
        chosen = np.random.choice(len(ys), size=min(self.n_negative_points, len(ys)), replace=False)
        points = list(zip((ys[chosen] + y0).tolist(), (xs[chosen] + x0).tolist()))

        missing = self.n_negative_points - len(points)
        if missing > 0:  # too small a ring: take background pixels from anywhere
            ys, xs = np.nonzero(~mask)
            if len(ys) < missing:
                raise ValueError(f"Cannot place {self.n_negative_points} negative points: the image has only "
                                 f"{len(ys)} background pixels outside the object.")
            chosen = np.random.choice(len(ys), size=missing, replace=False)
            points.extend(zip(ys[chosen].tolist(), xs[chosen].tolist()))
        return points

    def __call__(
        self,
        segmentation,
        bbox_coordinates: Sequence[Tuple[int, int, int, int]],
        center_coordinates: Optional[Sequence[Sequence[float]]] = None,
        **kwargs,
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], None]:
        """Generate the prompts for each object.

        Args:
            segmentation: Object masks (N, 1, H, W), torch tensor or numpy array.
            bbox_coordinates: One bounding box (y0, x0, y1, x1) (end exclusive) per object.
            center_coordinates: Optional centre (y, x) per object; used as the first positive point.
                Without them all positive points are random object pixels.

        Returns:
            Point coordinates (N, P, 2) int64 in (x, y) order with P = n_positive_points + n_negative_points,
            point labels (N, P) int64 (positives first), boxes (N, 4) int64 as XYXY, and None (no mask
            prompts). Points / boxes are None when not requested.
        """
        masks = _as_numpy_masks(segmentation)
        if len(bbox_coordinates) != len(masks):
            raise ValueError(f"Got {len(bbox_coordinates)} bounding boxes for {len(masks)} objects.")
        if center_coordinates is not None and len(center_coordinates) != len(masks):
            raise ValueError(f"Got {len(center_coordinates)} center coordinates for {len(masks)} objects.")

        coords, labels = None, None
        if self.get_point_prompts:
            centers = [None] * len(masks) if center_coordinates is None else center_coordinates
            all_points = []
            for mask, bbox, center in zip(masks, bbox_coordinates, centers):
                all_points.append(self._positive_points(mask, center) + self._negative_points(mask, bbox))
            n_points = self.n_positive_points + self.n_negative_points
            yx = np.array(all_points, dtype="int64").reshape(len(masks), n_points, 2)
            coords = torch.from_numpy(np.ascontiguousarray(yx[:, :, ::-1]))
            one_object = [1] * self.n_positive_points + [0] * self.n_negative_points
            labels = torch.tensor([one_object] * len(masks), dtype=torch.int64).reshape(len(masks), n_points)

        boxes = None
        if self.get_box_prompts:
            yxyx = np.array(bbox_coordinates, dtype="int64").reshape(len(masks), 4)
            boxes = torch.from_numpy(np.ascontiguousarray(yxyx[:, [1, 0, 3, 2]]))
        return coords, labels, boxes, None


def _sample_pixels(regions: torch.Tensor) -> torch.Tensor:
    """One uniformly random True pixel per row of ``regions`` (N, L); returns flat indices (N,).

    Rows must not be empty. The random numbers come from numpy's global random state.
    """
    counts = regions.sum(dim=1)
    draws = torch.from_numpy(np.random.random(len(counts))).to(regions.device)
    targets = (draws * counts).floor().long().clamp(max=counts - 1) + 1  # the k-th pixel, k in 1..count
    cumulative = torch.cumsum(regions.to(torch.int32), dim=1)
    return torch.searchsorted(cumulative, targets[:, None].to(torch.int32)).squeeze(1)


def _first_nonempty(candidates: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per row, the first candidate region (N, L) that has a pixel."""
    chosen = candidates[0]
    for candidate in candidates[1:]:
        empty = ~chosen.any(dim=1, keepdim=True)
        chosen = torch.where(empty, candidate, chosen)
    return chosen


def _grown_bbox_masks(objects: torch.Tensor, margin: int) -> torch.Tensor:
    """For (N, *S) masks, the masks of each object's bounding box grown by ``margin`` in every direction."""
    n, spatial = objects.shape[0], objects.shape[1:]
    result = torch.ones_like(objects)
    for axis, size in enumerate(spatial):
        other = tuple(a + 1 for a in range(len(spatial)) if a != axis)
        present = objects.any(dim=other) if other else objects  # (N, size)
        index = torch.arange(size, device=objects.device)
        first = torch.where(present, index, size).min(dim=1).values
        last = torch.where(present, index, -1).max(dim=1).values
        inside = (index[None] >= (first - margin)[:, None]) & (index[None] <= (last + margin)[:, None])
        shape = [n] + [1] * len(spatial)
        shape[axis + 1] = size
        result = result & inside.reshape(shape)
    return result


class IterativePromptGenerator(PromptGeneratorBase):
    """Corrective point prompts from the error between a prediction and the ground truth.

    For each object one positive point is sampled in the false negative region (object pixels the
    prediction misses; if there are none, in the correctly predicted object), and one negative point in
    the false positive region (predicted pixels outside the object; if there are none, in the background
    within the object's bounding box grown by 3 pixels, else anywhere in the background).
    """

    def __call__(
        self,
        segmentation: torch.Tensor,
        prediction: torch.Tensor,
        **kwargs,
    ) -> Tuple[torch.Tensor, torch.Tensor, None, None]:
        """Generate one positive and one negative point per object.

        Args:
            segmentation: Ground-truth object masks, float tensor (N, 1, H, W) or (N, 1, Z, H, W).
            prediction: Predicted masks of the same shape.

        Returns:
            Point coordinates (N, 2, 2) (or (N, 2, 3) for 3D) int64 in reversed axis order ((x, y) or
            (x, y, z)), the positive point first; labels (N, 2) = [[1, 0], ...]; None; None.
            The tensors are on the device of ``prediction``.
        """
        if not (torch.is_tensor(segmentation) and torch.is_tensor(prediction)):
            raise ValueError("segmentation and prediction must be torch tensors.")
        if segmentation.shape != prediction.shape:
            raise ValueError(f"segmentation {tuple(segmentation.shape)} and prediction {tuple(prediction.shape)} "
                             "must have the same shape.")
        if segmentation.ndim not in (4, 5) or segmentation.shape[1] != 1:
            raise ValueError("segmentation and prediction must have shape (N, 1, H, W) or (N, 1, Z, H, W), got "
                             f"{tuple(segmentation.shape)}.")
        device = prediction.device
        truth = segmentation.to(device)[:, 0] != 0
        predicted = prediction[:, 0] != 0
        n, spatial = truth.shape[0], truth.shape[1:]
        if not truth.flatten(1).any(dim=1).all():
            raise ValueError("Every object mask in segmentation needs at least one pixel.")

        false_negative, overlap = truth & ~predicted, truth & predicted
        false_positive = predicted & ~truth
        ring = _grown_bbox_masks(truth, 3) & ~truth
        background = ~truth
        if not background.flatten(1).any(dim=1).all():
            raise ValueError("An object covers the whole image: there is no background for a negative point.")

        positive = _first_nonempty([false_negative.flatten(1), overlap.flatten(1)])
        negative = _first_nonempty([false_positive.flatten(1), ring.flatten(1), background.flatten(1)])
        flat = torch.stack([_sample_pixels(positive), _sample_pixels(negative)], dim=1)  # (N, 2)
        coords = torch.stack(torch.unravel_index(flat, spatial), dim=-1)  # (N, 2, ndim) in array order
        coords = coords.flip(-1).to(torch.int64)
        labels = torch.tensor([[1, 0]] * n, dtype=torch.int64, device=device).reshape(n, 2)
        return coords, labels, None, None
