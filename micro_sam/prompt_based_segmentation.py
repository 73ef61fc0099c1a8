"""Interactive segmentation of one object from point, box and mask prompts.

Coordinate conventions (as everywhere in micro_sam):
- points are (y, x) in pixels of the full image, one row per point;
- boxes are ``[y0, x0, y1, x1]`` with the end exclusive (the bounding box of a mask is
  ``[min_y, min_x, max_y + 1, max_x + 1]``);
- point labels are 1 (foreground) or 0 (background).
SAM itself expects (x, y) / XYXY; the conversion happens here.

Embeddings come from :func:`micro_sam.util.precompute_image_embeddings` (2D, 3D with slice index ``i``,
or tiled). With tiled embeddings the prompt is routed to the tile whose inner block contains it (the
centre of the points, box or mask), predicted there, and the mask is pasted back into a full-size array.
Without embeddings, the image already set on the predictor (``predictor.set_image``) is used.

All functions return masks of shape (C, H, W) (C = 1, or 3 with ``multimask_output``); with
``return_all=True`` they return ``(masks, scores, logits)`` where ``scores`` has shape (C',) and ``logits``
are the low resolution (C', 256, 256) mask logits of the (tile's) prediction.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from . import _tiling
from ._embeddings import set_precomputed
from .models.fast_mask_decoder import decode_prompts, upscale_masks
from ._lazy import lazy_attributes

__all__ = ["segment_from_box", "segment_from_box_and_points", "segment_from_mask", "segment_from_points"]


# Names micro_sam 1.8 exposes here (imported there from other modules), resolved on first use.
__getattr__, __dir__ = lazy_attributes(globals(), {
    "ResizeLongestSide": "segment_anything.utils.transforms:ResizeLongestSide",
    "SamPredictor": "segment_anything:SamPredictor",
    "find_boundaries": "skimage.segmentation:find_boundaries",
    "peak_local_max": "skimage.feature:peak_local_max",
})

_LOGIT_EPS = 1e-3  # mask prompts are +-log((1 - eps) / eps), i.e. sigmoid probabilities 0.999 / 0.001
_MASK_PROMPT_SIZE = 256


# --- input validation ----------------------------------------------------------------------------------
@dataclass
class _Inputs:
    """Validated prompts plus the geometry of the image they refer to."""

    shape: Tuple[int, int]  # (H, W) of the full image
    tiling: Optional[Tuple[tuple, tuple]]  # (tile_shape, halo) for tiled embeddings
    points: Optional[np.ndarray] = None  # (N, 2) float64, (y, x)
    labels: Optional[np.ndarray] = None  # (N,) int32
    box: Optional[np.ndarray] = None  # (4,) float64, [y0, x0, y1, x1], clipped to the image
    mask: Optional[np.ndarray] = None  # (H, W) bool


def _is_tiled(image_embeddings) -> bool:
    return image_embeddings.get("input_size", 0) is None


def _embedding_depth(image_embeddings) -> Optional[int]:
    """Number of slices of 3D embeddings, None for 2D ones."""
    features = image_embeddings["features"]
    if _is_tiled(image_embeddings):
        first = next(iter(features.keys()), None)
        if first is None:
            raise ValueError("The tiled image_embeddings hold no tiles.")
        features = features[first]
    return int(features.shape[0]) if len(features.shape) == 5 else None


def _validate_inputs(predictor, image_embeddings, i, points=None, labels=None, box=None, mask=None,
                     original_size=None, box_extension=0.0) -> _Inputs:
    """Check the embeddings / slice index and the prompts; return them as clean arrays.

    Raises a ValueError naming the offending argument for: a slice index without embeddings or out of
    range, points outside the image or with the wrong shape, labels not matching the points or not 0/1,
    boxes with y1 <= y0 or x1 <= x0 or outside the image, empty masks or masks of the wrong shape.
    """
    if image_embeddings is None:
        if i is not None:
            raise ValueError(
                f"A slice index i={i} was given without image_embeddings; pass the 3D embeddings from "
                "precompute_image_embeddings together with i."
            )
        if not getattr(predictor, "is_image_set", False):
            raise ValueError("The predictor has no image set: pass image_embeddings, or call predictor.set_image.")
        shape, tiling = tuple(int(s) for s in predictor.original_size), None
    else:
        if not hasattr(image_embeddings, "get") or "features" not in image_embeddings:
            raise ValueError("image_embeddings must be the dict returned by precompute_image_embeddings.")
        if _is_tiled(image_embeddings):
            attrs = image_embeddings["features"].attrs
            shape = tuple(int(s) for s in attrs["shape"])
            tiling = (tuple(int(t) for t in attrs["tile_shape"]), tuple(int(h) for h in attrs["halo"]))
        else:
            shape, tiling = tuple(int(s) for s in image_embeddings["original_size"]), None
        depth = _embedding_depth(image_embeddings)
        if depth is None and i is not None:
            raise ValueError(f"The image_embeddings are 2D, but a slice index i={i} was given; pass i=None.")
        if depth is not None:
            if i is None:
                raise ValueError(f"The image_embeddings are 3D ({depth} slices): pass the slice index i.")
            if not isinstance(i, (int, np.integer)) or not 0 <= int(i) < depth:
                raise ValueError(f"The slice index i={i!r} is out of range for 3D embeddings with {depth} slices.")
    result = _Inputs(shape=shape, tiling=tiling)

    if points is not None:
        pts = np.asarray(points, dtype="float64")
        if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
            raise ValueError(f"points must be an array of shape (N, 2) with (y, x) rows, got shape {pts.shape}.")
        if not np.isfinite(pts).all():
            raise ValueError("points contain NaN or infinite coordinates.")
        outside = (pts < 0).any(axis=1) | (pts[:, 0] >= shape[0]) | (pts[:, 1] >= shape[1])
        if outside.any():
            raise ValueError(
                f"points {pts[outside].tolist()} lie outside the image of shape {shape}; "
                "points are (y, x) with 0 <= y < height and 0 <= x < width."
            )
        if labels is None:
            raise ValueError("labels must be given together with points (1 = foreground, 0 = background).")
        lbl = np.asarray(labels)
        if lbl.ndim != 1 or len(lbl) != len(pts):
            raise ValueError(f"labels must have one entry per point ({len(pts)}), got shape {lbl.shape}.")
        if not np.isin(lbl, (0, 1)).all():
            raise ValueError(f"labels must be 0 (background) or 1 (foreground), got {np.unique(lbl).tolist()}.")
        result.points, result.labels = pts, lbl.astype("int32")
    elif labels is not None:
        raise ValueError("labels were given without points.")

    if box is not None:
        bx = np.asarray(box, dtype="float64")
        if bx.shape != (4,) or not np.isfinite(bx).all():
            raise ValueError(f"box must be four finite numbers [y0, x0, y1, x1], got {np.asarray(box).tolist()}.")
        if bx[2] <= bx[0] or bx[3] <= bx[1]:
            raise ValueError(f"box {bx.tolist()} is empty: expected [y0, x0, y1, x1] with y1 > y0 and x1 > x0.")
        clipped = np.array([max(bx[0], 0), max(bx[1], 0), min(bx[2], shape[0]), min(bx[3], shape[1])])
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            raise ValueError(f"box {bx.tolist()} lies outside the image of shape {shape}.")
        result.box = clipped

    if box_extension is None or not np.isfinite(box_extension) or box_extension < 0:
        raise ValueError(f"box_extension must be a non-negative number, got {box_extension!r}.")

    if mask is not None:
        msk = np.asarray(mask)
        if msk.ndim != 2:
            raise ValueError(f"mask must be a 2D array, got shape {msk.shape}.")
        if original_size is not None:
            original_size = tuple(int(s) for s in original_size)
            if original_size != shape:
                raise ValueError(f"original_size {original_size} does not match the image shape {shape}.")
            if msk.shape != shape:
                msk = _resize_nearest(msk != 0, shape)
        if msk.shape != shape:
            raise ValueError(
                f"mask has shape {msk.shape}, but the image has shape {shape}; pass original_size for a "
                "downsampled mask."
            )
        msk = msk != 0
        if not msk.any():
            raise ValueError("mask is empty: it needs at least one foreground pixel to derive prompts from.")
        result.mask = msk
    return result


def _resize_nearest(mask: np.ndarray, shape) -> np.ndarray:
    rows = np.minimum((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0], mask.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1], mask.shape[1] - 1).astype(int)
    return mask[np.ix_(rows, cols)]


# --- predictor state and the decoder call ----------------------------------------------------------------
def _set_embeddings(predictor, image_embeddings, i, tile_id=None) -> None:
    """Put the requested embeddings on the predictor, unless it holds exactly these already."""
    if image_embeddings is None:
        return
    key = (image_embeddings["features"], None if i is None else int(i), tile_id)
    state = getattr(predictor, "_micro_sam_prompt_state", None)
    if state is not None and state[0] is key[0] and state[1:3] == key[1:] and state[3] is predictor.features:
        return
    set_precomputed(predictor, image_embeddings, i=None if i is None else int(i), tile_id=tile_id)
    predictor._micro_sam_prompt_state = key + (predictor.features,)


def _predict(predictor, points_xy=None, labels=None, box_xyxy=None, mask_input=None,
             multimask_output=False, return_logits=False, select_best=False):
    """Same computation as ``SamPredictor.predict``; with ``select_best`` only the mask with the highest
    predicted IoU is upsampled (identical to upsampling all masks and picking it afterwards).

    Returns masks (C, H, W), scores (C',) and low resolution logits (C', 256, 256) as numpy arrays,
    with C = 1 when ``select_best``.
    """
    model, device = predictor.model, predictor.device
    size = predictor.original_size
    with torch.no_grad():
        point_prompt = None
        if points_xy is not None:
            coords = predictor.transform.apply_coords(np.asarray(points_xy, dtype="float64"), size)
            point_prompt = (torch.as_tensor(coords, dtype=torch.float, device=device)[None],
                            torch.as_tensor(labels, dtype=torch.int, device=device)[None])
        box_prompt = None
        if box_xyxy is not None:
            box = predictor.transform.apply_boxes(np.asarray(box_xyxy, dtype="float64"), size)
            box_prompt = torch.as_tensor(box, dtype=torch.float, device=device)[None]
        mask_prompt = None
        if mask_input is not None:
            mask_prompt = torch.as_tensor(mask_input, dtype=torch.float, device=device)[None]

        low_res, scores = decode_prompts(model, predictor.features, point_prompt, box_prompt, mask_prompt,
                                         multimask_output)
        chosen = low_res
        if select_best:
            best = int(torch.argmax(scores[0]))
            chosen = low_res[:, best:best + 1]
        masks = upscale_masks(model, chosen, predictor.input_size, size)
        if not return_logits:
            masks = masks > model.mask_threshold
    return masks[0].cpu().numpy(), scores[0].cpu().numpy(), low_res[0].cpu().numpy()


def _paste(masks: np.ndarray, shape, tile: Optional[_tiling.Tile]) -> np.ndarray:
    """Place the (C, h, w) masks of a tile's outer block into a (C, H, W) array of the full image."""
    if tile is None:
        return masks
    full = np.zeros((masks.shape[0],) + tuple(shape), dtype=masks.dtype)
    full[(slice(None),) + tile.outer] = masks
    return full


# --- prompt conversions ----------------------------------------------------------------------------------
def _route(inputs: _Inputs, center_yx) -> Optional[_tiling.Tile]:
    if inputs.tiling is None:
        return None
    tile_shape, halo = inputs.tiling
    return _tiling.tile_of_point(np.round(center_yx), inputs.shape, tile_shape, halo)


def _points_in_tile(points, labels, tile: Optional[_tiling.Tile]):
    """Shift points into the tile's outer block; points outside of it are dropped with a warning."""
    if tile is None or points is None:
        return points, labels
    local = points - np.asarray(tile.offset, dtype="float64")
    tile_size = [s.stop - s.start for s in tile.outer]
    inside = (local >= 0).all(axis=1) & (local[:, 0] < tile_size[0]) & (local[:, 1] < tile_size[1])
    if not inside.all():
        warnings.warn(
            f"{int((~inside).sum())} of {len(points)} points lie outside tile {tile.tile_id} (the tile the prompt "
            "was routed to) and are ignored."
        )
    return local[inside], labels[inside]


def _box_in_tile(box, tile: Optional[_tiling.Tile]):
    """Shift the box [y0, x0, y1, x1] into the tile's outer block, clipped to it."""
    if tile is None:
        return box
    (oy, ox), (h, w) = tile.offset, [s.stop - s.start for s in tile.outer]
    local = np.array([max(box[0] - oy, 0), max(box[1] - ox, 0), min(box[2] - oy, h), min(box[3] - ox, w)])
    if local[2] <= local[0] or local[3] <= local[1]:
        raise ValueError(f"box {np.asarray(box).tolist()} does not overlap tile {tile.tile_id} that the prompt "
                         "was routed to; box and points / mask must lie in the same tile.")
    return local


def _extend_box(box, shape, box_extension: float) -> np.ndarray:
    """Grow a [y0, x0, y1, x1] box (by pixels if box_extension >= 1, else by a fraction of its size),
    clip it to the image and return it rounded, as SAM's XYXY."""
    if box_extension >= 1:
        grow_y = grow_x = box_extension
    else:
        grow_y, grow_x = box_extension * (box[2] - box[0]), box_extension * (box[3] - box[1])
    xyxy = np.array([
        max(box[1] - grow_x, 0), max(box[0] - grow_y, 0), min(box[3] + grow_x, shape[1]), min(box[2] + grow_y, shape[0])
    ])
    return np.round(xyxy).astype(int)


def _box_from_mask(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    y0, y1 = np.argmax(rows), len(rows) - np.argmax(rows[::-1])
    x0, x1 = np.argmax(cols), len(cols) - np.argmax(cols[::-1])
    return np.array([y0, x0, y1, x1], dtype="float64")


def _points_from_mask(mask: np.ndarray, box_extension: float, use_single_point: bool):
    """Point prompts (y, x) from the smoothed distance to the object's boundary inside the (extended) box:
    positives at the maxima inside the object, negatives at the maxima of the background around it."""
    from scipy.ndimage import distance_transform_edt, gaussian_filter
    from skimage.feature import peak_local_max
    from skimage.segmentation import find_boundaries

    x0, y0, x1, y1 = _extend_box(_box_from_mask(mask), mask.shape, box_extension)
    crop = mask[y0:y1, x0:x1]
    # pad with background, so that an object touching the crop's border still has a boundary there
    boundary = find_boundaries(np.pad(crop, 1), mode="outer")
    distances = gaussian_filter(distance_transform_edt(~boundary), sigma=1.0)[1:-1, 1:-1]
    inner = np.where(crop, distances, 0.0)
    offset = np.array([y0, x0])
    if use_single_point:
        center = np.unravel_index(int(np.argmax(inner)), inner.shape)
        return (np.array(center) + offset)[None].astype("float64"), np.ones(1, dtype="int32")
    positives = peak_local_max(inner, min_distance=3, exclude_border=False)
    if len(positives) == 0:  # e.g. a flat distance map: take the innermost pixel
        positives = np.array([np.unravel_index(int(np.argmax(inner)), inner.shape)])
    negatives = peak_local_max(np.where(crop, 0.0, distances), min_distance=5, exclude_border=False)
    negatives = negatives.reshape(-1, 2)
    points = np.concatenate([positives, negatives]).astype("float64") + offset
    labels = np.concatenate([np.ones(len(positives), "int32"), np.zeros(len(negatives), "int32")])
    return points, labels


def _mask_to_logits(mask: np.ndarray, size: int = _MASK_PROMPT_SIZE) -> np.ndarray:
    """The binary mask as a (1, size, size) mask prompt (size = 256 for SAM's 1024 input): resized (longest side
    ``size``, antialiased), padded with background, re-binarised, and mapped to the logits of probability 1 - eps /
    eps."""
    import torch.nn.functional as F

    binary = torch.from_numpy(mask.astype("float32"))[None, None]
    h, w = mask.shape
    scale = size / max(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    if (new_h, new_w) != (h, w):
        binary = F.interpolate(binary, (new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    binary = F.pad(binary, (0, size - new_w, 0, size - new_h))[0]
    high = float(np.log((1 - _LOGIT_EPS) / _LOGIT_EPS))
    return np.where(binary.numpy() > 0.5, high, -high).astype("float32")


def _outputs(masks, scores, logits, shape, tile, return_all):
    masks = _paste(masks, shape, tile)
    return (masks, scores, logits) if return_all else masks


# --- public functions ------------------------------------------------------------------------------------
def segment_from_points(
    predictor,
    points: np.ndarray,
    labels: np.ndarray,
    image_embeddings: Optional[dict] = None,
    i: Optional[int] = None,
    multimask_output: bool = False,
    return_all: bool = False,
    use_best_multimask: Optional[bool] = None,
):
    """Segment an object from point prompts.

    Args:
        predictor: The SAM predictor.
        points: (N, 2) point coordinates (y, x) in the full image.
        labels: (N,) labels, 1 for foreground and 0 for background points.
        image_embeddings: Precomputed embeddings; None to use the image set on the predictor.
        i: Slice index for 3D embeddings.
        multimask_output: Return SAM's three masks instead of one.
        return_all: Also return the scores and the low resolution logits.
        use_best_multimask: Predict three masks and keep the one with the highest predicted IoU.
            Default (None): only for a single foreground point, where one mask is ambiguous.

    Returns:
        Boolean masks (C, H, W); with ``return_all`` also scores (C',) and logits (C', 256, 256). With
        ``use_best_multimask`` C = 1 while scores and logits hold all three predictions.
    """
    inputs = _validate_inputs(predictor, image_embeddings, i, points=points, labels=labels)
    tile = _route(inputs, inputs.points.mean(axis=0))
    points, labels = _points_in_tile(inputs.points, inputs.labels, tile)
    if len(points) == 0:
        raise ValueError(f"points {inputs.points.tolist()} are too far apart: none lies in tile "
                         f"{tile.tile_id} at their centre; prompt one tile at a time.")
    _set_embeddings(predictor, image_embeddings, i, None if tile is None else tile.tile_id)

    if use_best_multimask is None:
        use_best_multimask = len(points) == 1 and labels[0] == 1
    masks, scores, logits = _predict(
        predictor, points_xy=points[:, ::-1], labels=labels,
        multimask_output=multimask_output or use_best_multimask, select_best=use_best_multimask,
    )
    return _outputs(masks, scores, logits, inputs.shape, tile, return_all)


def segment_from_box(
    predictor,
    box: np.ndarray,
    image_embeddings: Optional[dict] = None,
    i: Optional[int] = None,
    multimask_output: bool = False,
    return_all: bool = False,
    box_extension: float = 0.0,
):
    """Segment an object from a box prompt.

    Args:
        predictor: The SAM predictor.
        box: The box [y0, x0, y1, x1] (end exclusive) in the full image; parts outside the image are clipped.
        image_embeddings: Precomputed embeddings; None to use the image set on the predictor.
        i: Slice index for 3D embeddings.
        multimask_output: Return SAM's three masks instead of one.
        return_all: Also return the scores and the low resolution logits.
        box_extension: Grow the box on each side, by this many pixels if >= 1, else by this fraction of
            its height / width.

    Returns:
        Boolean masks (C, H, W); with ``return_all`` also scores (C,) and logits (C, 256, 256).
    """
    inputs = _validate_inputs(predictor, image_embeddings, i, box=box, box_extension=box_extension)
    box = inputs.box
    tile = _route(inputs, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))
    local_box = _box_in_tile(box, tile)
    _set_embeddings(predictor, image_embeddings, i, None if tile is None else tile.tile_id)
    masks, scores, logits = _predict(
        predictor, box_xyxy=_extend_box(local_box, predictor.original_size, box_extension),
        multimask_output=multimask_output,
    )
    return _outputs(masks, scores, logits, inputs.shape, tile, return_all)


def segment_from_box_and_points(
    predictor,
    box: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
    image_embeddings: Optional[dict] = None,
    i: Optional[int] = None,
    multimask_output: bool = False,
    return_all: bool = False,
):
    """Segment an object from a box prompt together with point prompts.

    Args:
        predictor: The SAM predictor.
        box: The box [y0, x0, y1, x1] (end exclusive) in the full image.
        points: (N, 2) point coordinates (y, x) in the full image.
        labels: (N,) labels, 1 for foreground and 0 for background points.
        image_embeddings: Precomputed embeddings; None to use the image set on the predictor.
        i: Slice index for 3D embeddings.
        multimask_output: Return SAM's three masks instead of one.
        return_all: Also return the scores and the low resolution logits.

    Returns:
        Boolean masks (C, H, W); with ``return_all`` also scores (C,) and logits (C, 256, 256).
        With tiled embeddings the prompt goes to the tile at the box centre; points outside that tile's
        block are ignored (with a warning).
    """
    inputs = _validate_inputs(predictor, image_embeddings, i, points=points, labels=labels, box=box)
    box = inputs.box
    tile = _route(inputs, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))
    local_box = _box_in_tile(box, tile)
    points, labels = _points_in_tile(inputs.points, inputs.labels, tile)
    _set_embeddings(predictor, image_embeddings, i, None if tile is None else tile.tile_id)
    masks, scores, logits = _predict(
        predictor, points_xy=points[:, ::-1] if len(points) else None, labels=labels,
        box_xyxy=_extend_box(local_box, predictor.original_size, 0.0), multimask_output=multimask_output,
    )
    return _outputs(masks, scores, logits, inputs.shape, tile, return_all)


def segment_from_mask(
    predictor,
    mask: np.ndarray,
    image_embeddings: Optional[dict] = None,
    i: Optional[int] = None,
    use_box: bool = True,
    use_mask: bool = True,
    use_points: bool = False,
    original_size: Optional[Tuple[int, ...]] = None,
    multimask_output: bool = False,
    return_all: bool = False,
    return_logits: bool = False,
    box_extension: float = 0.0,
    box: Optional[np.ndarray] = None,
    points: Optional[np.ndarray] = None,
    labels: Optional[np.ndarray] = None,
    use_single_point: bool = False,
):
    """Segment an object from a mask, e.g. to propagate a segmentation to the next slice.

    Prompts derived from the mask: its bounding box (``use_box``), the mask itself resized to SAM's
    256 x 256 logits grid (``use_mask``), and points (``use_points``): foreground points at the maxima of
    the distance to the object boundary inside the object, background points at the maxima outside it
    within the (extended) box, or with ``use_single_point`` only the innermost foreground point.

    Args:
        predictor: The SAM predictor.
        mask: Binary 2D mask (non-zero = object) of the image's shape.
        image_embeddings: Precomputed embeddings; None to use the image set on the predictor.
        i: Slice index for 3D embeddings.
        use_box: Use the mask's bounding box as prompt.
        use_mask: Use the mask as mask prompt.
        use_points: Use points derived from the mask.
        original_size: The image shape (H, W), for a mask at another resolution than the image: the mask is
            resized (nearest neighbour) to it first.
        multimask_output: Return SAM's three masks instead of one.
        return_all: Also return the scores and the low resolution logits.
        return_logits: Return the high resolution logits instead of boolean masks.
        box_extension: Grow the box (by pixels if >= 1, else by a fraction of its size).
        box: A box [y0, x0, y1, x1] to use instead of the mask's bounding box.
        points: (N, 2) points (y, x) to use instead of points derived from the mask.
        labels: (N,) labels of ``points``.
        use_single_point: With ``use_points``, derive only one foreground point.

    Returns:
        Masks (C, H, W), boolean or logits; with ``return_all`` also scores (C,) and logits (C, 256, 256).
        With tiled embeddings the prompt goes to the tile at the mask's centre of mass.
    """
    if not (use_box or use_mask or use_points or box is not None or points is not None):
        raise ValueError("segment_from_mask needs a prompt: set use_box, use_mask or use_points, or pass box / points.")
    inputs = _validate_inputs(predictor, image_embeddings, i, points=points, labels=labels, box=box, mask=mask,
                              original_size=original_size, box_extension=box_extension)
    mask = inputs.mask
    tile = _route(inputs, np.argwhere(mask).mean(axis=0))
    if tile is not None:
        local_mask = mask[tile.outer]
        if local_mask.sum() < mask.sum():
            warnings.warn(f"The mask extends beyond tile {tile.tile_id} it was routed to; it is cropped to the tile.")
        if not local_mask.any():
            raise ValueError(f"The mask has no pixels in tile {tile.tile_id} at its centre of mass; it spans "
                             "several tiles. Use untiled embeddings or a larger tile_shape.")
        mask = local_mask
    _set_embeddings(predictor, image_embeddings, i, None if tile is None else tile.tile_id)

    point_coords, point_labels = None, None
    if inputs.points is not None:
        point_coords, point_labels = _points_in_tile(inputs.points, inputs.labels, tile)
    elif use_points:
        point_coords, point_labels = _points_from_mask(mask, box_extension, use_single_point)
    if point_coords is not None and len(point_coords) == 0:
        point_coords, point_labels = None, None

    box_xyxy = None
    if inputs.box is not None:
        box_xyxy = _extend_box(_box_in_tile(inputs.box, tile), mask.shape, box_extension)
    elif use_box:
        box_xyxy = _extend_box(_box_from_mask(mask), mask.shape, box_extension)

    mask_input = _mask_to_logits(mask, predictor.model.prompt_encoder.mask_input_size[0]) if use_mask else None
    masks, scores, logits = _predict(
        predictor, points_xy=None if point_coords is None else point_coords[:, ::-1], labels=point_labels,
        box_xyxy=box_xyxy, mask_input=mask_input,
        multimask_output=multimask_output, return_logits=return_logits,
    )
    return _outputs(masks, scores, logits, inputs.shape, tile, return_all)
