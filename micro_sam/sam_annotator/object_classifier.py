"""The object classifier: sort the objects of a segmentation into classes from a few annotated examples.

The user paints (or scribbles) class ids 1, 2, ... into the ``annotations`` layer on some objects of a
segmentation, presses 'Train and Predict', and every object gets a class in the ``prediction`` layer. The work is
done by :mod:`micro_sam.object_classification`: object features from the SAM image embeddings (area and mean
embedding), a scikit-learn random forest trained on the annotated objects, and the prediction painted into the
objects. The classifier is exported as an ``.npz`` file of arrays (no pickle), which
:func:`micro_sam.object_classification.run_prediction_with_object_classifier` applies to further images.

:func:`image_series_object_classifier` goes through a list of images: the annotated objects of all images seen
so far train the classifier, and the predictions, the classifier and the collected features / labels are saved
in an output folder.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import object_classification as oc
from .. import util
from . import _embedding_widget
from ._annotator import _AnnotatorBase, show_or_return
from ._background import show_error, show_info, show_warning
from ._state import AnnotatorState, spatial_shape

ANNOTATIONS = "annotations"
PREDICTION = "prediction"
SEGMENTATION = "segmentation"
#: Random forest settings of the tool (as in micro_sam 1.8).
RF_KWARGS = {"n_estimators": 200, "max_depth": 10}


@dataclass
class ObjectClassifierState(AnnotatorState):
    """The annotator state plus what the classifier needs.

    Attributes:
        object_features: (N, F) features of the objects of the current segmentation, or None.
        seg_ids: (N,) their object ids.
        features_key: Which segmentation (layer name, shape, content hash) the features belong to.
        object_rf: The trained random forest (``sklearn.ensemble.RandomForestClassifier``) or None.
        previous_features: (M, F) features of objects annotated on earlier images of a series, or None.
        previous_labels: (M,) their classes.
    """

    object_features: Optional[np.ndarray] = None
    seg_ids: Optional[np.ndarray] = None
    features_key: Optional[tuple] = None
    object_rf: Any = None
    previous_features: Optional[np.ndarray] = None
    previous_labels: Optional[np.ndarray] = None

    def _set_image(self, *args) -> None:
        super()._set_image(*args)
        self.object_features = self.seg_ids = self.features_key = None

    def object_features_for(self, segmentation: np.ndarray, name: str = SEGMENTATION,
                            verbose: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """The (seg_ids, features) of ``segmentation`` on the current embeddings, computed once per content.

        Raises:
            ValueError: No embeddings, a segmentation of another shape, or one without objects.
        """
        if not self.initialized_for_interactive_segmentation():
            raise ValueError("The image embeddings are not computed yet: press 'Compute Embeddings' first.")
        segmentation = np.asarray(segmentation)
        if segmentation.shape != tuple(self.image_shape):
            raise ValueError(f"The segmentation {name!r} has shape {segmentation.shape}; the image has shape "
                             f"{tuple(self.image_shape)}.")
        key = (name, segmentation.shape, hashlib.sha1(np.ascontiguousarray(segmentation).view("uint8")).hexdigest())
        if key != self.features_key:
            seg_ids, features = oc.compute_object_features(self.image_embeddings, segmentation, verbose=verbose)
            self.seg_ids, self.object_features, self.features_key = seg_ids, features, key
        return self.seg_ids, self.object_features

    def add_previous(self, features: np.ndarray, labels: np.ndarray) -> None:
        """Keep the annotated objects (label != 0) of an image for training on the next images."""
        keep = np.asarray(labels) != 0
        if not keep.any():
            return
        features, labels = np.asarray(features)[keep], np.asarray(labels)[keep]
        if self.previous_features is None:
            self.previous_features, self.previous_labels = features, labels
        else:
            self.previous_features = np.concatenate([self.previous_features, features])
            self.previous_labels = np.concatenate([self.previous_labels, labels])


def train_and_predict(tool):
    """Train the classifier on the annotated objects and predict all objects (in the background).

    Reads the selected segmentation and the ``annotations`` layer; the prediction goes to ``prediction``.
    Problems (no embeddings, no segmentation, nothing annotated, a segmentation without objects) are shown as
    messages and change nothing.

    Returns:
        The worker, or None when nothing was started.
    """
    if not tool.ready(restore_layers=True):
        return None
    state, viewer = tool.state, tool.viewer
    layer = tool.segmentation_selection.value
    if layer is None:
        show_error("There is no segmentation layer: add the label image of the objects to classify.")
        return None
    segmentation = np.asarray(layer.data)
    annotations = np.asarray(viewer.layers[ANNOTATIONS].data)
    if segmentation.shape != annotations.shape:
        show_error(f"The segmentation {layer.name!r} has shape {segmentation.shape}; the image has shape "
                   f"{annotations.shape}.")
        return None
    if not segmentation.any():
        show_error(f"The segmentation {layer.name!r} contains no objects: there is nothing to classify.")
        return None
    labels_on_objects = (annotations != 0) & (segmentation != 0)
    if not labels_on_objects.any() and state.previous_labels is None:
        show_error(f"No object is annotated: paint class ids (1, 2, ...) into the '{ANNOTATIONS}' layer on some "
                   f"objects of {layer.name!r}.")
        return None
    segmentation, annotations, name = segmentation.copy(), annotations.copy(), layer.name

    def work(pbar_init, pbar_update):
        pbar_init(0, "Compute object features")
        seg_ids, features = state.object_features_for(segmentation, name)
        labels = oc.object_labels_from_annotations(segmentation, annotations, seg_ids)
        pbar_init(0, "Train the random forest")
        forest = oc.train_object_classifier(features, labels, state.previous_features, state.previous_labels,
                                            **RF_KWARGS)
        prediction = forest.predict(features)
        return forest, labels, oc.project_prediction_to_segmentation(segmentation, prediction, seg_ids)

    def done(result):
        forest, labels, prediction = result
        state.object_rf = forest
        viewer.layers[PREDICTION].data = prediction.astype("uint32")
        tool.refresh_class_widget(labels)
        n = int((labels != 0).sum()) + (0 if state.previous_labels is None else len(state.previous_labels))
        show_info(f"Trained the classifier on {n} annotated objects ({len(forest.classes_)} classes) and "
                  f"predicted {len(labels)} objects.")

    def failed(error):
        show_error(f"Train and predict failed: {error}")

    return tool.tasks.run(work, "Train and predict", on_returned=done, on_error=failed)


def export_classifier(tool, export_path) -> Optional[str]:
    """Save the trained classifier to ``export_path`` (``.npz`` added when missing); returns the path written."""
    if tool.state.object_rf is None:
        show_error("There is no classifier yet: press 'Train and Predict' first.")
        return None
    if export_path in (None, "") or str(export_path) in ("", "."):
        show_error("Choose a file to export the classifier to (an .npz file).")
        return None
    path = os.fspath(export_path)
    if not path.endswith(".npz"):
        path += ".npz"
    try:
        oc.save_object_classifier(tool.state.object_rf, path)
    except (OSError, ValueError) as error:
        show_error(f"The classifier could not be saved to {path!r}: {error}")
        return None
    show_info(f"Saved the classifier to {path!r}; apply it with "
              "micro_sam.object_classification.run_prediction_with_object_classifier.")
    return path


class ObjectClassifier(_AnnotatorBase):
    """The object classifier as a napari dock widget (also available from napari's plugin menu).

    Widgets: embeddings, segmentation (the label layer with the objects), train and predict, the classes
    annotated so far (with editable names), export classifier. Layers: ``annotations`` (paint class ids 1, 2, ...
    on objects) and ``prediction`` (the predicted class of every object).

    Args:
        viewer: The napari viewer.
        state: The state (with model and embeddings) to use, e.g. from :func:`object_classifier`.

    Attributes:
        segmentation_selection: The combo box that selects the segmentation layer.
        class_names: Names the user gave the classes (class id -> name).
    """

    state_class = ObjectClassifierState
    key_bindings: Dict[str, str] = {}

    def __init__(self, viewer, state: Optional[ObjectClassifierState] = None) -> None:
        self.class_names: Dict[int, str] = {}
        ndim = 2 if state is None else state.ndim
        super().__init__(viewer, ndim=ndim, state=state)

    def _get_widgets(self):
        from magicgui import magicgui
        from magicgui.widgets import ComboBox, Container

        embeddings = _embedding_widget.embedding_widget(self)

        def label_layers(widget=None):
            from napari.layers import Labels

            return [(layer.name, layer) for layer in self.viewer.layers
                    if isinstance(layer, Labels) and layer.name not in (ANNOTATIONS, PREDICTION)]

        segmentation = ComboBox(label="segmentation", choices=label_layers,
                                tooltip="The label layer with the objects to classify.")
        self.segmentation_selection = segmentation
        self.viewer.layers.events.inserted.connect(lambda *args: segmentation.reset_choices())
        self.viewer.layers.events.removed.connect(lambda *args: segmentation.reset_choices())

        @magicgui(call_button="Train and Predict")
        def train():
            return train_and_predict(self)

        train._long_running = True

        @magicgui(call_button="Export Classifier",
                  export_path={"mode": "w", "filter": "*.npz", "tooltip": "An .npz file (arrays, no pickle)."})
        def export(export_path: Optional[Path] = None):
            return export_classifier(self, export_path)

        classes = Container(label="classes", labels=True)
        return {"embeddings": embeddings, "segmentation": Container(widgets=[segmentation]),
                "train_and_predict": train, "classes": classes, "export_rf": export}

    def showEvent(self, event) -> None:
        """Let the dock widget grow vertically (napari 0.9 limits dock contents to their size hint otherwise)."""
        from qtpy import QtWidgets

        policy = self.sizePolicy()
        policy.setVerticalPolicy(QtWidgets.QSizePolicy.Policy.Expanding)
        self.setSizePolicy(policy)
        super().showEvent(event)

    def require_layers(self) -> None:
        """Add the ``annotations`` and ``prediction`` layers if they are missing (e.g. deleted by the user)."""
        shape = self.state.image_shape or self._initial_shape()
        for name in (ANNOTATIONS, PREDICTION):
            if name not in self.viewer.layers:
                layer = self.viewer.add_labels(np.zeros(tuple(shape), dtype="uint32"), name=name)
                if self.state.image_scale is not None:
                    layer.scale = tuple(self.state.image_scale)
                if name == ANNOTATIONS:
                    layer.brush_size, layer.mode = 3, "paint"

    def _bind_keys(self) -> None:
        """The classifier has no key bindings of its own (the series adds N for the next image)."""

    def image_changed(self, segmentation_result: Optional[np.ndarray] = None) -> None:
        """A new image (with embeddings) is in the state: empty ``annotations`` and ``prediction`` for it.

        Args:
            segmentation_result: Ignored (kept for the interface of the annotation tools).
        """
        shape, scale = tuple(self.state.image_shape), self.state.image_scale
        self.require_layers()
        for name in (ANNOTATIONS, PREDICTION):
            layer = self.viewer.layers[name]
            layer.data = np.zeros(shape, dtype="uint32")
            if scale is not None:
                layer.scale = tuple(scale)
        self.segmentation_selection.reset_choices()
        self.refresh_class_widget()

    def refresh_class_widget(self, labels: Optional[np.ndarray] = None) -> None:
        """List the classes annotated so far with the number of annotated objects and an editable name.

        Args:
            labels: The class of each object of the current segmentation (0: not annotated), if known.
        """
        from magicgui.widgets import LineEdit

        counts: Dict[int, int] = {}
        for values in (labels, self.state.previous_labels):
            if values is not None:
                ids, n = np.unique(np.asarray(values)[np.asarray(values) != 0], return_counts=True)
                for i, c in zip(ids.tolist(), n.tolist()):
                    counts[i] = counts.get(i, 0) + c
        container = self.widgets["classes"]
        container.clear()
        for class_id in sorted(counts):
            edit = LineEdit(name=f"class_{class_id}", value=self.class_names.get(class_id, ""),
                            label=f"class {class_id} ({counts[class_id]} objects)")
            edit.changed.connect(lambda text, class_id=class_id: self.class_names.__setitem__(class_id, text))
            container.append(edit)


def _checked_inputs(image: np.ndarray, segmentation: np.ndarray, ndim: Optional[int]) -> int:
    """The dimensionality of the tool, or a ValueError for images and segmentations that do not fit."""
    image, segmentation = np.asarray(image), np.asarray(segmentation)
    if ndim is None:
        ndim = image.ndim - 1 if image.ndim in (3, 4) and image.shape[-1] in (3, 4) and (
            segmentation.ndim == image.ndim - 1) else image.ndim
    if ndim not in (2, 3):
        raise ValueError(f"The object classifier works on 2D images or 3D volumes; got an image of shape "
                         f"{image.shape} (ndim={ndim}).")
    shape = spatial_shape(image.shape, ndim)
    if segmentation.shape != shape:
        raise ValueError(f"The segmentation has shape {segmentation.shape}; it must have the image's shape {shape}.")
    if segmentation.dtype.kind not in "iub":
        raise ValueError(f"The segmentation must be an integer label image, got dtype {segmentation.dtype}.")
    return ndim


def _prepare_state(image, ndim, embedding_path, model_type, tile_shape, halo, checkpoint_path, device,
                   predictor=None) -> ObjectClassifierState:
    """A classifier state with the model and the image's embeddings."""
    state = ObjectClassifierState(ndim=ndim)
    if predictor is not None:
        state.set_model(predictor)
    else:
        state.load_model(model_type, checkpoint_path, device, prefer_decoder=False)
    if isinstance(embedding_path, dict):
        state.set_embeddings(image, embedding_path)
    else:
        state.compute_embeddings(image, embedding_path, None if tile_shape is None else tuple(tile_shape),
                                 None if halo is None else tuple(halo))
    return state


def _open(image, segmentation, state, viewer, model_type, embedding_path, checkpoint_path, device, tile_shape,
          halo):
    import napari

    if viewer is None:
        viewer = napari.Viewer()
    layer = viewer.add_image(image, name="image")
    viewer.add_labels(np.asarray(segmentation), name=SEGMENTATION)
    state.image_name = layer.name
    state.image_scale = tuple(layer.scale)[-len(state.image_shape):]
    tool = ObjectClassifier(viewer, state=state)
    tool.image_changed()
    tool.segmentation_selection.value = viewer.layers[SEGMENTATION]
    viewer.layers.selection.active = viewer.layers[ANNOTATIONS]
    viewer.window.add_dock_widget(tool, name="Object Classifier")
    _embedding_widget.sync_embedding_widget(
        tool.widgets["embeddings"], model_type=model_type if checkpoint_path is None else state.predictor.model_type,
        save_path=embedding_path, checkpoint_path=checkpoint_path, device=device, tile_shape=tile_shape, halo=halo,
        image_layer=layer,
    )
    return viewer, tool


def object_classifier(
    image: np.ndarray,
    segmentation: np.ndarray,
    embedding_path: Optional[Union[str, util.ImageEmbeddings]] = None,
    model_type: str = util._DEFAULT_MODEL,
    tile_shape: Optional[Tuple[int, int]] = None,
    halo: Optional[Tuple[int, int]] = None,
    return_viewer: bool = False,
    viewer=None,
    checkpoint_path: Optional[str] = None,
    device: Optional[str] = None,
    ndim: Optional[int] = None,
):
    """Start the object classifier for an image and its segmentation.

    The model is loaded and the embeddings are computed (or loaded) before the viewer opens. Paint class ids
    (1, 2, ...) into the ``annotations`` layer on a few objects of each class and press 'Train and Predict'.

    Args:
        image: The image, (Y, X[, C]) or (Z, Y, X[, C]).
        segmentation: The objects, a label image of the image's spatial shape (0 = background).
        embedding_path: A zarr folder to cache the embeddings in, or embeddings from
            ``micro_sam.util.precompute_image_embeddings``.
        model_type: The model (``vit_t_demo`` works offline), or with ``checkpoint_path`` its architecture.
        tile_shape: (y, x) tile shape for tiled embeddings of large images.
        halo: (y, x) overlap of the tiles.
        return_viewer: Return the viewer instead of starting napari's event loop.
        viewer: A viewer to add the tool to (a new one by default).
        checkpoint_path: A model file.
        device: "cpu", "cuda", "mps"; None for the best available one.
        ndim: 2 or 3; derived from the image by default (a last axis of 3 or 4 entries is taken as channels).

    Returns:
        The napari viewer if ``return_viewer`` is True, else None (after the viewer was closed).

    Raises:
        ValueError: A segmentation that does not match the image, an image that is not 2D / 3D, invalid tiling
            or an unknown model (before the model is loaded where possible).
    """
    ndim = _checked_inputs(image, segmentation, ndim)
    state = _prepare_state(image, ndim, embedding_path, model_type, tile_shape, halo, checkpoint_path, device)
    viewer, _ = _open(image, segmentation, state, viewer, model_type, embedding_path, checkpoint_path, device,
                      tile_shape, halo)
    return show_or_return(viewer, return_viewer)


class _ClassifierSeries:
    """Moving through a list of images in the object classifier; saves what was learned on each."""

    def __init__(self, images, segmentations, output_folder, embedding_paths, tile_shape, halo, ndim):
        if len(images) == 0:
            raise ValueError("The image series is empty: pass at least one image.")
        if len(images) != len(segmentations):
            raise ValueError(f"There are {len(images)} images but {len(segmentations)} segmentations; pass one "
                             "segmentation per image.")
        if embedding_paths is not None and len(embedding_paths) != len(images):
            raise ValueError(f"There are {len(images)} images but {len(embedding_paths)} embedding paths.")
        self.images, self.segmentations = list(images), list(segmentations)
        self.output_folder = os.fspath(output_folder)
        self.embedding_paths, self.tile_shape, self.halo, self.ndim = embedding_paths, tile_shape, halo, ndim
        self.index = 0
        self.tool = None
        os.makedirs(self.output_folder, exist_ok=True)

    def read(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """Image and segmentation ``i`` (arrays, or files read with ``micro_sam.util.load_image_data``)."""
        def load(x):
            return x if isinstance(x, np.ndarray) else util.load_image_data(os.fspath(x))
        return load(self.images[i]), load(self.segmentations[i])

    def prediction_path(self, i: int) -> str:
        """Where the prediction of image ``i`` is saved."""
        image = self.images[i]
        name = f"prediction_{i}" if isinstance(image, np.ndarray) else f"{Path(image).stem}_prediction"
        return os.path.join(self.output_folder, name + ".tif")

    def embedding_path(self, i: int):
        """The embedding cache (or precomputed embeddings) of image ``i``, if given."""
        return None if self.embedding_paths is None else self.embedding_paths[i]

    def _save(self, i, prediction, features, labels) -> None:
        """Save the prediction of image ``i``, the classifier and all annotated features / labels so far."""
        from .image_series_annotator import _write_segmentation

        state = self.tool.state
        if features is not None:
            state.add_previous(features, labels)
        if state.previous_features is not None:
            for name, array in (("features", state.previous_features), ("labels", state.previous_labels)):
                path = os.path.join(self.output_folder, f"{name}.npy")
                tmp = path + ".tmp.npy"
                np.save(tmp, array)
                os.replace(tmp, path)
        _write_segmentation(self.prediction_path(i), prediction)
        if state.object_rf is not None:
            oc.save_object_classifier(state.object_rf, os.path.join(self.output_folder, "classifier.npz"))

    def next(self):
        """Save the results of the current image and open the next one (in the background)."""
        tool = self.tool
        if not tool.ready(need_embeddings=False):
            return None
        state, viewer = tool.state, tool.viewer
        if state.object_rf is None:
            show_warning("No classifier was trained on this image: its prediction is empty.")
        i = self.index
        segmentation = np.asarray(tool.segmentation_selection.value.data).copy()
        annotations = np.asarray(viewer.layers[ANNOTATIONS].data).copy()
        prediction = np.asarray(viewer.layers[PREDICTION].data).copy()
        last = i + 1 == len(self.images)

        def work(pbar_init, pbar_update):
            features = labels = None
            if ((annotations != 0) & (segmentation != 0)).any():
                seg_ids, features = state.object_features_for(segmentation)
                labels = oc.object_labels_from_annotations(segmentation, annotations, seg_ids)
            self._save(i, prediction, features, labels)
            if last:
                return None
            image, next_segmentation = self.read(i + 1)
            state.compute_embeddings(image, self.embedding_path(i + 1), self.tile_shape, self.halo,
                                     pbar_init=pbar_init, pbar_update=pbar_update)
            return image, next_segmentation

        def done(result):
            if result is None:
                self.index = len(self.images)
                self.widget.status.value = "done"
                show_info(f"You have annotated the last image; the predictions, the classifier and the annotated "
                          f"features are saved in {self.output_folder!r}.")
                return
            image, next_segmentation = result
            self.index = i + 1
            viewer.layers["image"].data = image
            viewer.layers[SEGMENTATION].data = next_segmentation
            tool.image_changed()
            self.widget.status.value = self.status()

        return tool.tasks.run(work, "Save and open the next image", on_returned=done)

    def status(self) -> str:
        """The position in the series, as shown in the series widget."""
        return f"image {self.index + 1} / {len(self.images)}"

    def attach(self, tool) -> None:
        """Add the series widget ('Next Image [N]') and the key N to the tool's viewer."""
        from magicgui.widgets import Container, Label, PushButton

        self.tool = tool
        status = Label(name="status", value=self.status())
        next_button = PushButton(name="next_image", text="Next Image [N]")
        self.widget = Container(widgets=[status, next_button], label="image series")
        next_button.changed.connect(lambda *args: self.next())
        tool.viewer.window.add_dock_widget(self.widget, name="Image Series", area="left")
        tool.viewer.bind_key("n", lambda *args: self.next(), overwrite=True)


def image_series_object_classifier(
    images: Sequence[Union[np.ndarray, str]],
    segmentations: Sequence[Union[np.ndarray, str]],
    output_folder: str,
    embedding_paths: Optional[List[Union[str, util.ImageEmbeddings]]] = None,
    model_type: str = util._DEFAULT_MODEL,
    tile_shape: Optional[Tuple[int, int]] = None,
    halo: Optional[Tuple[int, int]] = None,
    checkpoint_path: Optional[str] = None,
    device: Optional[str] = None,
    ndim: Optional[int] = None,
    return_viewer: bool = False,
    viewer=None,
):
    """Start the object classifier for a series of images and their segmentations.

    Annotate and train on one image, then press 'Next Image [N]': the prediction of the image is saved as
    ``prediction_<i>.tif`` (``<stem>_prediction.tif`` for files), the classifier as ``classifier.npz`` (see
    :func:`micro_sam.object_classification.load_object_classifier`) and the features and classes of all objects
    annotated so far as ``features.npy`` / ``labels.npy`` in ``output_folder``. Those objects keep training the
    classifier on the next images.

    Args:
        images: The images (arrays or image files).
        segmentations: One label image (array or file) per image.
        output_folder: Where predictions, the classifier and the annotated features / labels are saved.
        embedding_paths: One embedding cache (zarr folder) per image, or None.
        model_type: The model (``vit_t_demo`` works offline), or with ``checkpoint_path`` its architecture.
        tile_shape: (y, x) tile shape for tiled embeddings of large images.
        halo: (y, x) overlap of the tiles.
        checkpoint_path: A model file.
        device: "cpu", "cuda", "mps"; None for the best available one.
        ndim: 2 or 3; derived from the first image by default.
        return_viewer: Return the viewer instead of starting napari's event loop (not in micro_sam 1.8).
        viewer: A viewer to add the tool to (not in micro_sam 1.8).

    Returns:
        The napari viewer if ``return_viewer`` is True, else None.

    Raises:
        ValueError: Different numbers of images and segmentations, an empty series, or a first image and
            segmentation that do not fit together.
    """
    series = _ClassifierSeries(images, segmentations, output_folder, embedding_paths, tile_shape, halo, ndim)
    image, segmentation = series.read(0)
    ndim = _checked_inputs(image, segmentation, ndim)
    series.ndim = ndim
    state = _prepare_state(image, ndim, series.embedding_path(0), model_type, tile_shape, halo, checkpoint_path,
                           device)
    viewer, tool = _open(image, segmentation, state, viewer, model_type, series.embedding_path(0), checkpoint_path,
                         device, tile_shape, halo)
    series.attach(tool)
    tool._series = series
    return show_or_return(viewer, return_viewer)
