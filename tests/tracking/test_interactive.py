"""track_mask_across_frames: one object followed forward with SAM (stand-in for SAM, and the bundled model)."""
import numpy as np
import pytest
from skimage.draw import disk

from micro_sam import multi_dimensional_segmentation as mds
from micro_sam.multi_dimensional_segmentation import track_mask_across_frames


def _moving_disk(xs, shape=(48, 96), radius=6):
    movie = np.zeros((len(xs),) + shape, dtype="uint8")
    for t, x in enumerate(xs):
        if x is not None:
            movie[t][disk((24, x), radius, shape=shape)] = 1
    return movie


def _centroid(mask):
    return np.array([c.mean() for c in np.nonzero(mask)])


@pytest.fixture
def stub_sam(monkeypatch):
    """SAM stand-in: 'segments' the true object of the frame; records the prompt masks it was given."""
    state = {"truth": None, "prompts": {}}

    def segment_from_mask(predictor, mask, image_embeddings=None, i=None, **kwargs):
        assert predictor == "predictor" and image_embeddings == "embeddings"
        state["prompts"][i] = mask.copy()
        return state["truth"][i] != 0

    monkeypatch.setattr(mds, "_segment_from_mask", segment_from_mask)
    return state


def _run(truth, annotated, stub_sam, **kwargs):
    stub_sam["truth"] = truth
    given = np.zeros_like(truth)
    given[annotated] = truth[annotated]
    return track_mask_across_frames(given, "predictor", "embeddings", annotated, **kwargs)


def test_follows_the_object_with_motion_model(stub_sam):
    truth = _moving_disk([10 + 3 * t for t in range(10)])
    steps = []
    result, has_division = _run(truth, [0], stub_sam, update_progress=steps.append)
    np.testing.assert_array_equal(result, truth)
    assert result.dtype == np.uint32 and not has_division and sum(steps) == 9
    # Frame 1 is prompted with the unshifted mask of frame 0; from frame 2 on the prompt is shifted by the motion
    # (3 px per frame), i.e. it lies exactly on the object.
    np.testing.assert_allclose(_centroid(stub_sam["prompts"][1]), _centroid(truth[0]))
    for t in range(2, 10):
        np.testing.assert_allclose(_centroid(stub_sam["prompts"][t]), _centroid(truth[t]))


@pytest.mark.parametrize("smoothing, expected_shift", [(0.5, 3.0), (0.0, 4.0), (1.0, 2.0)])
def test_motion_smoothing(stub_sam, smoothing, expected_shift):
    truth = _moving_disk([20, 22, 26, 32, 40])  # displacements 2, 4, 6, 8
    _run(truth, [0], stub_sam, motion_smoothing=smoothing)
    # Frame 2: motion = 2; frame 3: smoothing * 2 + (1 - smoothing) * 4.
    np.testing.assert_allclose(_centroid(stub_sam["prompts"][2]) - _centroid(truth[1]), [0, 2])
    np.testing.assert_allclose(_centroid(stub_sam["prompts"][3]) - _centroid(truth[2]), [0, expected_shift])


def test_stops_when_the_object_is_lost(stub_sam):
    truth = _moving_disk([10 + 3 * t for t in range(6)] + [None] * 4)
    result, _ = _run(truth, [0], stub_sam)
    np.testing.assert_array_equal(result, truth)
    assert sorted(stub_sam["prompts"]) == [1, 2, 3, 4, 5, 6]  # stopped at frame 6 (IoU 0 < 0.5)


def test_no_stop_before_the_last_segmented_frame(stub_sam):
    xs = [10 + 3 * t for t in range(10)]
    xs[3] = None  # SAM loses the object in frame 3; it is segmented again in frame 5
    truth = _moving_disk(xs)
    result, _ = _run(truth, [0, 5], stub_sam, iou_threshold=0.9)
    expected = truth.copy()
    expected[4] = 0  # nothing to prompt frame 4 with; tracking resumes from the segmented frame 5
    np.testing.assert_array_equal(result, expected)
    assert sorted(stub_sam["prompts"]) == [1, 2, 3, 6, 7, 8, 9]


def test_division_and_stop_frames(stub_sam):
    truth = _moving_disk([10 + 3 * t for t in range(10)])
    result, has_division = _run(truth, [0, 4], stub_sam, division_frames=[4])
    assert has_division and sorted(stub_sam["prompts"]) == [1, 2, 3]
    np.testing.assert_array_equal(result[:5], truth[:5])
    assert not result[5:].any()

    stub_sam["prompts"].clear()
    given = truth.copy()
    given[1:] = 0  # frame 4 marks the end of the object (stop_upper): it stays empty
    result, has_division = track_mask_across_frames(given, "predictor", "embeddings", [0, 4], stop_upper=True)
    assert not has_division and sorted(stub_sam["prompts"]) == [1, 2, 3]
    np.testing.assert_array_equal(result[:4], truth[:4])
    assert not result[4:].any()


@pytest.mark.parametrize("kwargs, match", [
    ({"segmented_frames": []}, "at least one frame"),
    ({"segmented_frames": [0, 12]}, r"\[0, 9\]"),
    ({"segmented_frames": [0.5]}, "integer frame indices"),
    ({"division_frames": [3]}, "must be segmented frames"),
    ({"iou_threshold": 1.5}, "iou_threshold"),
    ({"motion_smoothing": -0.1}, "motion_smoothing"),
    ({"projection": "lasso"}, "Invalid projection"),
])
def test_bad_input(kwargs, match):
    arguments = dict(segmentation=np.zeros((10, 8, 8), dtype="uint8"), predictor=None, image_embeddings=None,
                     segmented_frames=[0])
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        track_mask_across_frames(**arguments)
    with pytest.raises(ValueError, match=r"\(T, Y, X\)"):
        track_mask_across_frames(np.zeros((8, 8)), None, None, [0])


def test_input_not_modified(stub_sam):
    truth = _moving_disk([10 + 3 * t for t in range(5)])
    given = np.zeros_like(truth)
    given[0] = truth[0]
    copy = given.copy()
    stub_sam["truth"] = truth
    track_mask_across_frames(given, "predictor", "embeddings", 0)
    np.testing.assert_array_equal(given, copy)


@pytest.mark.slow
def test_with_the_bundled_model(tmp_path):
    """A nucleus of the synthetic time-lapse followed with vit_t_demo from its true mask in the first frame."""
    from micro_sam.sample_data import synthetic_timelapse
    from micro_sam.util import get_sam_model, precompute_image_embeddings

    movie, labels, lineages = synthetic_timelapse(n_frames=8, shape=(192, 192), seed=2)
    dividing = {track for lineage in lineages for track, children in lineage.items() if children}
    always = set(np.unique(labels[0])) & set(np.unique(labels[-1])) - {0} - dividing
    track = sorted(always)[0]
    predictor = get_sam_model("vit_t_demo", device="cpu")
    embeddings = precompute_image_embeddings(predictor, movie, save_path=tmp_path / "e.zarr", ndim=3, verbose=False)
    given = np.zeros(labels.shape, dtype="uint8")
    given[0] = labels[0] == track
    result, has_division = track_mask_across_frames(given, predictor, embeddings, [0], projection="mask")
    ious = [np.logical_and(mask, truth == track).sum() / np.logical_or(mask, truth == track).sum()
            for mask, truth in zip(result, labels)]
    assert not has_division and min(ious) > 0.7, ious
