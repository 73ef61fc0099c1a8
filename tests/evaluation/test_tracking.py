"""Tracking metrics on hand-made cases with known answers."""
import numpy as np
import pytest

from micro_sam.evaluation.tracking import evaluate_tracking, match_frame_objects

from tracking._movies import division_movie

TRUE_LINEAGES = [{1: []}, {2: [3, 4], 3: [], 4: []}]
N_NODES, N_LINKS = 6 + 3 + 3 + 3, 5 + 2 + 2 + 2 + 2  # objects and links (incl. the two division links)


def test_perfect_tracking_with_other_ids():
    truth = division_movie()
    prediction = np.where(truth > 0, truth + 10, 0)
    scores = evaluate_tracking(prediction, [{11: []}, {12: [13, 14]}], truth, TRUE_LINEAGES)
    for key in ("tra", "lnk", "seg", "segmentation_accuracy", "link_recall", "link_precision", "division_recall",
                "division_precision"):
        assert scores[key] == 1.0, key
    assert scores["n_true_links"] == scores["n_predicted_links"] == N_LINKS
    assert scores["n_true_divisions"] == scores["n_predicted_divisions"] == 1


def test_broken_track():
    truth = division_movie()
    prediction = truth.copy()
    prediction[3:][truth[3:] == 1] = 9  # track 1 is split into two tracks at frame 3
    scores = evaluate_tracking(prediction, [{1: []}, {9: []}, {2: [3, 4]}], truth, TRUE_LINEAGES)
    assert scores["link_recall"] == pytest.approx((N_LINKS - 1) / N_LINKS)
    assert scores["link_precision"] == 1.0 and scores["division_recall"] == 1.0
    assert (scores["edges_added"], scores["edges_deleted"], scores["edges_changed"]) == (1, 0, 0)
    assert scores["lnk"] == pytest.approx(1 - 1.5 / (1.5 * N_LINKS))
    assert scores["tra"] == pytest.approx(1 - 1.5 / (10 * N_NODES + 1.5 * N_LINKS))


def test_missed_division():
    truth = division_movie()
    prediction = truth.copy()
    prediction[truth == 3] = 2  # the mother continues into the first daughter ...
    scores = evaluate_tracking(prediction, [{1: []}, {2: []}, {4: []}], truth, TRUE_LINEAGES)  # ... 4 is new
    assert scores["division_recall"] == 0.0 and scores["n_predicted_divisions"] == 0
    assert scores["division_precision"] == 1.0  # nothing predicted, nothing wrong
    assert scores["link_recall"] == pytest.approx((N_LINKS - 1) / N_LINKS)
    assert (scores["edges_added"], scores["edges_deleted"], scores["edges_changed"]) == (1, 0, 1)
    assert scores["lnk"] == pytest.approx(1 - 2.5 / (1.5 * N_LINKS))
    assert scores["tra"] == pytest.approx(1 - 2.5 / (10 * N_NODES + 1.5 * N_LINKS))


def test_false_division():
    truth = division_movie()
    truth_lineages = [{1: []}, {2: []}, {3: []}, {4: []}]  # in the truth, 3 and 4 are unrelated new tracks
    scores = evaluate_tracking(truth, TRUE_LINEAGES, truth, truth_lineages)
    assert scores["division_precision"] == 0.0 and scores["division_recall"] == 1.0
    assert scores["link_precision"] == pytest.approx((N_LINKS - 2) / N_LINKS) and scores["edges_deleted"] == 2


def test_merge_and_false_positive():
    truth = np.zeros((2, 4, 12), dtype="uint8")
    truth[:, :, 0:4], truth[:, :, 6:10] = 1, 2
    prediction = np.zeros_like(truth)
    prediction[0, :, 0:4], prediction[0, :, 6:10], prediction[0, :, 11] = 1, 2, 3  # 3: a false positive
    prediction[1, :, 0:10] = 1  # one object over both
    assert match_frame_objects(prediction[1], truth[1]) == {1: 1, 2: 1}
    scores = evaluate_tracking(prediction, [{1: []}, {2: []}, {3: []}], truth, [{1: []}, {2: []}])
    assert (scores["splits"], scores["false_positives"], scores["false_negatives"]) == (1, 1, 0)
    assert (scores["edges_added"], scores["edges_deleted"]) == (1, 0)
    assert scores["tra"] == pytest.approx(1 - (5 + 1 + 1.5) / (10 * 4 + 1.5 * 2))
    assert scores["segmentation_accuracy"] == pytest.approx((2 / 3 + 0) / 2)  # frame 1: IoU 16 / 40 < 0.5
    assert scores["seg"] == pytest.approx((1 + 1 + 0.4 + 0.4) / 4)


def test_bad_input():
    truth = division_movie()
    with pytest.raises(ValueError, match="same shape"):
        evaluate_tracking(truth[:3], [], truth, TRUE_LINEAGES)
    with pytest.raises(ValueError, match="integer labels"):
        evaluate_tracking(truth.astype("float32"), [], truth, TRUE_LINEAGES)
    with pytest.raises(ValueError, match="starts in frame 0, but its mother 2"):
        evaluate_tracking(truth, [{2: [1]}], truth, TRUE_LINEAGES)
    with pytest.raises(ValueError, match="two mothers"):
        evaluate_tracking(truth, [{1: [3]}, {2: [3]}], truth, TRUE_LINEAGES)
