"""The widgets of the annotation tools: prompts, segment, segment volume, commit, clear.

Each factory takes the tool (an ``_AnnotatorBase``: ``viewer``, ``state``, ``tasks``) and returns a magicgui
widget. A widget reads its values and the prompt layers, calls the library (``micro_sam.sam_annotator.util``,
``micro_sam.multi_dimensional_segmentation``) and puts the result into a layer; problems are shown as napari
notifications (and on the command line) and change nothing.
"""

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np

from ..multi_dimensional_segmentation import PROJECTION_MODES
from . import _commit, _layers
from . import util as vutil
from ._background import show_error, show_info, show_warning


def current_slice(viewer) -> int:
    """The index of the slice shown in the viewer (data coordinates of the annotation layers)."""
    layer = viewer.layers[_layers.CURRENT_OBJECT]
    position = layer.world_to_data(viewer.dims.point)
    return int(np.clip(np.round(position[0]), 0, layer.data.shape[0] - 1))


@contextmanager
def _one_torch_thread():
    """Run a click's segmentation (prompt encoder and mask decoder: a few ms of work) on one torch thread.

    On a busy 2-core host, torch's thread pool waits for a descheduled thread at every operation: the same call
    took 2 s with 2 threads and 60 ms with one (benchmarks/README.md); the masks are identical. Only used while
    no background task runs (the thread count is process-wide).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Snapshot:
    """A copy of a prompt layer's data (for use in a worker thread while the user keeps editing)."""

    def __init__(self, layer):
        self.name = layer.name
        self.data = [np.array(d) for d in layer.data] if isinstance(layer.data, list) else np.array(layer.data)
        self.properties = {key: np.array(value) for key, value in layer.properties.items()}
        self.shape_type = list(getattr(layer, "shape_type", []))


# --- prompt label menu ------------------------------------------------------------------------------------
def prompt_menu(tool):
    """A drop-down for the label of new points (positive / negative), kept in sync with the T key."""
    from magicgui.widgets import ComboBox, Container

    points = tool.viewer.layers[_layers.POINT_LAYER]
    menu = ComboBox(label="prompt", choices=list(_layers.POINT_LABELS),
                    tooltip="The label of new point prompts: positive (object) or negative (background) [T].")

    def layer_changed(event=None):
        label = str(points.current_properties["label"][0])
        if label != menu.value:
            menu.value = label

    def menu_changed(label):
        _layers.set_point_label(points, label)

    points.events.current_properties.connect(layer_changed)
    menu.changed.connect(menu_changed)
    return Container(widgets=[menu])


# --- interactive segmentation ----------------------------------------------------------------------------
def segment_2d(tool, batched: bool = False) -> bool:
    """Segment the object(s) of the current prompts in a 2D tool into ``current_object``."""
    if not tool.ready(restore_layers=True):
        return False
    viewer, state = tool.viewer, tool.state
    shape = state.image_shape
    boxes, masks = vutil.shape_layer_to_prompts(viewer.layers[_layers.SHAPE_LAYER], shape)
    points, labels = vutil.point_layer_to_prompts(viewer.layers[_layers.POINT_LAYER], with_stop_annotation=False)
    problem = None if batched and (len(points) or boxes) else vutil.prompt_problem(len(points), len(boxes), True)
    if problem is not None:
        show_warning(problem)
        return False
    with _one_torch_thread():
        segmentation = vutil.prompt_segmentation(
            state.predictor, points, labels, boxes, masks, shape, multiple_box_prompts=True,
            image_embeddings=state.image_embeddings, batched=batched,
        )
    viewer.layers[_layers.CURRENT_OBJECT].data = segmentation
    return True


def segment_slice(tool) -> bool:
    """Segment the object of the prompts in the current slice of a 3D tool into that slice of ``current_object``."""
    if not tool.ready(restore_layers=True):
        return False
    viewer, state = tool.viewer, tool.state
    z = current_slice(viewer)
    shape = state.image_shape[1:]
    boxes, masks = vutil.shape_layer_to_prompts(viewer.layers[_layers.SHAPE_LAYER], shape, i=z)
    prompts = vutil.point_layer_to_prompts(viewer.layers[_layers.POINT_LAYER], i=z, with_stop_annotation=not boxes)
    if prompts is None:  # a stop annotation: nothing to segment in this slice
        show_info(f"Slice {z} has a stop annotation (one negative point): the object ends here.")
        return False
    points, labels = prompts
    problem = vutil.prompt_problem(len(points), len(boxes), multiple_box_prompts=False)
    if problem is not None:
        show_warning(f"Slice {z}: {problem}")
        return False
    with _one_torch_thread():
        segmentation = vutil.prompt_segmentation(state.predictor, points, labels, boxes, masks, shape,
                                                 multiple_box_prompts=False,
                                                 image_embeddings=state.image_embeddings, i=z)
    layer = viewer.layers[_layers.CURRENT_OBJECT]
    layer.data[z] = segmentation
    layer.refresh()
    return True


def segment_widget(tool):
    """The 'Segment Object [S]' widget of the 2D tool."""
    from magicgui import magicgui

    @magicgui(call_button="Segment Object [S]",
              batched={"tooltip": "Segment every positive point and every box as its own object."})
    def segment(batched: bool = False) -> None:
        segment_2d(tool, batched=batched)

    return segment


def segment_slice_widget(tool):
    """The 'Segment Slice [S]' widget of the 3D tool."""
    from magicgui import magicgui

    @magicgui(call_button="Segment Slice [S]")
    def segment() -> None:
        segment_slice(tool)

    return segment


def segment_nd_widget(tool):
    """The 'Segment All Slices [Shift-S]' widget: propagate the object through the volume (in the background)."""
    from magicgui import magicgui

    from ..multi_dimensional_segmentation import segment_mask_in_volume

    @magicgui(
        call_button="Segment All Slices [Shift-S]",
        projection={"choices": list(PROJECTION_MODES),
                    "tooltip": "How the mask of one slice prompts the next: box, mask (box + mask), points, "
                               "points_and_mask or single_point."},
        iou_threshold={"min": 0.0, "max": 1.0, "step": 0.05,
                       "tooltip": "Stop following the object when the masks of adjacent slices overlap less."},
        box_extension={"min": 0.0, "max": 1.0, "step": 0.01,
                       "tooltip": "Enlarge the projected box by this fraction of its size."},
    )
    def segment_nd(projection: str = "single_point", iou_threshold: float = 0.5, box_extension: float = 0.05):
        if not tool.ready(restore_layers=True):
            return None
        state, viewer = tool.state, tool.viewer
        points, shapes = (_Snapshot(viewer.layers[name]) for name in (_layers.POINT_LAYER, _layers.SHAPE_LAYER))
        shape = state.image_shape

        def work(pbar_init, pbar_update):
            pbar_init(shape[0], "Segment object in volume")
            segmentation, slices, stop_lower, stop_upper = vutil.segment_slices_with_prompts(
                state.predictor, points, shapes, state.image_embeddings, shape, update_progress=pbar_update,
            )
            return segment_mask_in_volume(
                segmentation, state.predictor, state.image_embeddings, slices, stop_lower, stop_upper,
                iou_threshold=iou_threshold, projection=projection, box_extension=box_extension,
                update_progress=pbar_update,
            )

        def done(result):
            segmentation, z_range = result
            state.z_range = tuple(int(z) for z in z_range)
            viewer.layers[_layers.CURRENT_OBJECT].data = segmentation.astype("uint32")

        return tool.tasks.run(work, "Segment object in volume", on_returned=done)

    segment_nd._long_running = True
    return segment_nd


# --- commit and clear ---------------------------------------------------------------------------------------
def commit_objects(tool, layer: str = _layers.CURRENT_OBJECT, preserve_mode: str = "objects",
                   preservation_threshold: float = 0.75, commit_path: Optional[Path] = None) -> bool:
    """Add the objects of ``layer`` to ``committed_objects`` (and to the commit file); returns success.

    Nothing changes (and a message says why) when the layer is empty or the commit file cannot be written.
    """
    viewer, state = tool.viewer, tool.state
    if layer not in viewer.layers:
        tool.require_layers()
        show_error(f"The layer {layer!r} was removed from the viewer; there is nothing to commit.")
        return False
    tool.require_layers()
    segmentation = np.asarray(viewer.layers[layer].data)
    if not segmentation.any():
        hint = "segment an object first (press S)" if layer == _layers.CURRENT_OBJECT else \
            "run the automatic segmentation first"
        show_warning(f"Nothing to commit: the layer {layer!r} is empty; {hint}.")
        return False
    committed_layer = viewer.layers[_layers.COMMITTED_OBJECTS]
    try:
        merged, written, mapping = _commit.merge_into_committed(committed_layer.data, segmentation, preserve_mode,
                                                                preservation_threshold)
        if commit_path is not None and str(commit_path) not in ("", "."):
            _commit.check_commit_path(commit_path, state.data_signature, merged.shape)
            _commit.write_commit(commit_path, merged, written, _commit_attrs(state),
                                 _history_entry(tool, layer, mapping), _committed_prompts(viewer, layer, mapping))
    except (ValueError, OSError) as error:
        show_error(f"The objects were not committed: {error}")
        return False
    committed_layer.data = merged
    if layer == _layers.CURRENT_OBJECT:
        vutil.clear_annotations(viewer)
        state.z_range = None
    else:
        auto = viewer.layers[layer]
        auto.data = np.zeros(auto.data.shape, dtype=auto.data.dtype)
    if not mapping:
        show_info("The objects were already committed (preserve_mode='objects'); nothing new was added.")
    return True


def _commit_attrs(state) -> dict:
    return {
        "data_signature": state.data_signature,
        "model_type": getattr(state.predictor, "model_type", None),
        "model_name": state.model_name,
        "tile_shape": None if state.tile_shape is None else [int(t) for t in state.tile_shape],
        "halo": None if state.halo is None else [int(h) for h in state.halo],
    }


def _history_entry(tool, layer: str, mapping: dict) -> dict:
    entry = {"layer": layer, "object_ids": sorted(int(v) for v in mapping.values())}
    widget = tool.widgets.get("autosegment" if layer == _layers.AUTO_SEGMENTATION else "segment_nd")
    if widget is not None:
        entry["settings"] = widget_settings(widget)
    return entry


def widget_settings(widget) -> dict:
    """The values of a magicgui container's widgets (nested containers included) as plain JSON values."""
    settings = {}
    for child in widget:
        if hasattr(child, "__iter__") and not hasattr(child, "value"):
            if not getattr(child, "_inactive", False):  # e.g. the AMG settings while AIS is used
                settings.update(widget_settings(child))
            continue
        value = getattr(child, "value", None)
        if isinstance(value, (bool, int, float, str)):
            settings[child.name] = value
        elif isinstance(value, tuple):
            settings[child.name] = list(value)
    return settings


def _committed_prompts(viewer, layer: str, mapping: dict) -> Optional[dict]:
    """The prompts of a single interactively committed object (batched commits are not attributed)."""
    if layer != _layers.CURRENT_OBJECT or len(mapping) != 1:
        return None
    points = viewer.layers[_layers.POINT_LAYER]
    labels = np.array([1 if label == "positive" else 0 for label in points.properties.get("label", [])])
    shapes = viewer.layers[_layers.SHAPE_LAYER].data
    arrays = {"point_prompts": np.asarray(points.data, dtype="float64"), "point_labels": labels.astype("int64")}
    if len(shapes) and len({len(s) for s in shapes}) == 1:
        arrays["prompts"] = np.stack(shapes).astype("float64")
    return {next(iter(mapping.values())): arrays}


def load_commit_path(tool, commit_path) -> bool:
    """Load the committed objects saved at ``commit_path`` for the current image (to continue work)."""
    state, viewer = tool.state, tool.viewer
    if commit_path is None or str(commit_path) in ("", ".") or state.data_signature is None:
        return False
    try:
        committed = _commit.load_committed(commit_path, state.data_signature)
    except ValueError as error:
        show_error(str(error))
        return False
    if committed is None:
        return False
    layer = viewer.layers[_layers.COMMITTED_OBJECTS]
    if committed.shape != layer.data.shape:
        show_error(f"The commits in {str(commit_path)!r} have shape {committed.shape}; the image has shape "
                   f"{layer.data.shape}. They were not loaded.")
        return False
    if layer.data.any() and not np.array_equal(layer.data, committed):
        show_warning(f"'committed_objects' is not empty, so the commits in {str(commit_path)!r} were not loaded; "
                     "new commits are added to that file.")
        return False
    layer.data = committed.astype("uint32")
    n_objects = len(np.unique(committed)) - int(0 in committed)
    show_info(f"Loaded {n_objects} committed objects from {str(commit_path)!r}.")
    return True


def commit_widget(tool, commit_function=None, load_function=None, what: str = "objects",
                  path_tooltip: str = "A zarr folder where every commit is saved; annotations of this image found "
                                      "there are loaded, so interrupted work continues."):
    """The 'Commit [C]' widget: ``commit_function(tool, layer, preserve_mode, preservation_threshold,
    commit_path)`` on the button (default :func:`commit_objects`), ``load_function(tool, commit_path)`` when the
    path or the image changes (default :func:`load_commit_path`); ``what`` and ``path_tooltip`` name what is
    committed in the tooltips (the tracking tool commits tracks)."""
    from magicgui import magicgui

    commit_function = commit_objects if commit_function is None else commit_function
    load_function = load_commit_path if load_function is None else load_function

    @magicgui(
        call_button="Commit [C]",
        layer={"choices": [_layers.CURRENT_OBJECT, _layers.AUTO_SEGMENTATION],
               "tooltip": f"The layer whose {what} are added to 'committed_objects'."},
        preserve_mode={"choices": list(_commit.PRESERVE_MODES),
                       "tooltip": f"objects: do not add {what} that were committed already; pixels: never "
                                  "overwrite committed pixels; none: overwrite them."},
        preservation_threshold={"min": 0.0, "max": 1.0, "step": 0.05},
        commit_path={"mode": "d", "tooltip": path_tooltip},
    )
    def commit(layer: str = _layers.CURRENT_OBJECT, preserve_mode: str = "objects",
               preservation_threshold: float = 0.75, commit_path: Optional[Path] = None) -> None:
        commit_function(tool, layer, preserve_mode, preservation_threshold, commit_path)

    commit.commit_path.changed.connect(lambda path: load_function(tool, path))
    commit._on_image_changed = lambda: load_function(tool, commit.commit_path.value)
    return commit


def clear_widget(tool):
    """The 'Clear Annotations [Shift-C]' widget of the 2D tool."""
    from magicgui import magicgui

    @magicgui(call_button="Clear Annotations [Shift-C]")
    def clear() -> None:
        vutil.clear_annotations(tool.viewer)

    return clear


def clear_volume_widget(tool):
    """The 'Clear Annotations [Shift-C]' widget of the 3D tool (all slices or the current one)."""
    from magicgui import magicgui

    @magicgui(call_button="Clear Annotations [Shift-C]")
    def clear(all_slices: bool = True) -> None:
        if all_slices:
            vutil.clear_annotations(tool.viewer)
            tool.state.z_range = None
        else:
            vutil.clear_annotations_slice(tool.viewer, current_slice(tool.viewer))

    return clear
