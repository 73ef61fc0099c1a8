"""The napari layers of the annotation tools (names as in micro_sam, so users find what they know).

- ``point_prompts`` (Points): positive (green) and negative (red) point prompts, property ``label``;
- ``prompts`` (Shapes): box (rectangle), ellipse and polygon prompts;
- ``current_object`` (Labels): the object segmented from the current prompts;
- ``auto_segmentation`` (Labels): the result of the automatic segmentation;
- ``committed_objects`` (Labels): the objects accepted so far (what is saved).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

POINT_LAYER = "point_prompts"
SHAPE_LAYER = "prompts"
CURRENT_OBJECT = "current_object"
AUTO_SEGMENTATION = "auto_segmentation"
COMMITTED_OBJECTS = "committed_objects"
LABEL_LAYERS = (CURRENT_OBJECT, AUTO_SEGMENTATION, COMMITTED_OBJECTS)

#: The point labels and their colours (positive: green, negative: red).
POINT_LABELS = ("positive", "negative")
LABEL_COLOR_CYCLE = ["#00FF00", "#FF0000"]


def add_prompt_layers(viewer, ndim: int, extra_properties: Optional[dict] = None) -> None:
    """Add the ``point_prompts`` and ``prompts`` layers (if missing).

    Args:
        viewer: The napari viewer.
        ndim: Dimensionality of the layers (2, or 3 for volumes / time series).
        extra_properties: Further property choices of the prompt layers, e.g. ``{"track_id": ["1"]}``.
    """
    choices = {"label": list(POINT_LABELS)}
    choices.update(extra_properties or {})
    if POINT_LAYER not in viewer.layers:
        layer = viewer.add_points(
            name=POINT_LAYER, ndim=ndim, property_choices=choices, border_color="label",
            border_color_cycle=LABEL_COLOR_CYCLE, symbol="o", face_color="transparent", border_width=0.5,
            size=12,
        )
        layer.border_color_mode = "cycle"
    if SHAPE_LAYER not in viewer.layers:
        viewer.add_shapes(name=SHAPE_LAYER, ndim=ndim, face_color="transparent", edge_color="green", edge_width=4,
                          property_choices=dict(extra_properties) if extra_properties else None)


def add_label_layers(viewer, shape: Sequence[int], scale: Optional[Sequence[float]] = None) -> None:
    """Add the label layers ``current_object``, ``auto_segmentation`` and ``committed_objects`` (if missing)."""
    for name in LABEL_LAYERS:
        if name not in viewer.layers:
            layer = viewer.add_labels(np.zeros(tuple(shape), dtype="uint32"), name=name)
            if scale is not None:
                layer.scale = tuple(scale)
    # The layers are added below the prompt layers so that prompts stay clickable on top.
    for name in (SHAPE_LAYER, POINT_LAYER):
        if name in viewer.layers:
            index = viewer.layers.index(viewer.layers[name])
            viewer.layers.move(index, len(viewer.layers))


def reset_layers(viewer, shape: Tuple[int, ...], scale: Optional[Sequence[float]] = None,
                 committed: Optional[np.ndarray] = None) -> None:
    """Give all tool layers a new image shape: empty labels (``committed`` for committed_objects), no prompts.

    Raises:
        ValueError: ``committed`` does not have the image's shape.
    """
    shape = tuple(int(s) for s in shape)
    if committed is not None:
        committed = np.asarray(committed)
        if committed.shape != shape:
            raise ValueError(f"The segmentation to load has shape {committed.shape}; the image has shape {shape}.")
    add_label_layers(viewer, shape, scale)
    for name in LABEL_LAYERS:
        layer = viewer.layers[name]
        if name == COMMITTED_OBJECTS and committed is not None:
            layer.data = committed.astype("uint32", copy=True)
        elif layer.data.shape != shape or layer.data.dtype != np.uint32 or np.any(layer.data):
            layer.data = np.zeros(shape, dtype="uint32")  # (an empty layer of this shape is kept: no redraw)
        if scale is not None and tuple(layer.scale) != tuple(scale):
            layer.scale = tuple(scale)
    for name in (POINT_LAYER, SHAPE_LAYER):
        if name in viewer.layers and scale is not None:
            viewer.layers[name].scale = tuple(scale)
    clear_prompts(viewer)


def clear_prompts(viewer, i: Optional[int] = None) -> None:
    """Remove all prompts, or only those in slice / frame ``i``."""
    if POINT_LAYER in viewer.layers:
        layer = viewer.layers[POINT_LAYER]
        if len(layer.data):
            if i is None:
                keep = np.zeros(len(layer.data), dtype=bool)
            else:
                keep = np.round(layer.data[:, 0]) != i
            if not keep.all():
                layer.selected_data = set(np.flatnonzero(~keep).tolist())
                layer.remove_selected()
    if SHAPE_LAYER in viewer.layers:
        layer = viewer.layers[SHAPE_LAYER]
        if len(layer.data):
            if i is None:
                remove = list(range(len(layer.data)))
            else:
                remove = [j for j, data in enumerate(layer.data) if np.all(np.round(data[:, 0]) == i)]
            if remove:
                layer.selected_data = set(remove)
                layer.remove_selected()


def set_point_label(points, label: str) -> None:
    """Make ``label`` ("positive" / "negative") the label of new points; existing points keep theirs.

    napari applies ``current_properties`` to the selected points too, so the selection is cleared first.
    """
    if label not in POINT_LABELS:
        raise ValueError(f"Unknown point label {label!r}; choose one of {POINT_LABELS}.")
    if str(points.current_properties["label"][0]) == label:
        return
    points.selected_data = set()
    properties = points.current_properties
    properties["label"] = np.array([label])
    points.current_properties = properties
    points.refresh_colors()


def select_layer(viewer, name: str) -> None:
    """Make the layer ``name`` the active one."""
    if name in viewer.layers:
        viewer.layers.selection.active = viewer.layers[name]
