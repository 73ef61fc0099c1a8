"""Quality of single-point prompts: the IoU of SAM's mask for one click inside each annotated object.

The click is placed where a person would put it: at the object's pixel farthest from its boundary (the maximum of
the object's Euclidean distance transform; ties go to the first pixel in C order), so that it lies inside the
object even where the centroid would not (crescents, rings). All objects of an image are prompted in batches
through the mask decoder; with ``multimask_output=True`` the mask with the highest predicted IoU is kept.
"""
from typing import Dict, Optional

import numpy as np
from scipy import ndimage

__all__ = ["object_interior_points", "point_prompt_ious", "point_prompt_masks"]


def object_interior_points(labels: np.ndarray) -> Dict[int, tuple]:
    """For each object of a 2D label image, its pixel farthest from the background or another object.

    Args:
        labels: (H, W) instance labels, 0 = background.

    Returns:
        Object id -> (y, x) pixel coordinates.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"Expected a 2D label image, got shape {labels.shape}.")
    points = {}
    for object_id, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        # pad by one so that an object touching the image border has its boundary there
        mask = np.pad(labels[box] == object_id, 1)
        distance = ndimage.distance_transform_edt(mask)
        y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
        points[object_id] = (int(y - 1 + box[0].start), int(x - 1 + box[1].start))
    return points


def point_prompt_masks(
    predictor,
    image: np.ndarray,
    labels: np.ndarray,
    image_embeddings: Optional[dict] = None,
    multimask_output: bool = True,
    batch_size: int = 32,
) -> Dict[int, np.ndarray]:
    """The mask predicted from one positive point per object (at :func:`object_interior_points`), for every object.

    Args:
        predictor: A segment_anything ``SamPredictor`` (e.g. from :func:`micro_sam.util.get_sam_model`).
        image: The (H, W) or (H, W, 3) image.
        labels: Its (H, W) instance labels, 0 = background.
        image_embeddings: Precomputed embeddings of ``image`` (:func:`micro_sam.util.precompute_image_embeddings`);
            computed when None.
        multimask_output: Predict three masks per point and keep the one with the highest predicted IoU.
        batch_size: Prompts per pass through the mask decoder.

    Returns:
        Object id -> (H, W) bool mask.
    """
    import torch

    from ..models.fast_mask_decoder import predict_torch
    from ..util import precompute_image_embeddings, set_precomputed

    labels = np.asarray(labels)
    if labels.shape != np.asarray(image).shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {np.asarray(image).shape} differ in shape.")
    if image_embeddings is None:
        image_embeddings = precompute_image_embeddings(predictor, image, verbose=False)
    set_precomputed(predictor, image_embeddings)
    points = object_interior_points(labels)
    ids = list(points)
    masks_by_id = {}
    for start in range(0, len(ids), batch_size):
        batch = ids[start:start + batch_size]
        coords_xy = np.array([[points[i][1], points[i][0]] for i in batch], dtype="float32")[:, None]
        coords = predictor.transform.apply_coords(coords_xy, labels.shape)
        coords = torch.as_tensor(coords, dtype=torch.float32, device=predictor.device)
        point_labels = torch.ones(coords.shape[:2], dtype=torch.int64, device=predictor.device)
        with torch.no_grad():
            masks, scores, _ = predict_torch(predictor, coords, point_labels, multimask_output=multimask_output)
        best = scores.argmax(dim=1)
        masks = masks[torch.arange(len(batch)), best].cpu().numpy()
        masks_by_id.update(zip(batch, masks))
    return masks_by_id


def point_prompt_ious(
    predictor,
    image: np.ndarray,
    labels: np.ndarray,
    image_embeddings: Optional[dict] = None,
    multimask_output: bool = True,
    batch_size: int = 32,
) -> Dict[int, float]:
    """The IoU of the mask predicted from one positive point per object, for every object of ``labels``.

    Args:
        predictor: A segment_anything ``SamPredictor`` (e.g. from :func:`micro_sam.util.get_sam_model`).
        image: The (H, W) or (H, W, 3) image.
        labels: Its (H, W) instance labels, 0 = background.
        image_embeddings: Precomputed embeddings of ``image`` (:func:`micro_sam.util.precompute_image_embeddings`);
            computed when None.
        multimask_output: Predict three masks per point and keep the one with the highest predicted IoU.
        batch_size: Prompts per pass through the mask decoder.

    Returns:
        Object id -> IoU of its predicted mask with the annotation.
    """
    from ..util import compute_iou

    labels = np.asarray(labels)
    masks = point_prompt_masks(predictor, image, labels, image_embeddings, multimask_output, batch_size)
    return {object_id: compute_iou(mask, labels == object_id) for object_id, mask in masks.items()}
