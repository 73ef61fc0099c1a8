"""The tracking annotator, driven as a user does: a point on a cell in frame 0, Shift-S (track), a division point
where the cell has divided, the daughters tracked, C (commit) -> committed tracks, lineages and napari's tracks
layer, checked frame by frame against the true tracks of the synthetic time-lapse.

The default tests use an oracle in place of SAM (the true object under a point / with the largest overlap with
the prompt mask), so that they test the tool's logic exactly and fast; the slow test uses the bundled model."""
import numpy as np
import pytest

from micro_sam import multi_dimensional_segmentation as mds
from micro_sam.multi_dimensional_segmentation import get_napari_track_data
from micro_sam.sam_annotator import util as vutil
from micro_sam.sam_annotator._state import AnnotatorState
from micro_sam.sam_annotator.annotator_tracking import AnnotatorTracking, annotator_tracking, create_tracking_menu

from ._helpers import docked_tool, fresh, object_center, press, wait_for
from .conftest import iou

pytestmark = pytest.mark.xdist_group("sam_annotator_tracking")  # the tests share one viewer (module fixture)


@pytest.fixture(scope="module")
def timelapse():
    """8 frames of 128 x 128; track 5 divides into 13 and 14 in frame 3, the others do not divide."""
    from micro_sam.sample_data import synthetic_timelapse

    movie, labels, lineages = synthetic_timelapse(n_frames=8, shape=(128, 128), seed=3)
    assert {5: [13, 14], 13: [], 14: []} in lineages
    return movie, labels, lineages


@pytest.fixture
def oracle(monkeypatch, timelapse):
    """SAM stand-in: a point prompt gives the true object under the first positive point; a mask prompt gives the
    true object that overlaps it most. Records the frames segmented by propagation."""
    _, labels, _ = timelapse
    calls = {"propagated": []}

    def prompt_segmentation(predictor, points, labels_, boxes, masks, shape, multiple_box_prompts=True,
                            image_embeddings=None, i=None, **kwargs):
        y, x = np.round(np.asarray(points)[np.asarray(labels_) == 1][0]).astype(int)
        object_id = labels[i][y, x]
        return labels[i] == object_id if object_id else np.zeros(shape, bool)

    def segment_from_mask(predictor, mask, image_embeddings=None, i=None, **kwargs):
        calls["propagated"].append(i)
        ids, counts = np.unique(labels[i][mask != 0], return_counts=True)
        counts, ids = counts[ids != 0], ids[ids != 0]
        return labels[i] == ids[np.argmax(counts)] if len(ids) else np.zeros(mask.shape, bool)

    monkeypatch.setattr(vutil, "prompt_segmentation", prompt_segmentation)
    monkeypatch.setattr(mds, "_segment_from_mask", segment_from_mask)
    return calls


@pytest.fixture(scope="module")
def session(timelapse):
    movie, _, _ = timelapse
    state = AnnotatorState(ndim=3)
    state.predictor = "oracle"
    state._set_image(movie, movie.shape, {"features": np.zeros((8, 1, 1, 1, 1)), "input_size": (128, 128)},
                     None, None, None)
    with docked_tool(AnnotatorTracking, movie, state, "movie") as session:
        yield session


@pytest.fixture
def tool(session):
    return fresh(session)


def _click(viewer, t, labels, track, frame=None):
    """A point (current track id and state) on the true object ``track`` in frame ``t``."""
    viewer.dims.set_point(0, t)
    viewer.layers["point_prompts"].add(np.concatenate([[t], object_center(labels[t], track)]))


def _assert_track(segmentation, track_id, labels, true_id, frames):
    for t in range(labels.shape[0]):
        truth = labels[t] == true_id if t in frames else np.zeros(labels.shape[1:], bool)
        assert iou(segmentation[t] == track_id, truth) == 1.0, (track_id, t)


def test_track_a_dividing_cell_and_commit_its_lineage(tool, timelapse, oracle):
    viewer, tool = tool
    _, labels, _ = timelapse
    menu = tool.widgets["tracking"]
    assert tool.current_track_id == 1 and menu.track_id.value == "1" and menu.track_state.value == "track"

    # Track 1: the mother, from a point in frame 0. It is followed up to frame 2; in frame 3 the new mask (one
    # daughter) overlaps the mother's less than iou_threshold, so tracking stops there.
    _click(viewer, 0, labels, 5)
    press(viewer, "s", shift=True)
    wait_for(tool)
    _assert_track(viewer.layers["current_object"].data, 1, labels, 5, {0, 1, 2})
    assert oracle["propagated"] == [1, 2, 3] and tool.lineage == {1: []}

    # The division: frame 3 is the first frame with two daughters; a 'division' point there ends track 1.
    menu.track_state.value = "division"
    _click(viewer, 3, labels, 13)
    assert list(viewer.layers["point_prompts"].properties["state"]) == ["track", "division"]
    press(viewer, "s", shift=True)
    wait_for(tool)
    _assert_track(viewer.layers["current_object"].data, 1, labels, 5, {0, 1, 2})
    assert tool.lineage == {1: [2, 3], 2: [], 3: []}
    assert tool.current_track_id == 2 and menu.track_id.value == "2" and menu.track_state.value == "track"
    assert menu.track_id.choices == ("1", "2", "3")

    # The daughters: track 2 (selected after the division) and track 3 (chosen in the menu).
    _click(viewer, 3, labels, 13)
    press(viewer, "s", shift=True)
    wait_for(tool)
    menu.track_id.value = "3"
    assert tool.current_track_id == 3
    _click(viewer, 3, labels, 14)
    press(viewer, "s")  # segment this frame only
    assert iou(viewer.layers["current_object"].data[3] == 3, labels[3] == 14) == 1.0
    press(viewer, "s", shift=True)
    wait_for(tool)
    current = viewer.layers["current_object"].data.copy()
    _assert_track(current, 1, labels, 5, {0, 1, 2})
    _assert_track(current, 2, labels, 13, set(range(3, 8)))
    _assert_track(current, 3, labels, 14, set(range(3, 8)))
    track_ids = np.asarray(viewer.layers["point_prompts"].properties["track_id"]).astype(int).tolist()
    assert track_ids == [1, 1, 2, 3]

    # Commit: the tracks get committed ids, the lineage follows, the tracks layer shows them.
    committed = viewer.layers["committed_objects"]
    committed.data = np.where(labels == 1, 7, 0).astype("uint32")  # a track committed before (id 7)
    tool.committed_lineages = [{7: []}]
    press(viewer, "c")
    expected = np.where(labels == 1, 7, 0) + sum(np.where(current == k, 7 + k, 0) for k in (1, 2, 3))
    np.testing.assert_array_equal(committed.data, expected)
    assert tool.committed_lineages == [{7: []}, {8: [9, 10], 9: [], 10: []}]
    tracks = viewer.layers["tracks"]
    track_data, graph = get_napari_track_data(expected, tool.committed_lineages)
    def by_track(data):  # napari orders the rows by track and time
        return data[np.lexsort((data[:, 1], data[:, 0]))]

    np.testing.assert_allclose(by_track(tracks.data), by_track(track_data))
    assert graph == {9: [8], 10: [8]} and {k: list(v) for k, v in tracks.graph.items()} == graph
    # A new lineage starts; prompts and current_object are cleared.
    assert tool.lineage == {1: []} and tool.current_track_id == 1 and menu.track_id.choices == ("1",)
    assert not viewer.layers["current_object"].data.any() and len(viewer.layers["point_prompts"].data) == 0


def test_tracking_stops_when_the_object_is_lost_and_clear_resets(tool, timelapse, oracle):
    viewer, tool = tool
    _, labels, _ = timelapse
    _click(viewer, 0, labels, 2)
    press(viewer, "s", shift=True)
    wait_for(tool)
    _assert_track(viewer.layers["current_object"].data, 1, labels, 2, set(range(8)))
    assert oracle["propagated"] == list(range(1, 8))
    tool.lineage = {1: [2, 3], 2: [], 3: []}
    press(viewer, "c", shift=True)  # clear all frames: prompts, current object and the lineage
    assert tool.lineage == {1: []} and not viewer.layers["current_object"].data.any()
    assert len(viewer.layers["point_prompts"].data) == 0


def test_nothing_to_commit_and_prompts_of_another_track(tool, timelapse, oracle, notifications):
    viewer, tool = tool
    _, labels, _ = timelapse
    press(viewer, "c")
    assert any("Nothing to commit" in text for _, text in notifications())
    assert "tracks" not in viewer.layers and not viewer.layers["committed_objects"].data.any()
    _click(viewer, 0, labels, 3)  # a point of track 1; track 2 has no prompts
    tool.widgets["tracking"].track_id.choices = ("1", "2")
    tool.widgets["tracking"].track_id.value = "2"
    press(viewer, "s")
    assert not viewer.layers["current_object"].data.any()
    assert any("Frame 0, track 2" in text for _, text in notifications())


def test_automatic_tracking_and_commit(tool, timelapse, monkeypatch):
    """Automatic tracking (the frames' segmentation given by an oracle, linked by the overlap linker) recovers the
    true tracks and lineages; committing auto_segmentation commits them with the lineages."""
    from tests.tracking._movies import assert_same_tracks, relabel_frames

    viewer, tool = tool
    _, labels, lineages = timelapse
    shuffled = relabel_frames(labels).astype("uint32")
    monkeypatch.setattr(AnnotatorState, "segment_automatically",
                        lambda self, i=None, min_object_size=100, **kwargs: shuffled[i])
    widget = tool.widgets["autosegment"]
    widget.tracking_model.value = "overlap"
    worker = widget()
    assert worker is not None
    wait_for(tool)
    auto = viewer.layers["auto_segmentation"].data.copy()
    assert_same_tracks(auto, tool.auto_lineages, labels, lineages)
    tool.widgets["commit"].layer.value = "auto_segmentation"
    press(viewer, "c")
    tool.widgets["commit"].layer.value = "current_object"
    committed = viewer.layers["committed_objects"].data
    assert_same_tracks(committed, tool.committed_lineages, labels, lineages)
    assert not viewer.layers["auto_segmentation"].data.any() and tool.auto_lineages is None
    assert len(viewer.layers["tracks"].data) == sum(len(np.unique(f)) - 1 for f in labels)


def test_tracking_menu_follows_the_selected_point():
    from napari.layers import Points, Shapes

    points = Points(ndim=3, property_choices={"label": ["positive", "negative"], "state": ["track", "division"],
                                              "track_id": ["1"]})
    shapes = Shapes(ndim=3, property_choices={"track_id": ["1"]})
    seen = []
    menu = create_tracking_menu(points, shapes, ["track", "division"], [1, 2, 5], on_track_id_changed=seen.append)
    menu.track_id.value = "5"
    menu.track_state.value = "division"
    points.add([0, 10, 10])
    menu.track_id.value = "2"
    menu.track_state.value = "track"
    points.add([1, 20, 20])
    assert list(points.properties["track_id"]) == ["5", "2"]
    assert list(points.properties["state"]) == ["division", "track"]
    assert list(points.properties["label"]) == ["positive", "positive"]
    assert seen[-2:] == [5, 2] and str(shapes.current_properties["track_id"][0]) == "2"
    points.selected_data = {0}  # napari shows the selected point's properties; the menu follows
    points.current_properties = {key: np.array([value[0]]) for key, value in points.properties.items()}
    assert menu.track_id.value == "5" and menu.track_state.value == "division"


def test_command_line_and_bad_input(tmp_path, capsys, monkeypatch):
    import importlib

    import tifffile

    from micro_sam import util

    module = importlib.import_module("micro_sam.sam_annotator.annotator_tracking")
    monkeypatch.setattr(util, "get_sam_model", lambda *a, **k: pytest.fail("bad input must fail before the model"))
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.zeros((32, 32), "uint8"))
    assert module.main(["-i", str(image), "-m", "vit_t_demo"]) == 1
    assert "(Z, Y, X)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = capsys.readouterr().out
    for option in ("--input", "--key", "--embedding_path", "--model_type", "--checkpoint", "--decoder_path",
                   "--device", "--tile_shape", "--halo", "--commit_path"):
        assert option in text, option
    with pytest.raises(ValueError, match=r"\(Z, Y, X\)"):
        annotator_tracking(np.zeros((32, 32)), model_type="vit_t_demo", return_viewer=True)


def test_commit_path_keeps_tracks_and_lineages(tool, timelapse, oracle, tmp_path):
    """Commits (tracks and lineages) are saved in the commit file and loaded again for the same movie."""
    import zarr

    viewer, tool = tool
    _, labels, _ = timelapse
    commit_path = tmp_path / "commits.zarr"
    commit = tool.widgets["commit"]
    commit.commit_path.value = str(commit_path)
    try:
        tool.lineage = {1: [2, 3], 2: [], 3: []}  # one mother, daughters not annotated: they are left out
        _click(viewer, 0, labels, 5)
        press(viewer, "s", shift=True)
        wait_for(tool)
        press(viewer, "c")
        assert tool.committed_lineages == [{1: []}]
        group = zarr.open_group(str(commit_path), mode="r")
        np.testing.assert_array_equal(group["committed_objects"][...], viewer.layers["committed_objects"].data)
        assert group.attrs["committed_lineages"] == [{"1": []}]
        tool.image_changed()  # the same movie opened again: the commits are loaded from commit_path
        assert tool.committed_lineages == [{1: []}]
        np.testing.assert_array_equal(viewer.layers["committed_objects"].data, group["committed_objects"][...])
        assert viewer.layers["tracks"].data[:, 0].tolist() == [1, 1, 1]
    finally:
        commit.commit_path.value = ""
        tool.image_changed()


@pytest.mark.slow
def test_with_the_bundled_model(cached_demo_model, tmp_path):
    """annotator_tracking with vit_t_demo: a point on a nucleus in frame 0, Shift-S, C; the committed track matches
    the true track in every frame; screenshot with the tracks layer."""
    from micro_sam.sample_data import synthetic_timelapse

    movie, labels, lineages = synthetic_timelapse(n_frames=6, shape=(192, 192), seed=2)
    dividing = {track for lineage in lineages for track, children in lineage.items() if children}
    always = sorted(set(np.unique(labels[0])) & set(np.unique(labels[-1])) - {0} - dividing)
    viewer = annotator_tracking(movie, embedding_path=tmp_path / "embeddings.zarr", model_type="vit_t_demo",
                                device="cpu", return_viewer=True)
    try:
        from qtpy.QtWidgets import QApplication

        tool = next(w for w in QApplication.allWidgets() if isinstance(w, AnnotatorTracking) and w.viewer is viewer)
        tool.widgets["segment_nd"].projection.value = "mask"
        track = always[0]
        _click(viewer, 0, labels, track)
        press(viewer, "s", shift=True)
        wait_for(tool)
        current = viewer.layers["current_object"].data
        ious = [iou(current[t] == 1, labels[t] == track) for t in range(len(labels))]
        assert min(ious) > 0.65 and np.mean(ious) > 0.75, ious  # (frame 0: vit_t_demo from a single point)
        press(viewer, "c")
        committed = viewer.layers["committed_objects"].data
        assert tool.committed_lineages == [{1: []}] and np.array_equal(committed != 0, current != 0)
        np.testing.assert_array_equal(viewer.layers["tracks"].data[:, :2], [[1, t] for t in range(6)])
        path = tmp_path / "annotator_tracking.png"
        screenshot = viewer.screenshot(str(path), canvas_only=False)
        assert screenshot[..., :3].std() > 5
    finally:
        viewer.close()
