import numpy as np
import pytest

from micro_sam import multi_dimensional_segmentation as mds
from micro_sam.evaluation.metrics import mean_segmentation_accuracy
from micro_sam.multi_dimensional_segmentation import (
    PROJECTION_MODES, get_napari_track_data, merge_instance_segmentation_3d, segment_mask_in_volume,
)


# --- helpers ------------------------------------------------------------------------------------------------
def _same_objects(a, b):
    """True if the label images are equal up to a bijective relabelling of the objects (0 fixed)."""
    if a.shape != b.shape or not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a[a != 0], b[b != 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def _split_into_slices(labels_3d, rng, consecutive=True):
    """Per-slice instance labels from 3D labels, with arbitrary (shuffled) ids per slice."""
    result, offset = np.zeros(labels_3d.shape, dtype="uint32"), 0
    for z in range(labels_3d.shape[0]):
        ids = np.unique(labels_3d[z])
        ids = ids[ids != 0]
        new_ids = rng.permutation(len(ids)) + 1 + (offset if consecutive else 0)
        lut = np.zeros(int(labels_3d.max()) + 1, dtype="uint32")
        lut[ids] = new_ids
        result[z] = lut[labels_3d[z]]
        offset += len(ids)
    return result


def _ball_volume(shape=(16, 48, 48)):
    """Separated 3D objects of different z extent (ellipsoids and a column)."""
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    labels = np.zeros(shape, dtype="uint32")
    labels[((z - 5) / 4.5) ** 2 + ((y - 12) / 8) ** 2 + ((x - 12) / 8) ** 2 <= 1] = 1
    labels[((z - 10) / 5.5) ** 2 + ((y - 14) / 9) ** 2 + ((x - 35) / 9) ** 2 <= 1] = 2
    labels[(z >= 2) & (z < 14) & ((y - 36) ** 2 + (x - 12) ** 2 <= 36)] = 3
    labels[((z - 8) / 7.5) ** 2 + ((y - 37) / 7) ** 2 + ((x - 36) / 7) ** 2 <= 1] = 4
    return labels


# --- merge_instance_segmentation_3d ------------------------------------------------------------------------
def test_merge_recovers_3d_objects():
    truth = _ball_volume()
    slices = _split_into_slices(truth, np.random.default_rng(0))
    original = slices.copy()
    merged = merge_instance_segmentation_3d(slices, verbose=False)
    assert np.array_equal(slices, original)  # input untouched
    assert merged.dtype == np.uint32 and merged.shape == truth.shape
    assert _same_objects(merged, truth)
    assert mean_segmentation_accuracy(merged.astype("int64"), truth) == pytest.approx(1.0)
    assert np.array_equal(np.unique(merged), np.arange(5))  # consecutive ids


def test_merge_with_ids_repeated_across_slices():
    # micro_sam 1.8 needs ids unique across slices; here every slice is labelled 1..n independently.
    truth = _ball_volume()
    slices = _split_into_slices(truth, np.random.default_rng(1), consecutive=False)
    assert _same_objects(merge_instance_segmentation_3d(slices, verbose=False), truth)


def test_merge_uses_overlap_not_first_contact():
    # Slice 0: objects 1 (left) and 2 (right). Slice 1: object 3 touches object 1 with a few pixels but lies
    # mostly on object 2, and object 4 lies on object 1. A naive rule linking an object to the first (lowest id)
    # object it overlaps would join 3 with 1; the multicut on overlap costs joins 3 with 2.
    slices = np.zeros((3, 20, 40), dtype="uint16")
    slices[0, 2:18, 2:18] = 1
    slices[0, 2:18, 22:38] = 2
    slices[1, 2:18, 16:36] = 3
    slices[1, 2:18, 2:12] = 4
    slices[2, 2:18, 22:38] = 5
    slices[2, 2:18, 2:18] = 6
    merged = merge_instance_segmentation_3d(slices, verbose=False)
    object_of = {label: int(merged[slices == label][0]) for label in range(1, 7)}
    assert object_of[3] == object_of[2] == object_of[5]
    assert object_of[4] == object_of[1] == object_of[6]
    assert object_of[1] != object_of[2]


@pytest.mark.parametrize("fraction, beta, joined", [
    (0.3, 0.5, True), (0.2, 0.5, False), (0.5, 0.5, True), (0.5, 0.9, False), (0.2, 0.1, True),
])
def test_merge_threshold_and_beta(fraction, beta, joined):
    # Lower object of 100 columns; the upper object covers `fraction` of it, the rest is background.
    slices = np.zeros((2, 10, 102), dtype="uint32")
    slices[0, :, 1:101] = 1
    slices[1, :, 1:1 + int(round(fraction * 100))] = 2
    merged = merge_instance_segmentation_3d(slices, beta=beta, verbose=False)
    assert (len(np.unique(merged)) == 2) == joined


def test_gap_closing_fills_missing_slice():
    truth = np.zeros((9, 30, 30), dtype="uint32")
    truth[:, 5:15, 5:15] = 1
    truth[:, 18:26, 10:25] = 2
    slices = _split_into_slices(truth, np.random.default_rng(2))
    slices[4][slices[4] == slices[4, 10, 10]] = 0  # object 1 is missed in slice 4
    slices[6][slices[6] == slices[6, 20, 20]] = 0  # object 2 is missed in slice 6

    without = merge_instance_segmentation_3d(slices, verbose=False)
    assert len(np.unique(without)) == 5  # both objects are split in two
    closed = merge_instance_segmentation_3d(slices, gap_closing=1, verbose=False)
    assert _same_objects(closed, truth)  # gaps filled, both objects whole, not fused

    # A gap of three slices needs two iterations (gaps of up to 2 * gap_closing slices are closed).
    slices[3:6][truth[3:6] == 1] = 0
    assert len(np.unique(merge_instance_segmentation_3d(slices, gap_closing=1, verbose=False))) == 4
    assert _same_objects(merge_instance_segmentation_3d(slices, gap_closing=2, verbose=False), truth)


def test_gap_closing_does_not_grow_objects_at_volume_border():
    # Objects that touch the first / last slice must not be eroded by the closing.
    truth = np.zeros((4, 12, 12), dtype="uint32")
    truth[:, 2:8, 2:8] = 1
    slices = _split_into_slices(truth, np.random.default_rng(3))
    assert _same_objects(merge_instance_segmentation_3d(slices, gap_closing=2, verbose=False), truth)


def test_min_z_extent_removes_short_objects():
    truth = np.zeros((10, 20, 20), dtype="uint32")
    truth[1:9, 2:8, 2:8] = 1  # 8 slices
    truth[4:6, 12:18, 12:18] = 2  # 2 slices
    truth[0:3, 12:18, 2:8] = 3  # 3 slices
    slices = _split_into_slices(truth, np.random.default_rng(4))
    merged = merge_instance_segmentation_3d(slices, min_z_extent=3, verbose=False)
    expected = truth.copy()
    expected[expected == 2] = 0
    assert _same_objects(merged, expected)
    assert np.array_equal(np.unique(merged), [0, 1, 2])  # consecutive after filtering
    assert _same_objects(merge_instance_segmentation_3d(slices, min_z_extent=0, verbose=False), truth)


def test_with_background_keeps_background_separate():
    truth = np.zeros((6, 20, 20), dtype="uint32")
    truth[:, 2:8, 2:8] = 1  # spans the whole volume
    truth[1:4, 12:18, 12:18] = 2  # ends inside the volume: its last slice is followed by background
    slices = _split_into_slices(truth, np.random.default_rng(5))
    assert _same_objects(merge_instance_segmentation_3d(slices, with_background=True, verbose=False), truth)
    # When 0 is an ordinary segment, object 2 continues into the 0 region (overlap 1) and is absorbed by it.
    merged = merge_instance_segmentation_3d(slices, with_background=False, verbose=False)
    expected = truth.copy()
    expected[expected == 2] = 0
    assert _same_objects(merged, expected)


def test_merge_progress_callbacks():
    slices = _split_into_slices(_ball_volume(), np.random.default_rng(6))
    calls = []
    merge_instance_segmentation_3d(slices, gap_closing=1, pbar_init=lambda total, desc: calls.append(total),
                                   pbar_update=lambda n: calls.append(n))
    assert calls[0] == slices.shape[0] + 1 and sum(calls[1:]) == slices.shape[0] + 1


def test_merge_edge_cases():
    empty = np.zeros((3, 5, 5), dtype="uint8")
    assert not merge_instance_segmentation_3d(empty, verbose=False).any()
    single = np.zeros((1, 5, 5), dtype="uint8")
    single[0, 1:3, 1:3] = 7
    assert _same_objects(merge_instance_segmentation_3d(single, verbose=False), (single > 0).astype("uint8"))
    boolean = np.zeros((3, 5, 5), dtype=bool)
    boolean[:, 1:3, 1:3] = True
    assert np.array_equal(merge_instance_segmentation_3d(boolean, verbose=False), boolean.astype("uint32"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(slice_segmentation=np.zeros((5, 5), dtype="uint8")), "slice_segmentation"),
    (dict(slice_segmentation=np.zeros((2, 5, 5), dtype="float32")), "slice_segmentation"),
    (dict(slice_segmentation=-np.ones((2, 5, 5), dtype="int32")), "negative"),
    (dict(beta=0.0), "beta"),
    (dict(beta=1.0), "beta"),
    (dict(gap_closing=-1), "gap_closing"),
    (dict(min_z_extent=1.5), "min_z_extent"),
])
def test_merge_invalid_input(kwargs, match):
    kwargs = {"slice_segmentation": np.zeros((2, 5, 5), dtype="uint8"), "verbose": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        merge_instance_segmentation_3d(**kwargs)


# --- segment_mask_in_volume with a known-answer predictor stub -----------------------------------------------
def _tube_scene(shape=(20, 40, 40)):
    """A tube in slices 3..12 (disc of radius 6 moving by one pixel per slice) and two other objects that touch
    its ends: slices 0..2 and 13..19 hold objects overlapping the tube's end discs only slightly."""
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    scene = np.zeros(shape, dtype="uint32")
    tube = (z >= 3) & (z <= 12) & ((y - 20) ** 2 + (x - (12 + z)) ** 2 <= 36)
    scene[tube] = 1
    scene[(z >= 13) & ((y - 20) ** 2 + (x - 35) ** 2 <= 36)] = 2  # overlaps the tube's last disc a little
    scene[(z <= 2) & ((y - 20) ** 2 + (x - 5) ** 2 <= 36)] = 3  # overlaps the tube's first disc a little
    return scene, tube


class OracleSAM:
    """Stands in for segment_from_mask: returns the true object of slice i that covers most of the prompt."""

    def __init__(self, scene):
        self.scene = scene
        self.calls = []

    def __call__(self, predictor, mask, image_embeddings=None, i=None, use_box=True, use_mask=True,
                 use_points=False, box_extension=0.0, use_single_point=False, **kwargs):
        self.calls.append(dict(i=i, prompt=mask.copy(), use_box=use_box, use_mask=use_mask, use_points=use_points,
                               use_single_point=use_single_point, box_extension=box_extension))
        ids, counts = np.unique(self.scene[i][mask], return_counts=True)
        counts[ids == 0] = 0
        result = np.zeros((1,) + mask.shape, dtype=bool)
        if counts.max() > 0:
            result[0] = self.scene[i] == ids[np.argmax(counts)]
        return result


@pytest.fixture
def oracle(monkeypatch):
    scene, tube = _tube_scene()
    sam = OracleSAM(scene)
    monkeypatch.setattr(mds, "_segment_from_mask", sam)
    return sam, scene, tube


def test_propagation_follows_tube_and_stops_at_its_ends(oracle):
    sam, scene, tube = oracle
    segmentation = np.zeros(scene.shape, dtype="uint8")
    segmentation[7] = tube[7]
    original = segmentation.copy()
    progress = []
    result, z_range = segment_mask_in_volume(segmentation, predictor=None, image_embeddings={},
                                             segmented_slices=np.array([7]), stop_lower=False, stop_upper=False,
                                             iou_threshold=0.5, projection="mask", update_progress=progress.append)
    assert np.array_equal(segmentation, original)  # input untouched
    assert result.dtype == np.uint8 and np.array_equal(result, tube.astype("uint8"))
    assert z_range == (3, 12)
    # It tried slices 6..2 downwards and 8..13 upwards: slices 2 and 13 were rejected by the IoU rule.
    assert sorted(call["i"] for call in sam.calls) == [2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13]
    assert len(progress) == 9
    # The prompt for each slice is the mask of the previous slice.
    for call in sam.calls:
        previous = call["i"] + 1 if call["i"] < 7 else call["i"] - 1
        assert np.array_equal(call["prompt"], tube[previous])


def test_propagation_without_stopping_follows_the_other_objects(oracle):
    sam, scene, tube = oracle
    segmentation = np.zeros(scene.shape, dtype="uint8")
    segmentation[7] = tube[7]
    result, z_range = segment_mask_in_volume(segmentation, None, {}, np.array([7]), False, False,
                                             iou_threshold=0.0, projection="mask")
    assert z_range == (0, 19)
    assert np.array_equal(result != 0, scene != 0)


def test_propagation_fills_gaps_between_segmented_slices(oracle):
    sam, scene, tube = oracle
    segmentation = np.zeros(scene.shape, dtype="uint8")
    segmentation[4] = tube[4]
    segmentation[10] = tube[10]
    result, z_range = segment_mask_in_volume(segmentation, None, {}, [10, 4], True, True, 0.5, "box")
    assert z_range == (4, 10)  # with both stop flags nothing is segmented outside [4, 10]
    # stop_lower / stop_upper: slices 5..9 are filled from the upper (lower) segmented slice only.
    assert [call["i"] for call in sam.calls] == [9, 8, 7, 6, 5]
    assert np.array_equal(result[4:11], tube[4:11]) and not result[:4].any() and not result[11:].any()

    sam.calls.clear()
    result, z_range = segment_mask_in_volume(segmentation, None, {}, [4, 10], False, False, 0.5, "box")
    assert z_range == (3, 12) and np.array_equal(result, tube)
    inner = [call for call in sam.calls if 4 < call["i"] < 10]
    # Gap of 6: 5, 6 from below, 9, 8 from above, the middle slice 7 from the union of slices 6 and 8.
    assert [call["i"] for call in inner] == [5, 6, 9, 8, 7]
    assert np.array_equal(inner[-1]["prompt"], tube[6] | tube[8])
    assert all(call["use_box"] and not call["use_mask"] and not call["use_points"] for call in sam.calls)

    sam.calls.clear()
    segmentation[10] = 0
    segmentation[9] = tube[9]
    segment_mask_in_volume(segmentation, None, {}, [4, 9], False, False, 0.5, "box")
    # Odd gap of 5: slices 5, 6 from below, 8, 7 from above.
    assert [call["i"] for call in sam.calls if 4 < call["i"] < 9] == [5, 6, 8, 7]


def test_propagation_with_stop_slice(oracle):
    sam, scene, tube = oracle
    segmentation = np.zeros(scene.shape, dtype="uint8")
    segmentation[9] = tube[9]  # slice 5 is a stop slice: empty, the object ends below slice 6
    result, z_range = segment_mask_in_volume(segmentation, None, {}, np.array([5, 9]), True, False, 0.5, "points")
    assert z_range == (5, 12)
    assert not result[:6].any()
    assert np.array_equal(result[6:], tube[6:])
    assert all(call["use_points"] and not call["use_single_point"] for call in sam.calls)


def test_propagation_from_a_single_index_array(oracle):
    # micro_sam's evaluation passes a 0-d array.
    sam, scene, tube = oracle
    segmentation = np.zeros(scene.shape, dtype="int64")
    segmentation[8] = tube[8]
    result, z_range = segment_mask_in_volume(segmentation, None, {}, np.array(8), False, False, 0.5,
                                             "single_point")
    assert z_range == (3, 12) and np.array_equal(result == 1, tube)


@pytest.mark.parametrize("projection, flags", [
    ("mask", (True, True, False, False)), ("box", (True, False, False, False)),
    ("points", (False, False, True, False)), ("points_and_mask", (False, True, True, False)),
    ("single_point", (False, False, True, True)),
    ({"use_box": False, "use_mask": True, "use_points": False}, (False, True, False, False)),
])
def test_projection_modes(oracle, projection, flags):
    sam, scene, tube = oracle
    segmentation = np.zeros(scene.shape, dtype="uint8")
    segmentation[7] = tube[7]
    segment_mask_in_volume(segmentation, None, {}, [7], False, False, 0.5, projection, box_extension=0.1)
    assert sam.calls
    for call in sam.calls:
        assert (call["use_box"], call["use_mask"], call["use_points"], call["use_single_point"]) == flags
        assert call["box_extension"] == 0.1
    assert set(PROJECTION_MODES) == {"box", "mask", "points", "points_and_mask", "single_point"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(segmentation=np.zeros((10, 10), dtype="uint8")), "segmentation"),
    (dict(segmented_slices=np.array([], dtype=int)), "segmented_slices"),
    (dict(segmented_slices=[3, 20]), r"segmented_slices.*\[0, 19\]"),
    (dict(segmented_slices=[-1]), "segmented_slices"),
    (dict(segmented_slices=[1.5]), "segmented_slices"),
    (dict(projection="boxes"), "single_point"),
    (dict(projection={"use_box": True}), "use_mask"),
    (dict(iou_threshold=1.5), "iou_threshold"),
])
def test_propagation_invalid_input(oracle, kwargs, match):
    sam, scene, tube = oracle
    segmentation = np.zeros(scene.shape, dtype="uint8")
    segmentation[7] = tube[7]
    args = dict(segmentation=segmentation, predictor=None, image_embeddings={}, segmented_slices=[7],
                stop_lower=False, stop_upper=False, iou_threshold=0.5, projection="mask")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        segment_mask_in_volume(**args)
    assert not sam.calls


def test_propagation_smoke_with_tiny_sam(tiny_predictor):
    # Random weights: the masks are arbitrary, this checks the plumbing with real 3D embeddings.
    pytest.importorskip("micro_sam.prompt_based_segmentation")
    from micro_sam.util import precompute_image_embeddings

    rng = np.random.default_rng(0)
    volume = rng.integers(0, 255, size=(3, 64, 64)).astype("uint8")
    embeddings = precompute_image_embeddings(tiny_predictor, volume, ndim=3, verbose=False)
    segmentation = np.zeros(volume.shape, dtype="uint32")
    segmentation[1, 20:40, 20:40] = 1
    result, (z_min, z_max) = segment_mask_in_volume(segmentation, tiny_predictor, embeddings, [1], False, False,
                                                    iou_threshold=0.0, projection="mask")
    assert result.shape == volume.shape and result.dtype == segmentation.dtype
    assert np.array_equal(result[1], segmentation[1])
    assert set(np.unique(result)) <= {0, 1}
    assert 0 <= z_min <= 1 <= z_max <= 2


# --- napari track data ------------------------------------------------------------------------------------------
def test_get_napari_track_data():
    segmentation = np.zeros((2, 10, 10), dtype="uint32")
    segmentation[0, 0:2, 0:4] = 1  # centroid (0.5, 1.5)
    segmentation[1, 4:6, 4:6] = 2  # centroid (4.5, 4.5)
    segmentation[1, 8, 2] = 3
    track_data, parents = get_napari_track_data(segmentation, [{1: [2, 3]}])
    np.testing.assert_allclose(track_data, [[1, 0, 0.5, 1.5], [2, 1, 4.5, 4.5], [3, 1, 8, 2]])
    assert parents == {2: [1], 3: [1]}


# --- tracking with a stand-in for trackastra -------------------------------------------------------------------
def _division_movie():
    """Frames 0-1: cell A (label 1); it divides into labels 1 and 2 in frames 2-3 (frame 3 ids: 5, 6).
    Cell B appears in frame 1 (label 2; label 3 in frames 2-3). A one-frame object C exists in frame 3 (label 9)."""
    seg = np.zeros((4, 20, 20), dtype="uint16")
    seg[0:2, 2:8, 2:8] = 1
    seg[2, 2:5, 2:8], seg[2, 5:8, 2:8] = 1, 2
    seg[3, 2:5, 2:8], seg[3, 5:8, 2:8] = 5, 6
    seg[1, 12:18, 12:18] = 2
    seg[2:4, 12:18, 12:18] = 3
    seg[3, 0, 19] = 9
    nodes = {"a0": (0, 1), "a1": (1, 1), "a2": (2, 1), "a3": (3, 5), "d2": (2, 2), "d3": (3, 6),
             "b1": (1, 2), "b2": (2, 3), "b3": (3, 3), "c3": (3, 9)}
    edges = [("a0", "a1"), ("a1", "a2"), ("a1", "d2"), ("a2", "a3"), ("d2", "d3"), ("b1", "b2"), ("b2", "b3")]
    return seg, nodes, edges


@pytest.fixture
def fake_trackastra(monkeypatch):
    import sys
    import types

    import networkx as nx

    seg, nodes, edges = _division_movie()
    calls = {}

    class FakeTrackastra:
        @classmethod
        def from_pretrained(cls, name, device=None):
            calls["model"] = name
            return cls()

        def track(self, imgs, masks, mode="greedy"):
            calls["mode"], calls["masks"] = mode, masks.copy()
            graph = nx.DiGraph()
            for name, (t, label) in nodes.items():
                graph.add_node(name, time=t, label=label, coords=(0.0, 0.0))
            graph.add_edges_from(edges)
            return graph, masks

    def graph_to_ctc(graph, masks, outdir=None):
        calls["ctc"] = outdir

    package = types.ModuleType("trackastra")
    model_module = types.ModuleType("trackastra.model")
    model_module.Trackastra = FakeTrackastra
    tracking_module = types.ModuleType("trackastra.tracking")
    tracking_module.graph_to_ctc = graph_to_ctc
    monkeypatch.setitem(sys.modules, "trackastra", package)
    monkeypatch.setitem(sys.modules, "trackastra.model", model_module)
    monkeypatch.setitem(sys.modules, "trackastra.tracking", tracking_module)
    return seg, calls


def test_track_across_frames_tracks_and_lineages(fake_trackastra, tmp_path):
    seg, calls = fake_trackastra
    movie = np.zeros(seg.shape, dtype="float32")
    result, lineages = mds.track_across_frames(movie, seg, mode="ilp", tracking_model="ctc", verbose=False,
                                               output_folder=tmp_path)
    assert calls["model"] == "ctc" and calls["mode"] == "ilp" and calls["ctc"] == tmp_path
    # Tracks numbered by start frame, then label: A = 1, B = 2, A's daughters = 3 (label 1) and 4 (label 2), C = 5.
    expected = np.zeros(seg.shape, dtype="uint32")
    expected[0:2][seg[0:2] == 1] = 1
    expected[1][seg[1] == 2] = 2
    expected[2:4][seg[2:4] == 3] = 2
    expected[2][seg[2] == 1], expected[3][seg[3] == 5] = 3, 3
    expected[2][seg[2] == 2], expected[3][seg[3] == 6] = 4, 4
    expected[3][seg[3] == 9] = 5
    assert np.array_equal(result, expected)
    assert lineages == [{1: [3, 4], 3: [], 4: []}, {2: []}, {5: []}]
    # The napari representation of the lineages: child -> [parent].
    _, parents = get_napari_track_data(result, lineages)
    assert parents == {3: [1], 4: [1]}


def test_track_across_frames_min_time_extent(fake_trackastra):
    seg, _ = fake_trackastra
    result, lineages = mds.track_across_frames(np.zeros(seg.shape), seg, min_time_extent=2, verbose=False)
    assert set(np.unique(result)) == {0, 1, 2, 3, 4}  # the one-frame object 5 is gone
    assert lineages == [{1: [3, 4], 3: [], 4: []}, {2: []}]


def test_track_across_frames_gap_closing(fake_trackastra):
    seg, calls = fake_trackastra
    seg = seg.copy()
    seg[1][seg[1] == 2] = 0  # B is missing in frame 1 but present in frames 2 and 3 ...
    seg[0, 12:18, 12:18] = 4  # ... and in frame 0
    mds.track_across_frames(np.zeros(seg.shape), seg, gap_closing=1, verbose=False)
    assert (calls["masks"][1, 12:18, 12:18] != 0).all() and calls["masks"][1, 12:18, 12:18].max() > 2
    assert np.array_equal(calls["masks"][1][seg[1] != 0], seg[1][seg[1] != 0])


def test_track_across_frames_validation(fake_trackastra):
    seg, _ = fake_trackastra
    with pytest.raises(ValueError, match="mode"):
        mds.track_across_frames(np.zeros(seg.shape), seg, mode="hungarian", verbose=False)
    with pytest.raises(ValueError, match="same shape"):
        mds.track_across_frames(np.zeros((4, 20, 21)), seg, verbose=False)


def test_track_across_frames_needs_trackastra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "trackastra", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "trackastra.model", None)
    with pytest.raises(RuntimeError, match="trackastra"):
        mds.track_across_frames(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), dtype="uint8"), verbose=False)
