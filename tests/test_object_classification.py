"""Object classification: features with known values, labels from annotations, the stored forest, and a
classifier that tells round from elongated objects on SAM embeddings of the bundled model."""
import numpy as np
import pytest
import zarr

from micro_sam import object_classification as oc
from micro_sam._tiling import iterate_tiles


def _ramp_embeddings(shape, grid=8, input_side=128):
    """2D embeddings whose channel 0 is the cell row and channel 1 the cell column (linear: bilinear interpolation
    of it is exact), channel 2 constant 7."""
    h, w = shape
    scale = input_side / max(h, w)
    input_size = (int(h * scale + 0.5), int(w * scale + 0.5))
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    features = np.stack([rows, cols, np.full_like(rows, 7)]).astype("float32")[None]
    return {"features": features, "input_size": input_size, "original_size": (h, w)}, input_size


def _expected_coordinate(pixels, n_pixels_axis, input_axis, grid, input_side):
    scale = input_axis / n_pixels_axis / (input_side / grid)
    return np.clip((pixels + 0.5) * scale - 0.5, 0, grid - 1).mean()


def test_features_are_area_and_mean_interpolated_embedding():
    shape = (40, 64)  # not square: the embedding grid covers the padded square
    embeddings, input_size = _ramp_embeddings(shape)
    seg = np.zeros(shape, dtype="uint16")
    seg[3:9, 10:30] = 4
    seg[30:40, 50:64] = 9  # touches the image border (clamped interpolation)
    seg[20, 20] = 2  # a single pixel is not lost
    ids, features = oc.compute_object_features(embeddings, seg, verbose=False)
    assert ids.tolist() == [2, 4, 9]
    assert features.shape == (3, 4) and features.dtype == np.float32
    assert features[:, 0].tolist() == [1, 120, 140]
    for row, label in enumerate(ids):
        ys, xs = np.nonzero(seg == label)
        assert features[row, 1] == pytest.approx(_expected_coordinate(ys, 40, input_size[0], 8, 128), abs=1e-5)
        assert features[row, 2] == pytest.approx(_expected_coordinate(xs, 64, input_size[1], 8, 128), abs=1e-5)
    assert np.allclose(features[:, 3], 7)


def test_features_3d_and_tiled_merge_slices_and_tiles():
    # 3D: the embedding of slice z is constant z; an object over slices 1..3 with equal areas has mean 2
    seg = np.zeros((4, 16, 16), dtype="int32")
    seg[1:4, 2:6, 2:6] = 1
    seg[0, 10:12, 10:16] = 5
    seg[3, 10:11, 10:11] = 5  # 12 + 1 voxels: mean (12 * 0 + 1 * 3) / 13
    features = np.zeros((4, 1, 2, 4, 4), dtype="float32")
    features[:, 0, 0] = np.arange(4)[:, None, None]
    embeddings = {"features": features, "input_size": (64, 64), "original_size": (16, 16)}
    ids, feats = oc.compute_object_features(embeddings, seg, verbose=False)
    assert ids.tolist() == [1, 5] and feats[:, 0].tolist() == [48, 13]
    assert feats[:, 1] == pytest.approx([2.0, 3 / 13])

    # tiled 2D: tile t's embedding is constant t; pixels in halos count once (for the tile that owns them)
    shape, tile_shape, halo = (20, 30), (10, 10), (2, 2)
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w").create_group("features")
    group.attrs.update({"shape": list(shape), "tile_shape": list(tile_shape), "halo": list(halo)})
    for tile in iterate_tiles(shape, tile_shape, halo):
        outer = tuple(s.stop - s.start for s in tile.outer)
        array = group.create_array(str(tile.tile_id), shape=(1, 1, 4, 4), dtype="float32")
        array[...] = tile.tile_id
        array.attrs.update({"original_size": list(outer), "input_size": [64 * o // max(outer) for o in outer]})
    seg = np.zeros(shape, dtype="uint8")
    seg[2:5, 2:5] = 1  # tile 0 only
    seg[12:18, 8:14] = 2  # tiles 3 (x < 10: 6 x 2 pixels) and 4 (x >= 10: 6 x 4 pixels)
    ids, feats = oc.compute_object_features({"features": group, "input_size": None, "original_size": None}, seg,
                                            verbose=False)
    assert feats[:, 0].tolist() == [9, 36]
    assert feats[:, 1] == pytest.approx([0.0, (12 * 3 + 24 * 4) / 36])


def test_features_bad_input():
    embeddings, _ = _ramp_embeddings((40, 64))
    with pytest.raises(ValueError, match="no objects"):
        oc.compute_object_features(embeddings, np.zeros((40, 64), dtype="uint8"))
    with pytest.raises(ValueError, match="does not match the embeddings"):
        oc.compute_object_features(embeddings, np.ones((40, 40), dtype="uint8"))
    with pytest.raises(ValueError, match="integer label image"):
        oc.compute_object_features(embeddings, np.ones((40, 64), dtype="float32"))


def test_labels_from_annotations_majority_and_ties():
    seg = np.array([[1, 1, 1, 2, 2, 0, 3, 3]])
    ann = np.array([[2, 2, 1, 0, 0, 1, 1, 2]])
    # object 1: class 2 twice, class 1 once -> 2; object 2: not annotated -> 0 (the scribble on background
    # does not count); object 3: tie 1 vs 2 -> 1
    assert oc.object_labels_from_annotations(seg, ann).tolist() == [2, 0, 1]
    assert oc.object_labels_from_annotations(seg, ann, seg_ids=np.array([3, 7, 1])).tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="shape"):
        oc.object_labels_from_annotations(seg, ann[:, :4])


def test_projection_paints_classes_and_leaves_unknown_ids_at_zero():
    seg = np.array([[0, 3, 3], [5, 5, 8]])
    out = oc.project_prediction_to_segmentation(seg, np.array([2, 1]), np.array([5, 3]))
    assert out.tolist() == [[0, 1, 1], [2, 2, 0]]
    with pytest.raises(ValueError, match="same length"):
        oc.project_prediction_to_segmentation(seg, np.array([1, 2, 3]), np.array([3, 5]))
    with pytest.raises(ValueError, match="duplicate"):
        oc.project_prediction_to_segmentation(seg, np.array([1, 2]), np.array([3, 3]))


def test_saved_forest_predicts_like_scikit_learn(tmp_path, rng):
    x = rng.normal(size=(300, 6)).astype("float32")
    y = np.where(x[:, 0] + 0.5 * x[:, 3] > 0, 3, 7) + (x[:, 1] > 1)
    forest = oc.train_object_classifier(x, y, n_estimators=25, max_depth=6, n_jobs=1)
    path = tmp_path / "rf.npz"
    oc.save_object_classifier(forest, path)
    loaded = oc.load_object_classifier(path)
    test = rng.normal(size=(500, 6)).astype("float32")
    assert np.array_equal(loaded.classes_, forest.classes_)
    assert np.allclose(loaded.predict_proba(test), forest.predict_proba(test), atol=1e-12)
    assert np.array_equal(loaded.predict(test), forest.predict(test))
    assert [p.name for p in tmp_path.iterdir()] == ["rf.npz"]  # no temporary file left
    with pytest.raises(ValueError, match="shape"):
        loaded.predict(test[:, :5])


def test_classifier_files_bad_input(tmp_path):
    with pytest.raises(ValueError, match="fitted"):
        oc.save_object_classifier(object(), tmp_path / "x.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a classifier saved by micro_sam"):
        oc.load_object_classifier(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="does not exist"):
        oc.load_object_classifier(tmp_path / "missing.npz")
    (tmp_path / "rf.joblib").write_bytes(b"")
    with pytest.raises(ValueError, match="pickled classifier"):
        oc.run_prediction_with_object_classifier([], [], None, tmp_path / "rf.joblib")
    with pytest.raises(ValueError, match="No object is annotated"):
        oc.train_object_classifier(np.zeros((3, 2)), np.zeros(3, dtype=int))
    assert not (tmp_path / "x.npz").exists()


def _round_and_elongated(rng, n_side=4, size=192):
    """Objects on a grid of the same brightness and area (~314 pixels): round disks (class 1) and 4:1 ellipses
    at random angles (class 2), on a noisy background."""
    image = rng.normal(20, 4, size=(size, size))
    seg = np.zeros((size, size), dtype="uint16")
    classes = {}
    yy, xx = np.mgrid[:size, :size]
    step = size // n_side
    for i in range(n_side):
        for j in range(n_side):
            label = i * n_side + j + 1
            cls = 1 + (i + j + int(rng.integers(0, 2))) % 2
            dy = yy - (step * i + step // 2 + rng.integers(-3, 4))
            dx = xx - (step * j + step // 2 + rng.integers(-3, 4))
            if cls == 1:
                mask = dy ** 2 + dx ** 2 <= 10 ** 2
            else:
                angle = rng.uniform(0, np.pi)
                u, v = dy * np.cos(angle) + dx * np.sin(angle), -dy * np.sin(angle) + dx * np.cos(angle)
                mask = (u / 20) ** 2 + (v / 5) ** 2 <= 1
            seg[mask] = label
            image[mask] = rng.normal(180, 6, size=mask.sum())
            classes[label] = cls
    return np.clip(image, 0, 255).astype("uint8"), seg, classes


@pytest.fixture(scope="module")
def demo_predictor():
    from micro_sam.util import get_sam_model

    return get_sam_model("vit_t_demo", device="cpu")


def test_round_and_elongated_objects_are_told_apart(demo_predictor, tmp_path, rng):
    from micro_sam.util import precompute_image_embeddings

    image, seg, classes = _round_and_elongated(rng)
    embeddings = precompute_image_embeddings(demo_predictor, image, verbose=False)
    ids, features = oc.compute_object_features(embeddings, seg, verbose=False)
    truth = np.array([classes[i] for i in ids])
    # annotate with scribbles: a short line in the first 3 objects of each class
    annotations = np.zeros_like(seg)
    for cls in (1, 2):
        for label in [i for i in ids if classes[i] == cls][:3]:
            ys, xs = np.nonzero(seg == label)
            annotations[ys[:5], xs[:5]] = cls
    labels = oc.object_labels_from_annotations(seg, annotations, ids)
    assert (labels != 0).sum() == 6 and np.array_equal(labels[labels != 0], truth[labels != 0])
    forest = oc.train_object_classifier(features, labels, n_estimators=50, n_jobs=1)
    assert np.array_equal(forest.predict(features), truth)  # including the 10 objects nobody annotated
    # the area (column 0) does not give it away: both classes have about the same area
    assert np.ptp(features[:, 0]) < 0.1 * features[:, 0].mean()

    # a stored classifier applied to a new image gives the known classes per pixel
    path = tmp_path / "classifier.npz"
    oc.save_object_classifier(forest, path)
    image2, seg2, classes2 = _round_and_elongated(np.random.default_rng(1))
    prediction, = oc.run_prediction_with_object_classifier([image2], [seg2], demo_predictor, path, verbose=False)
    expected = oc.project_prediction_to_segmentation(seg2, np.array(list(classes2.values())),
                                                     np.array(list(classes2.keys())))
    assert np.array_equal(prediction, expected)
    per_object, = oc.run_prediction_with_object_classifier([image2], [seg2], demo_predictor, forest,
                                                           project_prediction=False, verbose=False)
    assert per_object.tolist() == [classes2[i] for i in sorted(classes2)]


def test_missing_scikit_learn_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.ensemble", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"micro_sam\[classification\]"):
        oc.train_object_classifier(np.zeros((2, 3)), np.array([1, 2]))
