"""Object matching metrics for instance segmentations (pure numpy / scipy).

All functions take two label images of identical shape: ``segmentation`` (the prediction to evaluate)
and ``groundtruth``. Every distinct value is one object; ``ignore_label`` (0 = background by default)
is not an object. Pixels of a predicted object that lie on ground-truth background still count towards
the size of the predicted object (and vice versa), so they lower its IoU.

The semantics follow the conventions of the DSB 2018 challenge as used by ``elf.evaluation`` (which the
published micro_sam relies on):

* objects are matched one-to-one; a pair can only match if its score is ``>= threshold``,
* the matching maximizes the number of matched pairs (ties are broken towards higher scores),
* segmentation accuracy ``SA = TP / (TP + FP + FN)``, precision ``TP / (TP + FP)``,
  recall ``TP / (TP + FN)``, F1 ``2 TP / (2 TP + FP + FN)``; every score is 0 when ``TP == 0``
  (in particular when the ground truth contains no object),
* the mean segmentation accuracy (mSA) averages SA over the thresholds ``np.arange(0.5, 1.0, 0.05)``.

The overlap between objects is computed with a single contingency table (``np.bincount`` over pairs of
compacted labels, or ``np.unique`` for sparse / very large label values), i.e. without looping over
objects. Only object pairs that actually overlap are stored.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = [
    "DEFAULT_THRESHOLDS",
    "dice_score",
    "iou_matrix",
    "match_objects",
    "matching",
    "mean_segmentation_accuracy",
    "object_area_ratios",
    "segmentation_accuracy",
    "precision",
    "recall",
    "f1",
]

#: The overlap thresholds 0.5, 0.55, ..., 0.95 used for the mean segmentation accuracy.
#: Created with ``np.arange`` exactly like elf does, so that borderline scores are treated identically.
DEFAULT_THRESHOLDS = np.arange(0.5, 1.0, 0.05)

_CRITERIA = ("iou", "iot", "iop")


#
# Counting scores.
#

def segmentation_accuracy(tp: int, fp: int, fn: int) -> float:
    """Segmentation accuracy ``TP / (TP + FP + FN)``; 0 if there is no true positive."""
    return tp / (tp + fp + fn) if tp > 0 else 0.0


def precision(tp: int, fp: int, fn: int) -> float:
    """Precision ``TP / (TP + FP)``; 0 if there is no true positive. ``fn`` is unused."""
    return tp / (tp + fp) if tp > 0 else 0.0


def recall(tp: int, fp: int, fn: int) -> float:
    """Recall ``TP / (TP + FN)``; 0 if there is no true positive. ``fp`` is unused."""
    return tp / (tp + fn) if tp > 0 else 0.0


def f1(tp: int, fp: int, fn: int) -> float:
    """F1 score ``2 TP / (2 TP + FP + FN)``; 0 if there is no true positive."""
    return 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0


#
# Contingency table.
#

def _compact_labels(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map the values of ``labels`` to 0..n-1.

    Returns the sorted unique values (n,), the compact index of every pixel (flattened) and the pixel count
    per value (n,).
    """
    flat = labels.ravel()
    if flat.dtype == np.bool_:
        flat = flat.view(np.uint8)
    if np.issubdtype(flat.dtype, np.integer) and flat.size > 0:
        low, high = int(flat.min()), int(flat.max())
        # Dense bincount is fast when the label values are not much larger than the number of pixels.
        if low >= 0 and high <= max(2 ** 16, 4 * flat.size):
            flat_idx = flat.astype(np.intp, copy=False)
            counts = np.bincount(flat_idx, minlength=high + 1)
            ids = np.flatnonzero(counts)
            lut = np.zeros(high + 1, dtype=np.intp)
            lut[ids] = np.arange(len(ids))
            return ids.astype(labels.dtype), lut[flat_idx], counts[ids]
    ids, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    return ids, inverse.ravel(), counts


@dataclass
class _PairScores:
    """Scores of all overlapping (prediction, ground-truth) object pairs, background removed."""
    seg_ids: np.ndarray  # (n_pred,) label values of the predicted objects
    gt_ids: np.ndarray  # (n_true,) label values of the ground-truth objects
    rows: np.ndarray  # (n_pairs,) index into seg_ids
    cols: np.ndarray  # (n_pairs,) index into gt_ids
    scores: np.ndarray  # (n_pairs,) overlap score of the pair, in (0, 1]

    @property
    def n_pred(self) -> int:
        return len(self.seg_ids)

    @property
    def n_true(self) -> int:
        return len(self.gt_ids)


def _check_inputs(segmentation: np.ndarray, groundtruth: np.ndarray, criterion: str = "iou") -> None:
    if segmentation.shape != groundtruth.shape:
        raise ValueError(
            f"The segmentation shape {segmentation.shape} does not match the groundtruth shape {groundtruth.shape}."
        )
    if criterion not in _CRITERIA:
        raise ValueError(f"Invalid criterion {criterion!r}, expected one of {_CRITERIA}.")


def _same_shape(segmentation, groundtruth) -> Tuple[np.ndarray, np.ndarray]:
    """Both as arrays; a ValueError if their shapes differ."""
    segmentation, groundtruth = np.asarray(segmentation), np.asarray(groundtruth)
    if segmentation.shape != groundtruth.shape:
        raise ValueError(f"segmentation (shape {segmentation.shape}) and groundtruth (shape {groundtruth.shape}) "
                         "must have the same shape.")
    return segmentation, groundtruth


def _pair_scores(
    segmentation: np.ndarray, groundtruth: np.ndarray, criterion: str, ignore_label: Optional[int]
) -> _PairScores:
    segmentation, groundtruth = np.asarray(segmentation), np.asarray(groundtruth)
    _check_inputs(segmentation, groundtruth, criterion)

    seg_ids, seg_inv, seg_sizes = _compact_labels(segmentation)
    gt_ids, gt_inv, gt_sizes = _compact_labels(groundtruth)

    n_seg, n_gt = len(seg_ids), len(gt_ids)
    codes = seg_inv.astype(np.int64) * n_gt + gt_inv
    n_cells = n_seg * n_gt
    if n_cells <= max(2 ** 20, 2 * codes.size):
        table = np.bincount(codes, minlength=n_cells)
        pair_codes = np.flatnonzero(table)
        overlap = table[pair_codes]
    else:
        pair_codes, overlap = np.unique(codes, return_counts=True)
    rows, cols = np.divmod(pair_codes, n_gt) if n_gt > 0 else (pair_codes, pair_codes)

    overlap = overlap.astype(np.float64)
    size_seg, size_gt = seg_sizes[rows].astype(np.float64), gt_sizes[cols].astype(np.float64)
    if criterion == "iou":
        scores = overlap / (size_seg + size_gt - overlap)
    elif criterion == "iot":
        scores = overlap / size_gt
    else:
        scores = overlap / size_seg

    # Remove the ignore label from the objects and from the pairs.
    keep_seg = np.ones(n_seg, dtype=bool) if ignore_label is None else seg_ids != ignore_label
    keep_gt = np.ones(n_gt, dtype=bool) if ignore_label is None else gt_ids != ignore_label
    keep_pair = keep_seg[rows] & keep_gt[cols]
    new_row = np.cumsum(keep_seg) - 1
    new_col = np.cumsum(keep_gt) - 1
    return _PairScores(
        seg_ids=seg_ids[keep_seg], gt_ids=gt_ids[keep_gt],
        rows=new_row[rows[keep_pair]], cols=new_col[cols[keep_pair]], scores=scores[keep_pair],
    )


#
# Matching.
#

def _match_pairs(
    pairs: _PairScores, threshold: float, unique: bool
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximum cardinality one-to-one matching among pairs with ``score >= threshold``.

    Returns the row indices, column indices and scores of the matched pairs, sorted by row.
    If ``unique`` is set, every object is known to have at most one candidate (IoU > 0.5), so all candidates match.
    """
    candidate = pairs.scores >= threshold
    rows, cols, scores = pairs.rows[candidate], pairs.cols[candidate], pairs.scores[candidate]
    if unique or len(rows) <= 1:
        order = np.argsort(rows, kind="stable")
        return rows[order], cols[order], scores[order]

    # Split the candidate graph into connected components; only components with more than one edge
    # need an assignment problem, and those are typically tiny.
    ur, ri = np.unique(rows, return_inverse=True)
    uc, ci = np.unique(cols, return_inverse=True)
    n_r, n_c = len(ur), len(uc)
    graph = coo_matrix((np.ones(len(ri)), (ri, n_r + ci)), shape=(n_r + n_c, n_r + n_c))
    _, node_component = connected_components(graph, directed=False)
    edge_component = node_component[ri]
    n_edges = np.bincount(edge_component)

    simple = n_edges[edge_component] == 1
    keep = [np.flatnonzero(simple)]
    for component in np.flatnonzero(n_edges > 1):
        edges = np.flatnonzero(edge_component == component)
        sub_r, local_r = np.unique(ri[edges], return_inverse=True)
        sub_c, local_c = np.unique(ci[edges], return_inverse=True)
        # Weight 1 per matched pair plus a tie-breaker that sums to < 1 over any matching,
        # so the number of matches is maximized first and the summed score second.
        k = min(len(sub_r), len(sub_c))
        weights = np.zeros((len(sub_r), len(sub_c)))
        weights[local_r, local_c] = 1.0 + scores[edges] / (k + 1)
        edge_index = np.full((len(sub_r), len(sub_c)), -1, dtype=np.int64)
        edge_index[local_r, local_c] = edges
        sel_r, sel_c = linear_sum_assignment(weights, maximize=True)
        chosen = edge_index[sel_r, sel_c]
        keep.append(chosen[chosen >= 0])
    keep = np.concatenate(keep)
    order = np.argsort(rows[keep], kind="stable")
    keep = keep[order]
    return rows[keep], cols[keep], scores[keep]


def _count_tp(pairs: _PairScores, threshold: float, criterion: str) -> int:
    # For IoU > 0.5 an object can overlap at most one partner that strongly: the matching is unique.
    unique = criterion == "iou" and threshold > 0.5
    return len(_match_pairs(pairs, threshold, unique)[0])


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"Invalid overlap threshold {threshold}, it must be in the interval (0, 1].")
    return threshold


def iou_matrix(
    segmentation: np.ndarray, groundtruth: np.ndarray, ignore_label: Optional[int] = 0,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute the intersection over union between all predicted and all ground-truth objects.

    Args:
        segmentation: The predicted label image, any shape.
        groundtruth: The ground-truth label image, same shape as `segmentation`.
        ignore_label: The label value that is not an object (background). None: every value is an object.

    Returns:
        The dense IoU matrix of shape (n_pred, n_true); rows follow the predicted object ids and
            columns the ground-truth object ids (both sorted ascending). Non-overlapping pairs are 0.
        The predicted object ids, shape (n_pred,).
        The ground-truth object ids, shape (n_true,).

    Raises:
        ValueError: If the shapes of the two label images differ.
    """
    pairs = _pair_scores(segmentation, groundtruth, "iou", ignore_label)
    matrix = np.zeros((pairs.n_pred, pairs.n_true), dtype=np.float64)
    matrix[pairs.rows, pairs.cols] = pairs.scores
    return matrix, pairs.seg_ids, pairs.gt_ids


def match_objects(
    segmentation: np.ndarray,
    groundtruth: np.ndarray,
    threshold: float = 0.5,
    criterion: str = "iou",
    ignore_label: Optional[int] = 0,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Find the optimal one-to-one matching between predicted and ground-truth objects.

    The matching maximizes the number of pairs with a score ``>= threshold``; among matchings of that size the
    summed score is maximized. For ``criterion="iou"`` and ``threshold > 0.5`` such pairs are unique by
    construction, otherwise the assignment is solved with ``scipy.optimize.linear_sum_assignment`` on the
    connected groups of candidate pairs.

    Args:
        segmentation: The predicted label image, any shape.
        groundtruth: The ground-truth label image, same shape as `segmentation`.
        threshold: The minimal score for a pair to match, in (0, 1].
        criterion: The score: "iou" (intersection over union), "iot" (intersection over the ground-truth object)
            or "iop" (intersection over the predicted object). Note that elf 0.9 divides by the opposite object for
            "iot" / "iop" (its overlap matrix is transposed w.r.t. the names); here the names mean what they say.
        ignore_label: The label value that is not an object (background). None: every value is an object.

    Returns:
        The ids of the matched predicted objects, shape (n_matches,), sorted ascending.
        The ids of the ground-truth objects they are matched to, shape (n_matches,).
        The score of each matched pair, shape (n_matches,).

    Raises:
        ValueError: If the shapes differ, or for an invalid threshold or criterion.
    """
    threshold = _check_threshold(threshold)
    pairs = _pair_scores(segmentation, groundtruth, criterion, ignore_label)
    rows, cols, scores = _match_pairs(pairs, threshold, unique=criterion == "iou" and threshold > 0.5)
    return pairs.seg_ids[rows], pairs.gt_ids[cols], scores


def matching(
    segmentation: np.ndarray,
    groundtruth: np.ndarray,
    threshold: float = 0.5,
    criterion: str = "iou",
    ignore_label: Optional[int] = 0,
) -> Dict[str, float]:
    """Compute precision, recall, segmentation accuracy and F1 score at one matching threshold.

    Args:
        segmentation: The predicted label image, any shape.
        groundtruth: The ground-truth label image, same shape as `segmentation`.
        threshold: The minimal score for a pair to match, in (0, 1].
        criterion: The score used for matching, one of "iou", "iot", "iop".
        ignore_label: The label value that is not an object (background). None: every value is an object.

    Returns:
        A dictionary with the keys "precision", "recall", "segmentation_accuracy" and "f1"
            (the same keys as `elf.evaluation.matching`) plus the counts "tp", "fp" and "fn".

    Raises:
        ValueError: If the shapes differ, or for an invalid threshold or criterion.
    """
    threshold = _check_threshold(threshold)
    pairs = _pair_scores(segmentation, groundtruth, criterion, ignore_label)
    tp = _count_tp(pairs, threshold, criterion)
    fp, fn = pairs.n_pred - tp, pairs.n_true - tp
    return {
        "precision": precision(tp, fp, fn),
        "recall": recall(tp, fp, fn),
        "segmentation_accuracy": segmentation_accuracy(tp, fp, fn),
        "f1": f1(tp, fp, fn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def mean_segmentation_accuracy(
    segmentation: np.ndarray,
    groundtruth: np.ndarray,
    thresholds: Optional[Sequence[float]] = None,
    return_accuracies: bool = False,
    ignore_label: Optional[int] = 0,
) -> Union[float, Tuple[float, List[float]]]:
    """Compute the mean segmentation accuracy (mSA) of a predicted instance segmentation.

    For every IoU threshold t the accuracy is ``SA(t) = TP / (TP + FP + FN)`` of the optimal one-to-one matching
    at t; the mSA is the mean over the thresholds. An empty ground truth gives 0 (as in elf).

    Args:
        segmentation: The predicted label image, any shape.
        groundtruth: The ground-truth label image, same shape as `segmentation`.
        thresholds: The IoU thresholds, each in (0, 1]. By default `DEFAULT_THRESHOLDS` (0.5, 0.55, ..., 0.95).
        return_accuracies: Whether to also return the accuracy for each threshold.
        ignore_label: The label value that is not an object (background). None: every value is an object.

    Returns:
        The mean segmentation accuracy.
        The segmentation accuracy per threshold, in the order of `thresholds`. Only if `return_accuracies` is set.

    Raises:
        ValueError: If the shapes differ or the thresholds are empty or out of range.
    """
    thresholds = DEFAULT_THRESHOLDS if thresholds is None else np.atleast_1d(np.asarray(thresholds, dtype=float))
    if len(thresholds) == 0:
        raise ValueError("No thresholds were given; pass None to use the default thresholds 0.5, 0.55, ..., 0.95.")
    thresholds = [_check_threshold(t) for t in thresholds]

    pairs = _pair_scores(segmentation, groundtruth, "iou", ignore_label)
    accuracies = []
    for threshold in thresholds:
        tp = _count_tp(pairs, threshold, "iou")
        accuracies.append(segmentation_accuracy(tp, pairs.n_pred - tp, pairs.n_true - tp))
    msa = float(np.mean(accuracies))
    return (msa, accuracies) if return_accuracies else msa


def dice_score(segmentation: np.ndarray, groundtruth: np.ndarray, threshold_seg: Optional[float] = 0,
               threshold_gt: Optional[float] = 0) -> float:
    """Dice coefficient ``2 |A & B| / (|A| + |B|)`` of the foregrounds of two images.

    Args:
        segmentation: The prediction, any shape.
        groundtruth: The ground truth, same shape.
        threshold_seg: Foreground of the prediction: values above it; None: the prediction is already binary.
        threshold_gt: Foreground of the ground truth: values above it; None: already binary.

    Returns:
        The Dice score in [0, 1]; 1 when both foregrounds are empty.

    Raises:
        ValueError: If the shapes differ.
    """
    segmentation, groundtruth = _same_shape(segmentation, groundtruth)
    a = segmentation.astype(bool) if threshold_seg is None else segmentation > threshold_seg
    b = groundtruth.astype(bool) if threshold_gt is None else groundtruth > threshold_gt
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def object_area_ratios(segmentation: np.ndarray, groundtruth: np.ndarray, ignore_label: Optional[int] = 0
                       ) -> Dict[int, float]:
    """For each ground-truth object, the size of the predicted object that covers most of it, divided by its size.

    A ratio of 1 means outlines of the right size; 2 means the predicted object is twice as large (outlines too
    wide, or the object merged with a neighbour), 0.5 half as large. Ground-truth objects that no predicted object
    overlaps are left out (they are misses, which the segmentation accuracy counts). Of two predicted objects with
    the same overlap the one with the smaller id is taken.

    Args:
        segmentation: The predicted label image, any shape.
        groundtruth: The ground-truth label image, same shape.
        ignore_label: The label value that is not an object in either image (background); None: none.

    Returns:
        Ground-truth object id -> predicted area / true area.

    Raises:
        ValueError: If the shapes differ.
    """
    segmentation, groundtruth = _same_shape(segmentation, groundtruth)
    pred_ids, pred_index = np.unique(segmentation.ravel(), return_inverse=True)
    true_ids, true_index = np.unique(groundtruth.ravel(), return_inverse=True)
    pred_areas = np.bincount(pred_index, minlength=len(pred_ids))
    true_areas = np.bincount(true_index, minlength=len(true_ids))
    pred_is_object = pred_ids != ignore_label if ignore_label is not None else np.ones(len(pred_ids), bool)
    keep = pred_is_object[pred_index]
    table = coo_matrix((np.ones(int(keep.sum()), dtype=np.int64), (true_index[keep], pred_index[keep])),
                       shape=(len(true_ids), len(pred_ids))).tocsr()
    ratios = {}
    for t, true_id in enumerate(true_ids):
        if ignore_label is not None and true_id == ignore_label:
            continue
        row = table.getrow(t)
        if row.nnz == 0:
            continue
        best = row.indices[row.data == row.data.max()].min()  # ties: the smaller predicted id
        ratios[int(true_id)] = float(pred_areas[best] / true_areas[t])
    return ratios
