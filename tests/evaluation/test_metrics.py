"""Metrics on constructed label images whose scores can be computed by hand."""
import itertools

import numpy as np
import pytest

from micro_sam.evaluation.metrics import (
    DEFAULT_THRESHOLDS, iou_matrix, match_objects, matching, mean_segmentation_accuracy,
)


def _square(shape=(40, 40), top_left=(5, 5), size=(10, 10), value=1, out=None):
    out = np.zeros(shape, dtype="uint32") if out is None else out
    out[top_left[0]:top_left[0] + size[0], top_left[1]:top_left[1] + size[1]] = value
    return out


def _two_squares():
    gt = _square(top_left=(5, 5), value=1)
    return _square(top_left=(5, 15), value=2, out=gt)  # directly right of object 1: one 10x20 block


def test_default_thresholds():
    np.testing.assert_allclose(DEFAULT_THRESHOLDS, [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])


def test_perfect_match_with_different_ids():
    gt = _two_squares()
    seg = np.zeros_like(gt)
    seg[gt == 1], seg[gt == 2] = 17, 3
    msa, accuracies = mean_segmentation_accuracy(seg, gt, return_accuracies=True)
    assert msa == 1.0 and accuracies == [1.0] * 10
    stats = matching(seg, gt)
    assert (stats["precision"], stats["recall"], stats["f1"], stats["segmentation_accuracy"]) == (1, 1, 1, 1)
    seg_ids, gt_ids, scores = match_objects(seg, gt)
    assert seg_ids.tolist() == [3, 17] and gt_ids.tolist() == [2, 1] and scores.tolist() == [1.0, 1.0]


def test_shifted_object():
    # 10x10 square shifted by 2 px: intersection 80, union 120 -> IoU 2/3.
    gt = _square(top_left=(5, 5))
    seg = _square(top_left=(7, 5))
    matrix, seg_ids, gt_ids = iou_matrix(seg, gt)
    assert seg_ids.tolist() == [1] and gt_ids.tolist() == [1]
    np.testing.assert_allclose(matrix, [[80 / 120]])
    msa, accuracies = mean_segmentation_accuracy(seg, gt, return_accuracies=True)
    # Matched for thresholds 0.5, 0.55, 0.6, 0.65 (<= 0.667), unmatched (1 FP + 1 FN) above.
    assert accuracies == [1.0] * 4 + [0.0] * 6
    assert msa == pytest.approx(0.4)


def test_merged_objects():
    # One predicted 10x20 block covering two 10x10 ground-truth objects: IoU 100 / 200 = 0.5 with each.
    gt = _two_squares()
    seg = (gt > 0).astype("uint8")
    matrix, _, _ = iou_matrix(seg, gt)
    np.testing.assert_allclose(matrix, [[0.5, 0.5]])
    msa, accuracies = mean_segmentation_accuracy(seg, gt, return_accuracies=True)
    # At 0.5 (inclusive) one pair matches: TP 1, FP 0, FN 1 -> SA 1/2; nothing matches above.
    assert accuracies == [0.5] + [0.0] * 9
    assert msa == pytest.approx(0.05)
    stats = matching(seg, gt)
    assert (stats["tp"], stats["fp"], stats["fn"]) == (1, 0, 1)
    assert stats["precision"] == 1.0 and stats["recall"] == 0.5 and stats["f1"] == pytest.approx(2 / 3)


def test_split_object():
    # One ground-truth 10x20 block predicted as two 10x10 halves: TP 1, FP 1, FN 0 at 0.5.
    seg = _two_squares()
    gt = (seg > 0).astype("uint16")
    msa, accuracies = mean_segmentation_accuracy(seg, gt, return_accuracies=True)
    assert accuracies == [0.5] + [0.0] * 9
    stats = matching(seg, gt)
    assert (stats["tp"], stats["fp"], stats["fn"]) == (1, 1, 0)
    assert stats["precision"] == 0.5 and stats["recall"] == 1.0


def test_missing_object():
    gt = _two_squares()
    seg = np.where(gt == 1, 1, 0)
    msa, accuracies = mean_segmentation_accuracy(seg, gt, return_accuracies=True)
    assert accuracies == [0.5] * 10 and msa == 0.5
    stats = matching(seg, gt)
    assert stats["precision"] == 1.0 and stats["recall"] == 0.5 and stats["f1"] == pytest.approx(2 / 3)


def test_extra_object():
    gt = _two_squares()
    seg = _square(top_left=(25, 25), value=9, out=gt.copy())
    msa = mean_segmentation_accuracy(seg, gt)
    assert msa == pytest.approx(2 / 3)
    stats = matching(seg, gt)
    assert stats["precision"] == pytest.approx(2 / 3) and stats["recall"] == 1.0 and stats["f1"] == pytest.approx(0.8)


def test_empty_prediction():
    gt = _two_squares()
    seg = np.zeros_like(gt)
    msa, accuracies = mean_segmentation_accuracy(seg, gt, return_accuracies=True)
    assert msa == 0.0 and accuracies == [0.0] * 10
    stats = matching(seg, gt)
    assert (stats["tp"], stats["fp"], stats["fn"]) == (0, 0, 2)
    assert stats["precision"] == stats["recall"] == stats["f1"] == 0.0


def test_empty_groundtruth_scores_zero():
    # Same convention as elf: no true positive -> every score is 0, also if both images are empty.
    gt = np.zeros((40, 40), dtype="uint32")
    assert mean_segmentation_accuracy(_two_squares(), gt) == 0.0
    assert mean_segmentation_accuracy(np.zeros_like(gt), gt) == 0.0
    stats = matching(np.zeros_like(gt), gt)
    assert stats["precision"] == stats["recall"] == stats["f1"] == 0.0
    assert (stats["tp"], stats["fp"], stats["fn"]) == (0, 0, 0)
    matrix, seg_ids, gt_ids = iou_matrix(_two_squares(), gt)
    assert matrix.shape == (2, 0) and gt_ids.size == 0


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(40, 40\).*\(40, 41\)"):
        mean_segmentation_accuracy(np.zeros((40, 40), "uint8"), np.zeros((40, 41), "uint8"))
    with pytest.raises(ValueError, match="shape"):
        matching(np.zeros((4, 4), "uint8"), np.zeros((4,), "uint8"))


def test_invalid_thresholds_and_criterion():
    gt = _two_squares()
    for bad in ([], [0.0], [1.5], [-0.1]):
        with pytest.raises(ValueError, match="threshold"):
            mean_segmentation_accuracy(gt, gt, thresholds=bad)
    with pytest.raises(ValueError, match="criterion"):
        matching(gt, gt, criterion="dice")


def test_custom_thresholds():
    gt = _square(top_left=(5, 5))
    seg = _square(top_left=(7, 5))  # IoU 2/3
    msa, accuracies = mean_segmentation_accuracy(seg, gt, thresholds=[0.6, 0.7], return_accuracies=True)
    assert accuracies == [1.0, 0.0] and msa == 0.5


def test_optimal_matching_beats_greedy_at_low_threshold():
    # 1D label images. gt1 = [0, 10), gt2 = [10, 20); predicted A = [4, 14), B = [0, 4).
    # IoU(A, gt1) = 6/14, IoU(A, gt2) = 4/16, IoU(B, gt1) = 4/10. A greedy matching by IoU takes (A, gt1) and
    # leaves B unmatched; the optimal one-to-one matching at threshold 0.2 matches (A, gt2) and (B, gt1).
    gt = np.zeros(30, "uint8")
    gt[0:10], gt[10:20] = 1, 2
    seg = np.zeros(30, "uint8")
    seg[4:14], seg[0:4] = 5, 6
    matrix, seg_ids, gt_ids = iou_matrix(seg, gt)
    np.testing.assert_allclose(matrix, [[6 / 14, 4 / 16], [4 / 10, 0.0]])
    seg_ids, gt_ids, scores = match_objects(seg, gt, threshold=0.2)
    assert seg_ids.tolist() == [5, 6] and gt_ids.tolist() == [2, 1]
    np.testing.assert_allclose(scores, [0.25, 0.4])
    stats = matching(seg, gt, threshold=0.2)
    assert (stats["tp"], stats["fp"], stats["fn"]) == (2, 0, 0)
    # At 0.3 only (A, gt1) and (B, gt1) qualify and they compete for gt1: one match.
    assert matching(seg, gt, threshold=0.3)["tp"] == 1
    # Equal cardinality -> the pair with the higher score wins.
    seg_ids, gt_ids, _ = match_objects(np.where(seg == 5, 5, 0), gt, threshold=0.2)
    assert gt_ids.tolist() == [1]


def test_criteria_iot_and_iop():
    # Predicted 10x10 square inside a 10x20 ground-truth block: it covers half of the ground-truth object
    # (iot = 0.5) and lies fully inside it (iop = 1).
    gt = (_two_squares() > 0).astype("uint8")
    seg = _square(top_left=(5, 5))
    assert matching(seg, gt, threshold=0.9, criterion="iop")["tp"] == 1
    assert matching(seg, gt, threshold=0.6, criterion="iot")["tp"] == 0
    assert matching(seg, gt, threshold=0.5, criterion="iot")["tp"] == 1


def test_ignore_label_none_counts_background():
    gt = _square(top_left=(5, 5))
    seg = _square(top_left=(7, 5))
    # Background: 1600 - 100 px each, intersection 1600 - 120 = 1480, union 1520 -> matches at all thresholds.
    # Above IoU 2/3 the squares do not match: TP 1 (background), FP 1, FN 1 -> SA 1/3.
    msa, accuracies = mean_segmentation_accuracy(seg, gt, ignore_label=None, return_accuracies=True)
    assert accuracies[:4] == [1.0] * 4
    np.testing.assert_allclose(accuracies[4:], [1 / 3] * 6)
    assert msa == pytest.approx(0.6)


def test_label_value_range_and_dtype_do_not_matter():
    gt = _two_squares()
    seg = _square(top_left=(7, 5), value=1, out=np.zeros_like(gt))
    seg = _square(top_left=(5, 15), value=2, out=seg)
    expected = mean_segmentation_accuracy(seg, gt, return_accuracies=True)

    big = np.where(seg > 0, seg.astype("uint64") + 2 ** 40, 0).astype("uint64")
    negative = np.where(gt > 0, -gt.astype("int64"), 0)
    as_float = gt.astype("float32")
    assert mean_segmentation_accuracy(big, gt, return_accuracies=True) == expected
    assert mean_segmentation_accuracy(seg, negative, return_accuracies=True) == expected
    assert mean_segmentation_accuracy(seg, as_float, return_accuracies=True) == expected


def test_inputs_are_not_modified():
    gt, seg = _two_squares(), _square(top_left=(7, 5))
    gt_copy, seg_copy = gt.copy(), seg.copy()
    mean_segmentation_accuracy(seg, gt)
    matching(seg, gt, threshold=0.1)
    np.testing.assert_array_equal(gt, gt_copy)
    np.testing.assert_array_equal(seg, seg_copy)


def _brute_force_tp(seg, gt, threshold):
    """Reference: IoU per object pair by masks, maximum matching by trying all assignments (tiny inputs)."""
    seg_ids = [i for i in np.unique(seg) if i != 0]
    gt_ids = [i for i in np.unique(gt) if i != 0]
    ok = np.zeros((len(seg_ids), len(gt_ids)), bool)
    for a, i in enumerate(seg_ids):
        for b, j in enumerate(gt_ids):
            inter = np.logical_and(seg == i, gt == j).sum()
            union = np.logical_or(seg == i, gt == j).sum()
            ok[a, b] = inter > 0 and inter / union >= threshold
    if len(seg_ids) <= len(gt_ids):
        return max((sum(ok[a, p[a]] for a in range(len(seg_ids)))
                    for p in itertools.permutations(range(len(gt_ids)), len(seg_ids))), default=0)
    return max((sum(ok[p[b], b] for b in range(len(gt_ids)))
                for p in itertools.permutations(range(len(seg_ids)), len(gt_ids))), default=0)


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_reference(seed):
    rng = np.random.default_rng(seed)

    def random_labels(n):
        labels = np.zeros((24, 24), "uint16")
        for i in range(1, n + 1):
            (y, x), (h, w) = rng.integers(0, 20, 2), rng.integers(3, 9, 2)
            labels[y:y + h, x:x + w] = i
        return labels

    gt, seg = random_labels(5), random_labels(5)
    for threshold in (0.1, 0.3, 0.5, 0.7):
        assert matching(seg, gt, threshold=threshold)["tp"] == _brute_force_tp(seg, gt, threshold)


def test_object_area_ratios_known_answer():
    from micro_sam.evaluation.metrics import object_area_ratios

    gt = np.zeros((10, 12), dtype="uint16")
    gt[:4, :4] = 1          # 16 px
    gt[6:, 6:10] = 2        # 16 px
    gt[0, 10:] = 3          # 2 px, missed
    seg = np.zeros_like(gt)
    seg[:5, :5] = 7         # covers object 1: 25 px -> 25 / 16
    seg[6:8, 6:10] = 9      # covers half of object 2: 8 px -> 0.5
    seg[8:, 6:] = 4         # the other half of object 2 (8 px of its 12): a tie in overlap, the first id wins
    ratios = object_area_ratios(seg, gt)
    assert ratios == {1: 25 / 16, 2: 12 / 16}
    # a merge: one predicted object over both objects gives each a ratio of 2
    merged = np.where(gt > 0, 5, 0)
    merged[gt == 3] = 0
    assert object_area_ratios(merged, gt) == {1: 2.0, 2: 2.0}
    with pytest.raises(ValueError, match="same shape"):
        object_area_ratios(seg[:5], gt)
