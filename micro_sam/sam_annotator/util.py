"""Prompts from napari layers, segmentation from those prompts, and small helpers of the annotation tools.

Coordinates: napari layers hold points as (y, x) for 2D and (z, y, x) for 3D / time series, in data (pixel)
coordinates; micro_sam's prompt functions take points (y, x) and boxes [y0, x0, y1, x1].
"""
from __future__ import annotations

import argparse
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from .. import prompt_based_segmentation as _prompts
from . import _layers
from ._layers import CURRENT_OBJECT, clear_prompts, set_point_label

#: The colours of positive (green) and negative (red) point prompts.
LABEL_COLOR_CYCLE = _layers.LABEL_COLOR_CYCLE

__all__ = [
    "clear_annotations", "clear_annotations_slice", "point_layer_to_prompts", "prompt_layer_to_state",
    "prompt_layers_to_state", "prompt_segmentation", "segment_slices_with_prompts", "shape_layer_to_prompts",
    "toggle_label",
]


# --- small helpers ---------------------------------------------------------------------------------------
def toggle_label(prompts) -> None:
    """Switch the label of new points in a point prompt layer between "positive" and "negative".

    Points that exist keep their label.

    Args:
        prompts: The napari points layer (``point_prompts``).
    """
    current = str(prompts.current_properties["label"][0])
    set_point_label(prompts, "negative" if current == "positive" else "positive")


def clear_annotations(viewer, clear_segmentations: bool = True) -> None:
    """Remove all prompts and (optionally) the ``current_object`` segmentation.

    Args:
        viewer: The napari viewer with the annotation layers.
        clear_segmentations: Also empty the ``current_object`` layer.
    """
    clear_prompts(viewer)
    if clear_segmentations and CURRENT_OBJECT in viewer.layers:
        layer = viewer.layers[CURRENT_OBJECT]
        layer.data = np.zeros(layer.data.shape, dtype=layer.data.dtype)


def clear_annotations_slice(viewer, i: int, clear_segmentations: bool = True) -> None:
    """Remove the prompts of slice / frame ``i`` and (optionally) its ``current_object`` segmentation.

    Args:
        viewer: The napari viewer with the annotation layers (3D).
        i: The slice index.
        clear_segmentations: Also empty slice ``i`` of the ``current_object`` layer.
    """
    clear_prompts(viewer, i=int(i))
    if clear_segmentations and CURRENT_OBJECT in viewer.layers:
        layer = viewer.layers[CURRENT_OBJECT]
        layer.data[int(i)] = 0
        layer.refresh()


# --- prompts from layers ---------------------------------------------------------------------------------
def _select_frame(data_z: np.ndarray, i: Optional[int]) -> np.ndarray:
    return np.ones(len(data_z), dtype=bool) if i is None else np.round(data_z) == i


def _track_ids(layer, n: int) -> np.ndarray:
    values = layer.properties.get("track_id", None)
    if values is None or len(values) != n:
        raise ValueError(f"The layer {layer.name!r} has no 'track_id' property for each of its {n} prompts.")
    return np.array([int(v) for v in values])


def point_layer_to_prompts(
    layer, i: Optional[int] = None, track_id: Optional[int] = None, with_stop_annotation: bool = True,
) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Point prompts for SAM from a napari points layer.

    Args:
        layer: The points layer (property ``label``: "positive" / "negative").
        i: The slice / frame (for 3D layers); None for 2D layers.
        track_id: Only the points of this track (property ``track_id``; tracking).
        with_stop_annotation: Return None when the selection is a single negative point (the "stop" signal
            that ends a 3D object or a track at this slice).

    Returns:
        The points (N, 2) as (y, x) and their labels (N,) (1 = positive, 0 = negative); None for a stop
        annotation.

    Raises:
        ValueError: The layer's dimensionality does not fit ``i``.
    """
    points = np.asarray(layer.data, dtype="float64")
    labels = np.asarray(layer.properties.get("label", np.zeros(0)))
    if len(points) == 0:
        points = np.zeros((0, 2 if i is None else 3))
    expected = 2 if i is None else 3
    if points.shape[1] != expected:
        raise ValueError(f"The points layer {layer.name!r} is {points.shape[1]}D; "
                         f"{'pass the slice index i' if i is None else 'i is only valid'} for 3D layers.")
    selection = _select_frame(points[:, 0], i) if i is not None else np.ones(len(points), dtype=bool)
    if track_id is not None and len(points):
        selection &= _track_ids(layer, len(points)) == int(track_id)
    this_points = points[selection][:, -2:]
    this_labels = np.array([1 if label == "positive" else 0 for label in labels[selection]], dtype="int64")
    if with_stop_annotation and len(this_points) == 1 and this_labels[0] == 0:
        return None
    return this_points, this_labels


def _shape_to_prompt(data: np.ndarray, shape_type: str, image_shape: Tuple[int, int]):
    """(box [y0, x0, y1, x1], mask or None) for one napari shape; None for unsupported shapes."""
    from skimage import draw

    box = np.array([data[:, 0].min(), data[:, 1].min(), data[:, 0].max(), data[:, 1].max()])
    if shape_type == "rectangle":
        return box, None
    if shape_type == "ellipse":
        center = data.mean(axis=0)
        radius_y, radius_x = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
        rr, cc = draw.ellipse(center[0], center[1], radius_y, radius_x, shape=image_shape)
    elif shape_type == "polygon":
        rr, cc = draw.polygon(data[:, 0], data[:, 1], shape=image_shape)
    else:
        return None
    mask = np.zeros(image_shape, dtype=bool)
    mask[rr, cc] = True
    return box, mask


def shape_layer_to_prompts(
    layer, shape: Tuple[int, int], i: Optional[int] = None, track_id: Optional[int] = None,
) -> Tuple[List[np.ndarray], List[Optional[np.ndarray]]]:
    """Box prompts (and mask prompts) for SAM from a napari shapes layer.

    Rectangles give a box; ellipses and polygons give their bounding box and their filled mask. Other shapes
    (lines, paths) are ignored with a warning.

    Args:
        layer: The shapes layer (``prompts``).
        shape: The (Y, X) shape of the image (slice).
        i: The slice / frame (for 3D layers); None for 2D layers.
        track_id: Only the shapes of this track (property ``track_id``; tracking).

    Returns:
        The boxes [y0, x0, y1, x1] and, for each, a boolean (Y, X) mask or None.
    """
    shape = tuple(int(s) for s in shape[-2:])
    data, types = list(layer.data), list(layer.shape_type)
    selected = range(len(data))
    if i is not None:
        selected = [j for j in selected if np.all(np.round(data[j][:, 0]) == i)]
    if track_id is not None and len(data):
        ids = _track_ids(layer, len(data))
        selected = [j for j in selected if ids[j] == int(track_id)]
    boxes, masks = [], []
    for j in selected:
        prompt = _shape_to_prompt(np.asarray(data[j])[:, -2:], types[j], shape)
        if prompt is None:
            warnings.warn(f"Shape type {types[j]!r} cannot be a prompt and is ignored; use rectangles, "
                          "ellipses or polygons.")
            continue
        boxes.append(prompt[0])
        masks.append(prompt[1])
    return boxes, masks


def prompt_layer_to_state(prompt_layer, i: int) -> str:
    """The track state in frame ``i`` from a points layer with the property ``state`` (tracking).

    Returns:
        "division" if any point in frame ``i`` is marked as division, else "track".
    """
    points = np.asarray(prompt_layer.data)
    if len(points) == 0:
        return "track"
    states = np.asarray(prompt_layer.properties["state"])
    in_frame = _select_frame(points[:, 0], i)
    return "division" if np.any(states[in_frame] == "division") else "track"


def prompt_layers_to_state(point_layer, box_layer, i: int) -> str:
    """The track state in frame ``i`` from a points and a shapes layer with the property ``state`` (tracking).

    Returns:
        "division" if any point or shape in frame ``i`` is marked as division, else "track".
    """
    if prompt_layer_to_state(point_layer, i) == "division":
        return "division"
    states = box_layer.properties.get("state", [])
    for data, state in zip(box_layer.data, states):
        if np.all(np.round(data[:, 0]) == i) and state == "division":
            return "division"
    return "track"


# --- segmentation from prompts ----------------------------------------------------------------------------
def prompt_problem(n_points: int, n_boxes: int, multiple_box_prompts: bool) -> Optional[str]:
    """Why a combination of prompts cannot be segmented as one request (None if it can)."""
    if n_points == 0 and n_boxes == 0:
        return "There are no prompts: add points to 'point_prompts' or boxes to 'prompts' first."
    if n_points > 0 and n_boxes > 1:
        return (f"Points together with {n_boxes} boxes cannot be segmented: with point prompts use at most one "
                "box (one object), or use boxes only.")
    if n_points == 0 and n_boxes > 1 and not multiple_box_prompts:
        return f"{n_boxes} boxes were given, but here only one object can be segmented at a time."
    return None


def _batched_segmentation(predictor, points, labels, boxes, image_embeddings, i, shape) -> np.ndarray:
    """One object per positive point and per box; every negative point is added to each prompt."""
    segmentation = np.zeros(shape, dtype="uint32")
    negative = points[labels == 0]
    requests = [(None, point) for point in points[labels == 1]] + [(box, None) for box in boxes]
    for object_id, (box, point) in enumerate(requests, start=1):
        these_points = negative if point is None else np.concatenate([point[None], negative])
        these_labels = np.zeros(len(these_points), dtype="int64")
        if point is not None:
            these_labels[0] = 1
        if box is not None and len(these_points):
            mask = _prompts.segment_from_box_and_points(predictor, box, these_points, these_labels,
                                                        image_embeddings=image_embeddings, i=i)
        elif box is not None:
            mask = _prompts.segment_from_box(predictor, box, image_embeddings=image_embeddings, i=i)
        else:
            mask = _prompts.segment_from_points(predictor, these_points, these_labels,
                                                image_embeddings=image_embeddings, i=i)
        segmentation[np.asarray(mask).reshape(shape)] = object_id
    return segmentation


def prompt_segmentation(
    predictor,
    points: np.ndarray,
    labels: np.ndarray,
    boxes: Sequence[np.ndarray],
    masks: Sequence[Optional[np.ndarray]],
    shape: Tuple[int, int],
    multiple_box_prompts: bool,
    image_embeddings: Optional[dict] = None,
    i: Optional[int] = None,
    box_extension: float = 0.0,
    batched: Optional[bool] = None,
    previous_segmentation: Optional[np.ndarray] = None,
) -> Optional[np.ndarray]:
    """Segment the object(s) given by the prompts of one image or slice.

    Points (with at most one box) segment one object (``segment_from_points`` /
    ``segment_from_box_and_points``, or ``segment_from_mask`` for an ellipse / polygon); boxes alone segment
    one object each (ids 1, 2, ...). With ``batched`` every positive point and every box is its own object.

    Args:
        predictor: The SAM predictor.
        points: (N, 2) points (y, x).
        labels: (N,) point labels (1 positive, 0 negative).
        boxes: Boxes [y0, x0, y1, x1].
        masks: For each box, a (Y, X) mask (ellipse / polygon prompt) or None.
        shape: The (Y, X) shape of the image (slice).
        multiple_box_prompts: Allow more than one box (one object each).
        image_embeddings: The embeddings (see ``micro_sam.util.precompute_image_embeddings``).
        i: The slice index for 3D embeddings.
        box_extension: Relative enlargement of the boxes of mask prompts.
        batched: Segment every positive point and every box as a separate object.
        previous_segmentation: Unused; kept for micro_sam compatibility.

    Returns:
        The (Y, X) uint32 segmentation (object ids from 1), or None when the prompts cannot be segmented
        (see :func:`prompt_problem`; a warning says why).
    """
    points = np.asarray(points, dtype="float64").reshape(-1, 2)
    labels = np.asarray(labels, dtype="int64").reshape(-1)
    if len(points) != len(labels):
        raise ValueError(f"points ({len(points)}) and labels ({len(labels)}) must have the same length.")
    shape = tuple(int(s) for s in shape[-2:])
    if batched and (len(points) or len(boxes)):
        return _batched_segmentation(predictor, points, labels, boxes, image_embeddings, i, shape)
    problem = prompt_problem(len(points), len(boxes), multiple_box_prompts)
    if problem is not None:
        warnings.warn(problem)
        return None
    segmentation = np.zeros(shape, dtype="uint32")
    if len(points):
        box = boxes[0] if boxes else None
        mask = masks[0] if boxes else None
        if mask is not None:
            prediction = _prompts.segment_from_mask(predictor, mask, image_embeddings=image_embeddings, i=i,
                                                    box=box, points=points, labels=labels)
        elif box is not None:
            prediction = _prompts.segment_from_box_and_points(predictor, box, points, labels,
                                                              image_embeddings=image_embeddings, i=i)
        else:
            prediction = _prompts.segment_from_points(predictor, points, labels, image_embeddings=image_embeddings,
                                                      i=i)
        segmentation[np.asarray(prediction).reshape(shape)] = 1
        return segmentation
    for object_id, (box, mask) in enumerate(zip(boxes, masks), start=1):
        if mask is None:
            prediction = _prompts.segment_from_box(predictor, box, image_embeddings=image_embeddings, i=i)
        else:
            prediction = _prompts.segment_from_mask(predictor, mask, image_embeddings=image_embeddings, i=i,
                                                    box=box, box_extension=box_extension)
        segmentation[np.asarray(prediction).reshape(shape)] = object_id
    return segmentation


def _prompted_slices(point_prompts, box_prompts, track_id: Optional[int]) -> np.ndarray:
    points = np.asarray(point_prompts.data)
    z_points = np.round(points[:, 0]) if len(points) else np.zeros(0)
    if track_id is not None and len(points):
        z_points = z_points[_track_ids(point_prompts, len(points)) == int(track_id)]
    shapes = list(box_prompts.data)
    z_boxes = np.array([np.round(data[0, 0]) for data in shapes])
    if track_id is not None and len(shapes):
        z_boxes = z_boxes[_track_ids(box_prompts, len(shapes)) == int(track_id)]
    return np.unique(np.concatenate([z_points, z_boxes])).astype("int64")


def segment_slices_with_prompts(
    predictor,
    point_prompts,
    box_prompts,
    image_embeddings: dict,
    shape: Tuple[int, int, int],
    track_id: Optional[int] = None,
    update_progress: Optional[Callable[[int], None]] = None,
) -> Tuple[np.ndarray, np.ndarray, bool, bool]:
    """Segment one object in every slice of a volume that has prompts (the first step of 3D segmentation).

    A slice whose only prompt is one negative point is a stop annotation: if it is the lowest (highest)
    prompted slice, the object ends there (``stop_lower`` / ``stop_upper``); in between it is ignored.

    Args:
        predictor: The SAM predictor.
        point_prompts: The 3D points layer.
        box_prompts: The 3D shapes layer.
        image_embeddings: The 3D embeddings of the volume.
        shape: The volume shape (Z, Y, X).
        track_id: Only the prompts of this track (tracking).
        update_progress: Called with 1 after each slice.

    Returns:
        The (Z, Y, X) uint32 segmentation (1 = object) in the prompted slices, the indices of the segmented
        slices, and ``stop_lower``, ``stop_upper``.

    Raises:
        ValueError: A slice's prompts cannot be segmented (message names the slice), or no prompts.
    """
    if len(shape) != 3:
        raise ValueError(f"shape must be a volume shape (Z, Y, X), got {tuple(shape)}.")
    segmentation = np.zeros(tuple(shape), dtype="uint32")
    slices = _prompted_slices(point_prompts, box_prompts, track_id)
    if len(slices) == 0:
        raise ValueError("There are no prompts: add points or boxes in at least one slice.")
    update_progress = update_progress or (lambda n: None)
    stop_lower = stop_upper = False
    segmented = []
    for z in slices.tolist():
        boxes, masks = shape_layer_to_prompts(box_prompts, shape[1:], i=z, track_id=track_id)
        prompts = point_layer_to_prompts(point_prompts, i=z, track_id=track_id, with_stop_annotation=not boxes)
        if prompts is None:  # a stop annotation
            if len(slices) == 1:
                raise ValueError(f"Slice {z} only has a stop annotation (one negative point); add a positive "
                                 "point or a box in the slices where the object is.")
            if z == slices[0]:
                stop_lower = True
                segmented.append(z)
            elif z == slices[-1]:
                stop_upper = True
                segmented.append(z)
            else:
                warnings.warn(f"The stop annotation (one negative point) in slice {z} lies between other "
                              "prompted slices and is ignored.")
            update_progress(1)
            continue
        points, labels = prompts
        problem = prompt_problem(len(points), len(boxes), multiple_box_prompts=False)
        if problem is not None:
            raise ValueError(f"Slice {z}: {problem}")
        segmentation[z] = prompt_segmentation(predictor, points, labels, boxes, masks, shape[1:],
                                              multiple_box_prompts=False, image_embeddings=image_embeddings, i=z)
        segmented.append(z)
        update_progress(1)
    return segmentation, np.array(segmented, dtype="int64"), stop_lower, stop_upper


# --- command line ---------------------------------------------------------------------------------------------
def _initialize_parser(description: str, with_segmentation_result: bool = True,
                       with_instance_segmentation: bool = True) -> argparse.ArgumentParser:
    """The common options of the annotator command lines (micro_sam's names)."""
    from .. import util

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-i", "--input", required=True,
                        help="The image file (tif, png, ...), or a container (zarr, n5, hdf5) with --key.")
    parser.add_argument("-k", "--key", help="The dataset inside a container file.")
    parser.add_argument("-e", "--embedding_path",
                        help="A zarr folder for the image embeddings: they are computed once and reused when the "
                             "tool is opened again (recommended).")
    if with_segmentation_result:
        parser.add_argument("-s", "--segmentation_result",
                            help="A segmentation to load into 'committed_objects' (to correct it or to continue); "
                                 "same formats as --input.")
        parser.add_argument("-sk", "--segmentation_key", help="The dataset of the segmentation in a container.")
    parser.add_argument("--commit_path",
                        help="A zarr folder where every commit is saved; when it holds annotations of this image "
                             "they are loaded, so interrupted work continues.")
    parser.add_argument("-m", "--model_type", default=util._DEFAULT_MODEL,
                        help=f"The model: one of {', '.join(util.get_model_names())} (vit_t_demo works offline); "
                             "with --checkpoint its architecture.")
    parser.add_argument("-c", "--checkpoint", default=None, help="A model checkpoint file to load.")
    parser.add_argument("--decoder_path", default=None, help="A separate checkpoint of the AIS decoder.")
    parser.add_argument("-d", "--device", default=None, help="'cpu', 'cuda', 'mps'; default: the best available.")
    parser.add_argument("--tile_shape", nargs=2, type=int, default=None, metavar=("Y", "X"),
                        help="Tile shape for tiled embeddings of large images.")
    parser.add_argument("--halo", nargs=2, type=int, default=None, metavar=("Y", "X"),
                        help="Overlap of the tiles (with --tile_shape).")
    if with_instance_segmentation:
        parser.add_argument("--precompute_amg_state", action="store_true",
                            help="Also compute the automatic segmentation state at start (slower start, instant "
                                 "automatic segmentation).")
        parser.add_argument("--prefer_decoder", action="store_false",
                            help="Pass this flag to use AMG even if the model has a decoder for AIS.")
    return parser
