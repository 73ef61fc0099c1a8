"""Interactive tracking: one object followed forward through the frames of a time series with SAM.

This is the step behind micro_sam's tracking annotator ("Segment All Frames"): the object is segmented (from the
user's prompts) in one or more frames; from the first of them it is followed frame by frame. In a frame without
annotation the mask of the previous frame, shifted by a smoothed estimate of the object's motion, is the prompt
for SAM (box / mask / points, as in :func:`micro_sam.multi_dimensional_segmentation.segment_mask_in_volume`).
"""
from __future__ import annotations

from numbers import Real
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage


def _center(mask: np.ndarray) -> Optional[np.ndarray]:
    coords = np.nonzero(mask)
    return None if len(coords[0]) == 0 else np.array([c.mean() for c in coords], dtype="float64")


def _frames(values, name: str, n_frames: int) -> np.ndarray:
    frames = np.atleast_1d(np.asarray([] if values is None else values))
    if frames.size and not (np.issubdtype(frames.dtype, np.integer)
                            or (np.issubdtype(frames.dtype, np.floating) and np.all(np.mod(frames, 1) == 0))):
        raise ValueError(f"{name} must be integer frame indices, got {values!r}.")
    frames = np.unique(frames.astype("int64"))
    if frames.size and (frames[0] < 0 or frames[-1] >= n_frames):
        raise ValueError(f"{name} must lie in [0, {n_frames - 1}] (the time series has {n_frames} frames), got "
                         f"{frames.tolist()}.")
    return frames


def track_mask_across_frames(
    segmentation: np.ndarray,
    predictor,
    image_embeddings,
    segmented_frames: Union[Sequence[int], np.ndarray, int],
    stop_upper: bool = False,
    iou_threshold: Optional[float] = 0.5,
    projection: Union[str, dict] = "single_point",
    motion_smoothing: float = 0.5,
    box_extension: float = 0.05,
    division_frames: Optional[Union[Sequence[int], np.ndarray]] = None,
    update_progress: Optional[Callable] = None,
    verbose: bool = False,
) -> Tuple[np.ndarray, bool]:
    """Follow one object forward in time with SAM, starting from the frames in which it is segmented.

    Starting after the first segmented frame, every following frame is processed in order: a segmented frame
    keeps its mask; any other frame is segmented with SAM from the previous frame's mask, shifted by the motion
    model, as prompt. The motion model is the displacement of the object's centroid between the two previous
    frames, exponentially smoothed: ``motion = motion_smoothing * motion + (1 - motion_smoothing) * displacement``
    (no shift for the first two frames after the start). Tracking stops

    - at a division frame (the object divides there: its mask in that frame, if any, is kept, and
      ``has_division`` is True; the daughters are tracked as new objects from the next frame),
    - after the last segmented frame, as soon as the new mask overlaps the shifted previous mask with an IoU
      below ``iou_threshold`` (the object left or SAM lost it; that frame stays empty),
    - at the last segmented frame if ``stop_upper`` is True (it marks where the object ends; it stays as given),
    - when the mask becomes empty after the last segmented frame, or at the end of the time series (an empty mask
      before a later segmented frame leaves the frames up to it empty; tracking resumes from that frame).

    This mirrors the tracking step of micro_sam 1.8's tracking annotator; the caller turns the prompts of the
    annotated frames into masks first (e.g. with :mod:`micro_sam.prompt_based_segmentation`).

    Args:
        segmentation: The object's mask over time, shape (T, Y, X), non-zero in the segmented frames. Not
            modified.
        predictor: The Segment Anything predictor.
        image_embeddings: The embeddings of the time series (:func:`micro_sam.util.precompute_image_embeddings`
            with ``ndim=3``; may be tiled).
        segmented_frames: The frames in which the object is segmented (or, with ``stop_upper``, ends).
        stop_upper: Whether the last segmented frame marks the end of the object.
        iou_threshold: Minimal IoU in [0, 1] between the shifted previous and the new mask to continue after the
            last segmented frame; None: continue to the end of the time series.
        projection: How the previous mask becomes the prompt: 'box', 'mask', 'points', 'points_and_mask',
            'single_point' or a dict with the boolean keys 'use_box', 'use_mask', 'use_points' (see
            :func:`micro_sam.multi_dimensional_segmentation.segment_mask_in_volume`).
        motion_smoothing: The weight in [0, 1] of the previous motion estimate (0: only the last displacement).
        box_extension: Relative enlargement of the box prompt.
        division_frames: Segmented frames in which the user marked the object as dividing (a mark in the first
            segmented frame has no effect: tracking starts after it).
        update_progress: Called with 1 after every frame segmented with SAM.
        verbose: Print the progress of the tracking.

    Returns:
        The mask over time, shape (T, Y, X), uint32, 1 where the object is (segmented frames as given, 0 after the
            end of the track).
        Whether the track ended in a division.

    Raises:
        ValueError: For a segmentation that is not (T, Y, X), frames outside it, no segmented frame, or an invalid
            threshold, smoothing or projection.
    """
    from ..multi_dimensional_segmentation import _segment_from_mask, _validate_projection

    segmentation = np.asarray(segmentation)
    if segmentation.ndim != 3:
        raise ValueError(f"segmentation must be a mask over time of shape (T, Y, X), got shape {segmentation.shape}.")
    n_frames = segmentation.shape[0]
    frames = _frames(segmented_frames, "segmented_frames", n_frames)
    if frames.size == 0:
        raise ValueError("segmented_frames must name at least one frame in which the object is segmented.")
    divisions = set(_frames(division_frames, "division_frames", n_frames).tolist())
    if not divisions <= set(frames.tolist()):
        raise ValueError(f"division_frames {sorted(divisions)} must be segmented frames (a division is marked on the "
                         f"object's mask in that frame); segmented_frames: {frames.tolist()}.")
    if iou_threshold is not None and (isinstance(iou_threshold, bool) or not isinstance(iou_threshold, Real)
                                      or not 0 <= iou_threshold <= 1):
        raise ValueError(f"iou_threshold must be None or a number in [0, 1], got {iou_threshold!r}.")
    if isinstance(motion_smoothing, bool) or not isinstance(motion_smoothing, Real) or not 0 <= motion_smoothing <= 1:
        raise ValueError(f"motion_smoothing must be a number in [0, 1], got {motion_smoothing!r}.")
    use_box, use_mask, use_points, use_single_point = _validate_projection(projection)
    update = update_progress if update_progress is not None else (lambda n: None)

    result = (segmentation != 0).astype("uint32")
    annotated = set(frames.tolist())
    t0, t_last = int(frames[0]), int(frames[-1])
    motion = None
    has_division = False
    for t in range(t0 + 1, n_frames):
        if stop_upper and t == t_last:
            break
        if t >= t0 + 2:  # the displacement between the two previous frames updates the motion model
            c1, c2 = _center(result[t - 1]), _center(result[t - 2])
            if c1 is not None and c2 is not None:
                move = c1 - c2
                motion = move if motion is None else motion_smoothing * motion + (1 - motion_smoothing) * move
        if t in annotated:
            if t in divisions:
                has_division = True
                if verbose:
                    print(f"The object divides in frame {t}.")
                break
            continue
        previous = result[t - 1] != 0
        if motion is not None:
            previous = ndimage.shift(previous, motion, order=0, prefilter=False)
        if not previous.any():  # lost: wait for the next segmented frame, or end the track
            if t < t_last:
                continue
            break
        mask = _segment_from_mask(
            predictor, previous, image_embeddings=image_embeddings, i=t, use_box=use_box, use_mask=use_mask,
            use_points=use_points, box_extension=box_extension, use_single_point=use_single_point,
        )
        mask = np.asarray(mask).reshape(previous.shape) != 0
        update(1)
        if t > t_last and iou_threshold is not None:
            union = np.logical_or(previous, mask).sum()
            iou = np.logical_and(previous, mask).sum() / union if union else 0.0
            if iou < iou_threshold:
                if verbose:
                    print(f"Tracking stopped at frame {t}: IoU {iou:.3f} < {iou_threshold}.")
                break
        if verbose:
            print(f"Tracked the object into frame {t}.")
        result[t] = mask
    return result, has_division
