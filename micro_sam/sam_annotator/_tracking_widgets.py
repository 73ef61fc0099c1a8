"""The widgets of the tracking annotator: track menu, segment frame, track object, automatic tracking, commit, clear.

The tracking tool (:class:`~micro_sam.sam_annotator.annotator_tracking.AnnotatorTracking`) keeps the lineage of
the object being annotated: ``tool.current_track_id`` (the track that new prompts belong to), ``tool.lineage``
(``{track id: [daughter track ids]}``, starting with ``{1: []}``), ``tool.committed_lineages`` (the lineages of
all committed tracks, in committed ids) and ``tool.auto_lineages`` (the lineages of ``auto_segmentation`` after
automatic tracking). Prompts carry the properties ``track_id`` (which track) and ``state`` ("track" or
"division": a division point marks the first frame in which the track's object is seen as two daughters).
"""

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..multi_dimensional_segmentation import PROJECTION_MODES
from . import _commit, _layers
from . import util as vutil
from ._background import show_error, show_info, show_warning
from ._widgets import _commit_attrs, _Snapshot, commit_widget, current_slice

#: The track states of a prompt and their face colours (track: cyan, division: magenta).
TRACK_STATES = ("track", "division")
STATE_COLOR_CYCLE = ["#00FFFF", "#FF00FF"]
TRACKS_LAYER = "tracks"


# --- prompt layer properties and the tracking menu -----------------------------------------------------------
def set_current_property(layer, name: str, value: str) -> None:
    """Make ``value`` the property ``name`` of new prompts in ``layer``; existing prompts keep theirs.

    The property column is made a plain (non-categorical) column first, so that new track ids can be set; the
    selection is cleared because napari applies ``current_properties`` to the selected prompts too.
    """
    features = layer.features
    if name not in features:
        return
    properties = {key: np.array(values, dtype=object) for key, values in layer.current_properties.items()}
    categorical = [key for key in features if str(features[key].dtype) == "category"]
    if categorical:  # (the defaults are lost when the columns change type; they are set again below)
        layer.features = features.astype({key: object for key in categorical})
    elif str(properties[name][0]) == value:
        return
    layer.selected_data = set()
    properties[name] = np.array([value], dtype=object)
    layer.current_properties = properties
    if hasattr(layer, "refresh_colors"):
        layer.refresh_colors()


def _menu(container, name: str):
    for widget in container:
        if widget.name == name:
            return widget
    raise ValueError(f"The tracking menu has no entry {name!r}.")


def create_tracking_menu(points_layer, box_layer, states: Sequence[str] = TRACK_STATES,
                         track_ids: Sequence[int] = (1,), tracking_widget=None, on_track_id_changed=None):
    """The drop-downs 'track_state' and 'track_id' for new prompts, kept in sync with the prompt layers.

    Choosing a state or track id sets it for new prompts; selecting a point (napari then shows its properties)
    shows its state and track id in the menu.

    Args:
        points_layer: The ``point_prompts`` layer (properties ``label``, ``state``, ``track_id``).
        box_layer: The ``prompts`` (shapes) layer (property ``track_id``).
        states: The track states ("track", "division").
        track_ids: The track ids to offer.
        tracking_widget: A menu created before (e.g. for layers the user deleted and the tool re-created); it
            is connected to the given layers instead of creating a new one.
        on_track_id_changed: Called with the new track id (int) when the menu's track id changes.

    Returns:
        The menu (a magicgui ``Container`` with the ComboBoxes ``track_state`` and ``track_id``).
    """
    from magicgui.widgets import ComboBox, Container

    if tracking_widget is None:
        tracking_widget = Container(widgets=[
            ComboBox(name="track_state", label="track_state", choices=list(states), value=states[0],
                     tooltip="The state of new point prompts: 'track' follows the object; 'division' marks the "
                             "first frame in which it has divided (tracking stops before it)."),
            ComboBox(name="track_id", label="track_id", choices=[str(t) for t in track_ids],
                     tooltip="The track that new prompts belong to (daughters get new ids after a division)."),
        ])
    state_menu, id_menu = _menu(tracking_widget, "track_state"), _menu(tracking_widget, "track_id")

    def layer_changed(event=None):
        properties = points_layer.current_properties
        if "state" in properties and str(properties["state"][0]) in state_menu.choices:
            state_menu.value = str(properties["state"][0])
        if "track_id" in properties and str(properties["track_id"][0]) in id_menu.choices:
            id_menu.value = str(properties["track_id"][0])

    def state_changed(value):
        if value is not None:
            set_current_property(points_layer, "state", str(value))

    def track_id_changed(value):
        if value is None:
            return
        for layer in (points_layer, box_layer):
            set_current_property(layer, "track_id", str(value))
        if on_track_id_changed is not None:
            on_track_id_changed(int(value))

    points_layer.events.current_properties.connect(layer_changed)
    state_menu.changed.connect(state_changed)
    id_menu.changed.connect(track_id_changed)
    state_changed(state_menu.value)
    track_id_changed(id_menu.value)
    return tracking_widget


def prepare_prompt_layers(tool) -> None:
    """Colour the points by track state and connect the tracking menu to the (possibly re-created) layers."""
    viewer = tool.viewer
    points, shapes = viewer.layers[_layers.POINT_LAYER], viewer.layers[_layers.SHAPE_LAYER]
    if getattr(tool, "_menu_layers", None) == (id(points), id(shapes)):
        return
    try:
        points.face_color_cycle = STATE_COLOR_CYCLE
        points.face_color = "state"
        points.face_color_mode = "cycle"
    except (KeyError, ValueError, AttributeError):  # pragma: no cover - colouring only
        pass
    widget = tool.widgets.get("tracking") if hasattr(tool, "widgets") else None
    menu = create_tracking_menu(points, shapes, TRACK_STATES, sorted(tool.lineage), tracking_widget=widget,
                                on_track_id_changed=tool._set_current_track_id)
    tool._tracking_menu = menu
    tool._menu_layers = (id(points), id(shapes))


def set_track_choices(tool, select: Optional[int] = None) -> None:
    """Offer the track ids of the current lineage in the menu (and select ``select``, else keep the current one)."""
    menu = tool._tracking_menu
    id_menu = _menu(menu, "track_id")
    choices = [str(t) for t in sorted(tool.lineage)]
    current = str(select if select is not None else tool.current_track_id)
    id_menu.choices = choices
    id_menu.value = current if current in choices else choices[0]
    tool._set_current_track_id(int(id_menu.value))
    if select is not None:
        _menu(menu, "track_state").value = "track"


def reset_lineage(tool) -> None:
    """Start a new lineage: track 1 without daughters, selected in the menu."""
    tool.lineage = {1: []}
    tool.current_track_id = 1
    if getattr(tool, "_tracking_menu", None) is not None:
        set_track_choices(tool, select=1)


def add_daughters(tool, mother: int) -> List[int]:
    """Record a division of track ``mother``: two new daughter tracks (new ids) in the lineage; returns them."""
    first = max(tool.lineage) + 1
    daughters = [first, first + 1]
    tool.lineage[mother] = daughters
    for daughter in daughters:
        tool.lineage[daughter] = []
    set_track_choices(tool, select=daughters[0])
    return daughters


# --- segment a frame and track the object -----------------------------------------------------------------------
def segment_frame(tool) -> bool:
    """Segment the current track's object in the current frame from its prompts into ``current_object``."""
    if not tool.ready(restore_layers=True):
        return False
    viewer, state, track_id = tool.viewer, tool.state, tool.current_track_id
    t = current_slice(viewer)
    shape = state.image_shape[1:]
    boxes, masks = vutil.shape_layer_to_prompts(viewer.layers[_layers.SHAPE_LAYER], shape, i=t, track_id=track_id)
    points, labels = vutil.point_layer_to_prompts(viewer.layers[_layers.POINT_LAYER], i=t, track_id=track_id,
                                                  with_stop_annotation=False)
    problem = vutil.prompt_problem(len(points), len(boxes), multiple_box_prompts=False)
    if problem is not None:
        show_warning(f"Frame {t}, track {track_id}: {problem}")
        return False
    mask = vutil.prompt_segmentation(state.predictor, points, labels, boxes, masks, shape, multiple_box_prompts=False,
                                     image_embeddings=state.image_embeddings, i=t)
    layer = viewer.layers[_layers.CURRENT_OBJECT]
    frame = layer.data[t]
    frame[frame == track_id] = 0
    frame[np.asarray(mask) != 0] = track_id
    layer.refresh()
    return True


def division_frames(points_layer, track_id: int) -> List[int]:
    """The frames in which points of track ``track_id`` are marked as 'division'."""
    data = np.asarray(points_layer.data)
    if len(data) == 0 or "state" not in points_layer.properties:
        return []
    states = np.asarray(points_layer.properties["state"]).astype(str)
    ids = np.asarray(points_layer.properties["track_id"]).astype(str)
    selected = (states == "division") & (ids == str(track_id))
    return sorted({int(t) for t in np.round(data[selected, 0])})


def track_object_widget(tool):
    """The 'Track Object [Shift-S]' widget: follow the current track from its prompts forward (in the background)."""
    from magicgui import magicgui

    from ..multi_dimensional_segmentation import track_mask_across_frames

    @magicgui(
        call_button="Track Object [Shift-S]",
        projection={"choices": list(PROJECTION_MODES),
                    "tooltip": "How the mask of one frame prompts the next: box, mask, points, points_and_mask or "
                               "single_point."},
        iou_threshold={"min": 0.0, "max": 1.0, "step": 0.05,
                       "tooltip": "After the last annotated frame, stop when the new mask overlaps the (shifted) "
                                  "previous one less."},
        box_extension={"min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Enlarge the box prompt by this fraction."},
        motion_smoothing={"min": 0.0, "max": 1.0, "step": 0.05,
                          "tooltip": "Weight of the previous motion estimate (0: only the last displacement)."},
    )
    def track_object(projection: str = "single_point", iou_threshold: float = 0.5, box_extension: float = 0.05,
                     motion_smoothing: float = 0.5):
        if not tool.ready(restore_layers=True):
            return None
        state, viewer, track_id = tool.state, tool.viewer, tool.current_track_id
        points, shapes = (_Snapshot(viewer.layers[name]) for name in (_layers.POINT_LAYER, _layers.SHAPE_LAYER))
        divisions = division_frames(viewer.layers[_layers.POINT_LAYER], track_id)
        shape = state.image_shape

        def work(pbar_init, pbar_update):
            pbar_init(shape[0], f"Track object {track_id}")
            segmentation, frames, _, stop_upper = vutil.segment_slices_with_prompts(
                state.predictor, points, shapes, state.image_embeddings, shape, track_id=track_id,
                update_progress=pbar_update,
            )
            marked = [t for t in divisions if t in set(frames.tolist())]
            result, has_division = track_mask_across_frames(
                segmentation, state.predictor, state.image_embeddings, frames, stop_upper=stop_upper,
                iou_threshold=iou_threshold, projection=projection, motion_smoothing=motion_smoothing,
                box_extension=box_extension, division_frames=marked, update_progress=pbar_update,
            )
            if has_division:  # the mother ends before the frame in which it is seen divided
                result[min(t for t in marked if t > frames[0]):] = 0
            return result, has_division

        def done(output):
            result, has_division = output
            layer = viewer.layers[_layers.CURRENT_OBJECT]
            data = layer.data
            data[data == track_id] = 0
            data[result != 0] = track_id
            layer.refresh()
            if has_division and not tool.lineage.get(track_id):
                daughters = add_daughters(tool, track_id)
                show_info(f"Track {track_id} divides: annotate its daughters as tracks {daughters[0]} and "
                          f"{daughters[1]} (selected: {daughters[0]}).")

        return tool.tasks.run(work, f"Track object {track_id}", on_returned=done)

    track_object._long_running = True
    return track_object


# --- automatic tracking ---------------------------------------------------------------------------------------
def auto_track_widget(tool):
    """The 'Automatic Tracking' widget: segment every frame automatically, then link the objects into tracks."""
    from magicgui.widgets import CheckBox, ComboBox

    from ._embedding_widget import AutoSegmentWidget

    class AutoTrackWidget(AutoSegmentWidget):
        def __init__(self):
            super().__init__(tool, volumetric=True)
            self.apply_to_volume.value = False  # (the current frame, when not tracking)
            self.apply_to_volume.visible = self.min_extent.visible = False
            self.insert(0, CheckBox(name="run_tracking", value=True, text="Track Timeseries",
                                    tooltip="Segment and link all frames (else: segment the current frame)."))
            self.insert(1, ComboBox(name="tracking_model", value="general_2d",
                                    choices=["general_2d", "ctc", "overlap"],
                                    tooltip="trackastra's model (when trackastra is installed and its model can be "
                                            "had; else the overlap linker is used), or micro_sam's overlap linker "
                                            "(no weights)."))
            self.gap_closing.value = 0
            self.gap_closing.tooltip = ("Fill in objects missed in up to this many frames (closing along time) "
                                        "before linking; 0: none (the linkers bridge short gaps themselves).")
            self.run_button.text = "Automatic Tracking"

        def __call__(self):
            if not self.run_tracking.value:
                self.apply_to_volume.value = False
                return super().__call__()
            if not tool.ready():
                return None
            state, viewer = tool.state, tool.viewer
            self._on_image_changed()
            kwargs, min_size = self._generate_kwargs(), self.min_object_size.value
            gap_closing, model = self.gap_closing.value or None, self.tracking_model.value

            def work(pbar_init, pbar_update):
                from ..multi_dimensional_segmentation import track_across_frames

                n_frames = state.image_shape[0]
                pbar_init(n_frames, "Segment frames")
                frames = np.zeros(state.image_shape, dtype="uint32")
                for t in range(n_frames):
                    frames[t] = state.segment_automatically(t, min_size, **kwargs)
                    pbar_update(1)
                return track_across_frames(state.image, frames, gap_closing=gap_closing, tracking_model=model,
                                           verbose=False, pbar_init=pbar_init, pbar_update=pbar_update)

            def done(output):
                segmentation, lineages = output
                viewer.layers[_layers.AUTO_SEGMENTATION].data = np.asarray(segmentation).astype("uint32")
                tool.auto_lineages = [dict(lineage) for lineage in lineages]
                _layers.select_layer(viewer, _layers.AUTO_SEGMENTATION)
                if not np.any(segmentation):
                    show_warning("The automatic tracking found no objects; try a smaller 'min_object_size'.")

            return tool.tasks.run(work, "Automatic tracking", on_returned=done)

    return AutoTrackWidget()


# --- commit and clear -------------------------------------------------------------------------------------------
def remap_lineages(lineages: Sequence[Dict[int, List[int]]], mapping: Dict[int, int]) -> List[Dict[int, List[int]]]:
    """The lineages in new ids (``mapping`` old -> new); tracks without a new id are left out, empty lineages too."""
    result = []
    for lineage in lineages:
        remapped = {mapping[int(parent)]: [mapping[int(c)] for c in children if int(c) in mapping]
                    for parent, children in lineage.items() if int(parent) in mapping}
        if remapped:
            result.append(remapped)
    return result


def update_tracks_layer(viewer, segmentation: np.ndarray, lineages) -> None:
    """Show the committed tracks (centroid per frame and division graph) in napari's ``tracks`` layer."""
    from ..multi_dimensional_segmentation import get_napari_track_data

    track_data, graph = get_napari_track_data(segmentation, lineages)
    if TRACKS_LAYER in viewer.layers:
        layer = viewer.layers[TRACKS_LAYER]
        if len(track_data):
            layer.data, layer.graph = track_data, graph
        else:
            viewer.layers.remove(layer)
    elif len(track_data):
        viewer.add_tracks(track_data, graph=graph, name=TRACKS_LAYER)


def _lineages_to_json(lineages) -> list:
    return [{str(k): [int(c) for c in v] for k, v in lineage.items()} for lineage in lineages]


def _lineages_from_json(lineages) -> List[Dict[int, List[int]]]:
    return [{int(k): [int(c) for c in v] for k, v in lineage.items()} for lineage in lineages or []]


def commit_tracks(tool, layer: str = _layers.CURRENT_OBJECT, preserve_mode: str = "objects",
                  preservation_threshold: float = 0.75, commit_path: Optional[Path] = None) -> bool:
    """Add the tracks of ``layer`` (with their lineage) to ``committed_objects`` and the ``tracks`` layer.

    The tracks get new ids after the largest committed one; the lineage is translated to them and appended to
    ``tool.committed_lineages`` (and to the commit file's attribute ``committed_lineages``). Afterwards a new
    lineage starts (track 1). Returns whether anything was committed.
    """
    from ._widgets import _history_entry

    viewer, state = tool.viewer, tool.state
    tool.require_layers()
    segmentation = np.asarray(viewer.layers[layer].data)
    if not segmentation.any():
        hint = "track an object first (Shift-S)" if layer == _layers.CURRENT_OBJECT else \
            "run the automatic tracking first"
        show_warning(f"Nothing to commit: the layer {layer!r} is empty; {hint}.")
        return False
    if layer == _layers.CURRENT_OBJECT:
        lineages = [tool.lineage]
    else:
        present = np.unique(segmentation[segmentation != 0]).tolist()
        lineages = tool.auto_lineages if tool.auto_lineages is not None else [{int(t): []} for t in present]
    committed_layer = viewer.layers[_layers.COMMITTED_OBJECTS]
    try:
        merged, written, mapping = _commit.merge_into_committed(committed_layer.data, segmentation, preserve_mode,
                                                                preservation_threshold)
        new_lineages = remap_lineages(lineages, mapping)
        committed_lineages = list(tool.committed_lineages) + new_lineages
        if commit_path is not None and str(commit_path) not in ("", "."):
            _commit.check_commit_path(commit_path, state.data_signature, merged.shape)
            attrs = {**_commit_attrs(state), "committed_lineages": _lineages_to_json(committed_lineages)}
            _commit.write_commit(commit_path, merged, written, attrs, _history_entry(tool, layer, mapping))
    except (ValueError, OSError) as error:
        show_error(f"The tracks were not committed: {error}")
        return False
    committed_layer.data = merged
    tool.committed_lineages = committed_lineages
    if layer == _layers.CURRENT_OBJECT:
        vutil.clear_annotations(viewer)
    else:
        auto = viewer.layers[layer]
        auto.data = np.zeros(auto.data.shape, dtype=auto.data.dtype)
        tool.auto_lineages = None
    update_tracks_layer(viewer, merged, committed_lineages)
    reset_lineage(tool)
    if not mapping:
        show_info("The tracks were already committed (preserve_mode='objects'); nothing new was added.")
    return True


def load_commit_path(tool, commit_path) -> bool:
    """Load the committed tracks and lineages saved at ``commit_path`` for the current movie."""
    from ._widgets import load_commit_path as load_objects

    if not load_objects(tool, commit_path):
        return False
    import zarr

    attrs = zarr.open_group(str(commit_path), mode="r").attrs
    tool.committed_lineages = _lineages_from_json(attrs.get("committed_lineages"))
    update_tracks_layer(tool.viewer, tool.viewer.layers[_layers.COMMITTED_OBJECTS].data, tool.committed_lineages)
    return True


def commit_tracks_widget(tool):
    """The 'Commit [C]' widget of the tracking tool (tracks and their lineages)."""
    return commit_widget(tool, commit_tracks, load_commit_path, what="tracks",
                         path_tooltip="A zarr folder where every commit (tracks and lineages) is saved; tracks of "
                                      "this movie found there are loaded.")


def clear_tracks_widget(tool):
    """The 'Clear Annotations [Shift-C]' widget: all frames (and a new lineage) or only the current frame."""
    from magicgui import magicgui

    @magicgui(call_button="Clear Annotations [Shift-C]")
    def clear(all_frames: bool = True) -> None:
        if all_frames:
            vutil.clear_annotations(tool.viewer)
            reset_lineage(tool)
        else:
            vutil.clear_annotations_slice(tool.viewer, current_slice(tool.viewer))

    return clear
