"""Tracking metrics: per-frame segmentation, links and divisions, and the Cell Tracking Challenge's TRA / LNK.

A tracking result is a label movie (T, Y, X) whose labels are track ids, plus its lineages (micro_sam's format:
a list of dicts ``{track id: [daughter track ids]}``, or one such dict). Its graph has one node per object and
frame and an edge from every object to its next appearance (a *link*, also across frames in which the track is
missing) and from the last appearance of a mother to the first appearance of each daughter (a *division link*).

Objects are matched per frame with the rule of the Cell Tracking Challenge (CTC): a ground-truth object R is
matched by the predicted object S that covers more than half of R's pixels (at most one per R; one S may match
several R, a merge). Then:

- ``link_recall``: the fraction of true links (division links included) whose two ends are matched by the two
  ends of a predicted link; ``link_precision``: the fraction of predicted links that match a true link.
- ``division_recall``: the fraction of true divisions (a mother and its daughters) recovered exactly: the
  mother's last object is matched by a predicted mother whose daughters' first objects match the true
  daughters; ``division_precision``: the fraction of predicted divisions that are true.
- ``segmentation_accuracy``: the mean over frames of the segmentation accuracy TP / (TP + FP + FN) at IoU 0.5
  (:func:`micro_sam.evaluation.metrics.matching`); ``seg``: the CTC SEG score, the mean IoU of the true objects
  with their matching object (0 when unmatched).
- ``tra`` and ``lnk``: the CTC's TRA and LNK scores, ``1 - min(AOGM, AOGM0) / AOGM0``, from the cost of the graph
  operations that turn the prediction into the ground truth (AOGM): splitting a merged object (5), adding a
  missed object (10), deleting a false object (1), deleting a wrong link (1), adding a missing link (1.5) and
  changing a link between continuation and division (1); AOGM0 is the cost of building the ground truth from
  nothing. LNK counts only the link operations. These follow the CTC definitions (Matula et al., PLoS One 2015)
  with the matching above; they are not the official evaluation software.

Pure numpy; the same movie shape and frame count are required of prediction and ground truth.
"""
from __future__ import annotations

from typing import Dict, List, Set, Tuple, Union

import numpy as np

from .._tracking.graph import frame_objects, graph_from_tracks, overlap_counts
from .metrics import matching

__all__ = ["evaluate_tracking", "match_frame_objects"]

Lineages = Union[Dict[int, List[int]], List[Dict[int, List[int]]]]

# AOGM weights of the CTC TRA measure.
_W_SPLIT, _W_FN, _W_FP, _W_DELETE_EDGE, _W_ADD_EDGE, _W_CHANGE_EDGE = 5.0, 10.0, 1.0, 1.0, 1.5, 1.0


def _check_movies(tracking_result, groundtruth) -> Tuple[np.ndarray, np.ndarray]:
    tracking_result, groundtruth = np.asarray(tracking_result), np.asarray(groundtruth)
    for name, movie in (("tracking_result", tracking_result), ("groundtruth", groundtruth)):
        if movie.ndim != 3:
            raise ValueError(f"{name} must be a label movie of shape (T, Y, X), got shape {movie.shape}.")
        if not np.issubdtype(movie.dtype, np.integer):
            raise ValueError(f"{name} must have integer labels, got dtype {movie.dtype}.")
        if movie.size and movie.min() < 0:
            raise ValueError(f"{name} must not contain negative labels.")
    if tracking_result.shape != groundtruth.shape:
        raise ValueError(f"tracking_result (shape {tracking_result.shape}) and groundtruth (shape "
                         f"{groundtruth.shape}) must have the same shape (T, Y, X).")
    return tracking_result, groundtruth


def match_frame_objects(segmentation: np.ndarray, groundtruth: np.ndarray) -> Dict[int, int]:
    """Match the objects of one frame with the CTC rule: S matches R if it covers more than half of R.

    Args:
        segmentation: The predicted labels of the frame, shape (Y, X).
        groundtruth: The true labels of the frame, same shape.

    Returns:
        ``{true label: predicted label}`` for every matched true object.
    """
    pred, true = frame_objects(segmentation), frame_objects(groundtruth)
    rows, cols, counts = overlap_counts(true, pred)
    matched = 2 * counts > true.areas[rows]
    return {int(true.labels[r]): int(pred.labels[c]) for r, c in zip(rows[matched], cols[matched])}


def _node_keys(graph) -> List[Tuple[int, int]]:
    times = graph.times
    return list(zip(times.tolist(), graph.labels.tolist()))


def evaluate_tracking(
    tracking_result: np.ndarray, lineages: Lineages, groundtruth: np.ndarray, groundtruth_lineages: Lineages,
) -> Dict[str, float]:
    """Compare a tracking result with the ground truth (see the module documentation for the definitions).

    Args:
        tracking_result: The predicted label movie, shape (T, Y, X), labels = track ids (0 = background).
        lineages: The predicted lineages (as returned by ``track_across_frames``).
        groundtruth: The true label movie, same shape, labels = track ids.
        groundtruth_lineages: The true lineages.

    Returns:
        A dict with the scores ``tra``, ``lnk``, ``seg``, ``segmentation_accuracy``, ``link_recall``,
        ``link_precision``, ``division_recall``, ``division_precision`` (each in [0, 1]; a recall or precision
        without anything to count is 1.0) and the counts ``n_true_links``, ``n_predicted_links``,
        ``n_true_divisions``, ``n_predicted_divisions``, ``false_negatives``, ``false_positives``, ``splits``,
        ``edges_deleted``, ``edges_added``, ``edges_changed`` (the AOGM operations).

    Raises:
        ValueError: For movies of different shapes, non-integer or negative labels, or invalid lineages.
    """
    tracking_result, groundtruth = _check_movies(tracking_result, groundtruth)
    pred_graph, pred_division = graph_from_tracks(tracking_result, lineages)
    true_graph, true_division = graph_from_tracks(groundtruth, groundtruth_lineages)
    pred_keys, true_keys = _node_keys(pred_graph), _node_keys(true_graph)

    # Per-frame matching and segmentation scores.
    match: Dict[Tuple[int, int], Tuple[int, int]] = {}  # true (t, label) -> predicted (t, label)
    seg_scores, accuracies = [], []
    for t in range(groundtruth.shape[0]):
        frame_match = match_frame_objects(tracking_result[t], groundtruth[t])
        match.update({(t, r): (t, s) for r, s in frame_match.items()})
        true_objects = frame_objects(groundtruth[t])
        if len(true_objects.labels):
            pred_objects = frame_objects(tracking_result[t])
            rows, cols, counts = overlap_counts(true_objects, pred_objects)
            iou = counts / (true_objects.areas[rows] + pred_objects.areas[cols] - counts)
            best = np.zeros(len(true_objects.labels))
            matched = 2 * counts > true_objects.areas[rows]
            best[rows[matched]] = iou[matched]
            seg_scores.extend(best.tolist())
        if len(true_objects.labels) or tracking_result[t].any():
            accuracies.append(matching(tracking_result[t], groundtruth[t], threshold=0.5)["segmentation_accuracy"])

    matched_by: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
    for true_node, pred_node in match.items():
        matched_by.setdefault(pred_node, []).append(true_node)
    splits = sum(len(nodes) - 1 for nodes in matched_by.values())
    false_negatives = len(true_keys) - len(match)
    false_positives = sum(1 for key in pred_keys if key not in matched_by)

    # Links: as pairs of node keys, with their kind (division link or continuation).
    def edge_set(graph, keys, is_division) -> Dict[Tuple, bool]:
        return {(keys[u], keys[v]): bool(d) for (u, v), d in zip(graph.edges.tolist(), is_division.tolist())}

    true_edges, pred_edges = edge_set(true_graph, true_keys, true_division), edge_set(pred_graph, pred_keys,
                                                                                       pred_division)
    recovered, changed = 0, 0
    correct_pred: Set[Tuple] = set()
    for (u, v), kind in true_edges.items():
        pair = (match.get(u), match.get(v))
        if pair in pred_edges:
            recovered += 1
            correct_pred.add(pair)
            changed += pred_edges[pair] != kind
    edges_added = len(true_edges) - recovered
    edges_deleted = len(pred_edges) - len(correct_pred)

    # Divisions: mother node -> set of daughter nodes.
    def divisions(edges: Dict[Tuple, bool]) -> Dict[Tuple, Set[Tuple]]:
        result: Dict[Tuple, Set[Tuple]] = {}
        for (u, v), kind in edges.items():
            if kind:
                result.setdefault(u, set()).add(v)
        return result

    true_divisions, pred_divisions = divisions(true_edges), divisions(pred_edges)
    found = sum(
        1 for mother, daughters in true_divisions.items()
        if match.get(mother) in pred_divisions
        and {match.get(d) for d in daughters} == pred_divisions[match.get(mother)]
    )

    def ratio(numerator, denominator) -> float:
        return float(numerator / denominator) if denominator else 1.0

    aogm = (_W_SPLIT * splits + _W_FN * false_negatives + _W_FP * false_positives
            + _W_DELETE_EDGE * edges_deleted + _W_ADD_EDGE * edges_added + _W_CHANGE_EDGE * changed)
    aogm_0 = _W_FN * len(true_keys) + _W_ADD_EDGE * len(true_edges)
    aogm_links = _W_DELETE_EDGE * edges_deleted + _W_ADD_EDGE * edges_added + _W_CHANGE_EDGE * changed
    aogm_links_0 = _W_ADD_EDGE * len(true_edges)
    return {
        "tra": 1.0 - ratio(min(aogm, aogm_0), aogm_0) if aogm_0 else 1.0,
        "lnk": 1.0 - ratio(min(aogm_links, aogm_links_0), aogm_links_0) if aogm_links_0 else 1.0,
        "seg": float(np.mean(seg_scores)) if seg_scores else 1.0,
        "segmentation_accuracy": float(np.mean(accuracies)) if accuracies else 1.0,
        "link_recall": ratio(recovered, len(true_edges)),
        "link_precision": ratio(len(correct_pred), len(pred_edges)),
        "division_recall": ratio(found, len(true_divisions)),
        "division_precision": ratio(found, len(pred_divisions)),
        "n_true_links": len(true_edges),
        "n_predicted_links": len(pred_edges),
        "n_true_divisions": len(true_divisions),
        "n_predicted_divisions": len(pred_divisions),
        "false_negatives": false_negatives,
        "false_positives": false_positives,
        "splits": splits,
        "edges_deleted": edges_deleted,
        "edges_added": edges_added,
        "edges_changed": changed,
    }
