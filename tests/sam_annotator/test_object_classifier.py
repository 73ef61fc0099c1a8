"""The object classifier driven as a user would: two kinds of objects (large bright, small dim), a few of each
painted with their class in 'annotations', 'Train and Predict' classifies all of them correctly; export, the
image series with saved files, and the messages for bad input."""
import os

import numpy as np
import pytest
import tifffile

from micro_sam import object_classification as oc
from micro_sam.sam_annotator.object_classifier import image_series_object_classifier, object_classifier

from ._helpers import press, wait_for


def _two_kinds(seed: int, shape=(256, 256)):
    """Large bright discs (class 1) and small dim discs (class 2) on a dark background, non-touching.

    Returns:
        image (uint8), segmentation (object ids 1..N), {object id: class}.
    """
    rng = np.random.default_rng(seed)
    image = rng.normal(20, 3, size=shape)
    segmentation = np.zeros(shape, dtype="uint32")
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    classes, centers = {}, []
    kinds = [1, 2] * 6
    object_id = 0
    for _ in range(10000):
        if object_id == len(kinds):
            break
        kind = kinds[object_id]
        radius = 14 if kind == 1 else 7
        cy, cx = rng.integers(20, shape[0] - 20), rng.integers(20, shape[1] - 20)
        if any(np.hypot(cy - y, cx - x) < radius + r + 6 for y, x, r in centers):
            continue
        object_id += 1
        centers.append((cy, cx, radius))
        mask = np.hypot(yy - cy, xx - cx) <= radius
        segmentation[mask] = object_id
        image[mask] = rng.normal(200 if kind == 1 else 90, 5, size=mask.sum())
        classes[object_id] = kind
    assert object_id == len(kinds), f"could not place {len(kinds)} objects in {shape}"
    return np.clip(image, 0, 255).astype("uint8"), segmentation, classes


def _expected(segmentation, classes):
    return oc.project_prediction_to_segmentation(segmentation, np.array(list(classes.values())),
                                                 np.array(list(classes.keys())))


def _paint_some(viewer, segmentation, classes, n_per_class=2):
    """Paint a short brush stroke with the object's class into the first n objects of each class."""
    layer = viewer.layers["annotations"]
    for kind in (1, 2):
        for object_id in [i for i, c in classes.items() if c == kind][:n_per_class]:
            ys, xs = np.nonzero(segmentation == object_id)
            center = (int(np.median(ys)), int(np.median(xs)))
            layer.selected_label = kind
            layer.paint(center, kind)


def _tool(viewer):
    return viewer.window.dock_widgets["Object Classifier"]


def test_a_few_annotations_classify_all_objects_and_export(cached_demo_model, tmp_path, notifications):
    import napari

    image, segmentation, classes = _two_kinds(seed=0)
    viewer = object_classifier(image, segmentation, model_type="vit_t_demo", device="cpu", return_viewer=True,
                               viewer=napari.Viewer(show=False))
    try:
        tool = _tool(viewer)
        assert tool.segmentation_selection.value is viewer.layers["segmentation"]
        assert [c.name for c in tool.segmentation_selection.choices] == ["segmentation"]

        # nothing annotated yet: a message, no prediction, no classifier
        assert tool.widgets["train_and_predict"]() is None
        assert any("No object is annotated" in text for _, text in notifications())
        assert not viewer.layers["prediction"].data.any() and tool.state.object_rf is None
        # exporting before training is refused too
        assert tool.widgets["export_rf"](export_path=tmp_path / "early.npz") is None
        assert not (tmp_path / "early.npz").exists()

        _paint_some(viewer, segmentation, classes)
        assert tool.widgets["train_and_predict"]() is not None
        wait_for(tool)
        np.testing.assert_array_equal(viewer.layers["prediction"].data, _expected(segmentation, classes))
        assert any("Trained the classifier on 4 annotated objects (2 classes) and predicted 12 objects" in text
                   for _, text in notifications())
        # the class list shows what was annotated; names can be given
        class_widget = tool.widgets["classes"]
        assert [w.label for w in class_widget] == ["class 1 (2 objects)", "class 2 (2 objects)"]
        class_widget[0].value = "large bright"
        assert tool.class_names == {1: "large bright"}

        # export (".npz" added), load without pickle, same predictions as the tool's forest
        written = tool.widgets["export_rf"](export_path=tmp_path / "classifier")
        assert written == str(tmp_path / "classifier.npz")
        features = tool.state.object_features
        loaded = oc.load_object_classifier(written)
        np.testing.assert_array_equal(loaded.predict(features), tool.state.object_rf.predict(features))

        # an empty segmentation layer: the library's error is shown, the prediction stays
        viewer.add_labels(np.zeros_like(segmentation), name="empty")
        tool.segmentation_selection.value = viewer.layers["empty"]
        tool.widgets["train_and_predict"]()
        wait_for(tool)
        assert any("contains no objects" in text for _, text in notifications())
        np.testing.assert_array_equal(viewer.layers["prediction"].data, _expected(segmentation, classes))
    finally:
        viewer.close()


def test_image_series_keeps_training_and_saves_results(cached_demo_model, tmp_path, notifications):
    import napari

    data = [_two_kinds(seed) for seed in (2, 3)]
    output = tmp_path / "out"
    viewer = image_series_object_classifier([d[0] for d in data], [d[1] for d in data], output,
                                            model_type="vit_t_demo", device="cpu", return_viewer=True,
                                            viewer=napari.Viewer(show=False))
    try:
        tool = _tool(viewer)
        image, segmentation, classes = data[0]
        _paint_some(viewer, segmentation, classes)
        tool.widgets["train_and_predict"]()
        wait_for(tool)
        first_prediction = viewer.layers["prediction"].data.copy()
        np.testing.assert_array_equal(first_prediction, _expected(segmentation, classes))

        press(viewer, "n")
        wait_for(tool)
        assert sorted(os.listdir(output)) == ["classifier.npz", "features.npy", "labels.npy", "prediction_0.tif"]
        np.testing.assert_array_equal(tifffile.imread(output / "prediction_0.tif"), first_prediction)
        # the annotated objects are ids 1 and 3 (class 1) and 2 and 4 (class 2), saved in id order; column 0
        # of the features is the object's area
        assert np.load(output / "labels.npy").tolist() == [classes[i] for i in (1, 2, 3, 4)] == [1, 2, 1, 2]
        areas = [int((segmentation == i).sum()) for i in (1, 2, 3, 4)]
        assert np.load(output / "features.npy")[:, 0].tolist() == areas
        # the second image is open with empty annotations; the objects annotated on the first image train
        image, segmentation, classes = data[1]
        np.testing.assert_array_equal(viewer.layers["segmentation"].data, segmentation)
        assert not viewer.layers["annotations"].data.any() and not viewer.layers["prediction"].data.any()
        tool.widgets["train_and_predict"]()
        wait_for(tool)
        np.testing.assert_array_equal(viewer.layers["prediction"].data, _expected(segmentation, classes))

        press(viewer, "n")
        wait_for(tool)
        np.testing.assert_array_equal(tifffile.imread(output / "prediction_1.tif"), _expected(segmentation, classes))
        assert any("annotated the last image" in text for _, text in notifications())
        assert not any(name.endswith(".tmp.npy") or name.startswith(".") for name in os.listdir(output))
    finally:
        viewer.close()


def test_bad_input_fails_before_the_model_loads(monkeypatch, tmp_path):
    from micro_sam import util

    monkeypatch.setattr(util, "get_sam_model", lambda *a, **k: pytest.fail("loaded a model"))
    image = np.zeros((64, 64), dtype="uint8")
    with pytest.raises(ValueError, match="must have the image's shape"):
        object_classifier(image, np.zeros((32, 64), dtype="uint32"), return_viewer=True)
    with pytest.raises(ValueError, match="integer label image"):
        object_classifier(image, np.zeros((64, 64), dtype="float32"), return_viewer=True)
    with pytest.raises(ValueError, match="one segmentation per image"):
        image_series_object_classifier([image, image], [np.zeros((64, 64), "uint32")], tmp_path / "o")
    with pytest.raises(ValueError, match="2D images or 3D volumes"):
        object_classifier(np.zeros((2, 2, 8, 8)), np.zeros((2, 2, 8, 8), "uint32"), return_viewer=True)


def test_plugin_widget_in_a_viewer_without_embeddings(notifications):
    """napari's plugin menu docks ObjectClassifier(viewer) next to open layers: the tool's layers get the image's
    shape, only the user's label layers are offered as the segmentation, and training asks for embeddings."""
    import napari

    from micro_sam.sam_annotator.object_classifier import ObjectClassifier

    image, segmentation, _ = _two_kinds(seed=4, shape=(200, 256))
    viewer = napari.Viewer(show=False)
    try:
        viewer.add_image(image, name="cells")
        viewer.add_labels(segmentation, name="nuclei")
        tool = ObjectClassifier(viewer)
        viewer.window.add_dock_widget(tool)
        assert viewer.layers["annotations"].data.shape == viewer.layers["prediction"].data.shape == (200, 256)
        assert [layer.name for layer in tool.segmentation_selection.choices] == ["nuclei"]
        viewer.add_labels(np.zeros_like(segmentation), name="other")
        assert [layer.name for layer in tool.segmentation_selection.choices] == ["nuclei", "other"]
        assert tool.widgets["embeddings"].image.value is viewer.layers["cells"]
        assert tool.widgets["train_and_predict"]() is None
        assert any("embeddings are not computed" in text for _, text in notifications())
        del viewer.layers["annotations"]  # deleted by the user: the tool adds it again when it needs it
        tool.require_layers()
        assert viewer.layers["annotations"].data.shape == (200, 256)
    finally:
        viewer.close()


def test_public_names_match_micro_sam_1_8():
    """object_classifier, image_series_object_classifier and ObjectClassifier have 1.8.14's parameters (the
    module's other 1.8 names are its imports: magicgui / joblib / sklearn helpers)."""
    import json

    from _api_surface import compare_module

    path = os.path.join(os.path.dirname(__file__), "..", "data", "micro_sam_1.8.14_api.json")
    with open(path) as f:
        entries = json.load(f)["modules"]["micro_sam.sam_annotator.object_classifier"]
    public = {name: entries[name] for name in ("ObjectClassifier", "image_series_object_classifier",
                                               "object_classifier")}
    assert compare_module("micro_sam.sam_annotator.object_classifier", public) == []


@pytest.mark.slow
def test_volume_objects_are_classified(cached_demo_model):
    """3D: objects through 3 slices (large bright = class 1, small dim = class 2), one to two annotated per class."""
    import napari

    rng = np.random.default_rng(0)
    volume = rng.normal(20, 3, (3, 128, 128))
    segmentation = np.zeros((3, 128, 128), "uint32")
    yy, xx = np.mgrid[:128, :128]
    classes = {}
    for cy in (30, 95):
        for cx in (25, 64, 103):
            object_id = len(classes) + 1
            classes[object_id] = 1 if object_id % 2 else 2
            mask = np.hypot(yy - cy, xx - cx) <= (14 if classes[object_id] == 1 else 7)
            segmentation[:, mask] = object_id
            volume[:, mask] = 200 if classes[object_id] == 1 else 90
    viewer = object_classifier(volume.clip(0, 255).astype("uint8"), segmentation, model_type="vit_t_demo",
                               device="cpu", return_viewer=True, viewer=napari.Viewer(show=False))
    try:
        tool = _tool(viewer)
        assert tool.state.ndim == 3
        for object_id in (1, 2, 3):
            z, y, x = (int(np.median(a)) for a in np.nonzero(segmentation == object_id))
            viewer.layers["annotations"].paint((z, y, x), classes[object_id])
        tool.widgets["train_and_predict"]()
        wait_for(tool)
        np.testing.assert_array_equal(viewer.layers["prediction"].data, _expected(segmentation, classes))
    finally:
        viewer.close()
