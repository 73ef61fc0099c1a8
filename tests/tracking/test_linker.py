"""The weight-free overlap linker: assignment, links, divisions, gaps, and accuracy on the synthetic movie."""
import itertools

import numpy as np
import pytest

from micro_sam._tracking.graph import graph_to_result
from micro_sam._tracking.linker import OverlapLinker, solve_assignment
from micro_sam.evaluation.tracking import evaluate_tracking

from ._movies import assert_same_tracks, division_movie, relabel_frames


def _track(segmentation, **kwargs):
    return graph_to_result(segmentation, OverlapLinker(**kwargs).link(segmentation))


def _brute_force(n_rows, n_cols, costs, row_alt, col_alt):
    """The minimal total cost over all partial one-to-one assignments (enumerated)."""
    best = row_alt.sum() + col_alt.sum()
    candidates = list(costs)
    for k in range(1, min(n_rows, n_cols) + 1):
        for chosen in itertools.combinations(candidates, k):
            rows = [r for r, _ in chosen]
            cols = [c for _, c in chosen]
            if len(set(rows)) < k or len(set(cols)) < k:
                continue
            total = sum(costs[pair] for pair in chosen)
            total += row_alt[[r for r in range(n_rows) if r not in rows]].sum()
            total += col_alt[[c for c in range(n_cols) if c not in cols]].sum()
            best = min(best, total)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_solve_assignment_is_optimal(seed):
    rng = np.random.default_rng(seed)
    n_rows, n_cols = 4, 5
    pairs = [(r, c) for r in range(n_rows) for c in range(n_cols) if rng.random() < 0.5]
    costs = {pair: float(rng.uniform(0, 3)) for pair in pairs}
    row_alt, col_alt = rng.uniform(0, 1.5, n_rows), rng.uniform(0, 1.5, n_cols)
    rows, cols = solve_assignment(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]),
                                  np.array([costs[p] for p in pairs]), row_alt, col_alt)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    total = sum(costs[(r, c)] for r, c in zip(rows.tolist(), cols.tolist()))
    total += row_alt[np.setdiff1d(np.arange(n_rows), rows)].sum() + col_alt[np.setdiff1d(np.arange(n_cols), cols)].sum()
    assert total == pytest.approx(_brute_force(n_rows, n_cols, costs, row_alt, col_alt))


def test_links_and_division():
    seg = division_movie()
    result, lineages = _track(seg)
    # Track 1: the moving square; 2: the mother; 3, 4: its daughters (ordered by first frame, then label).
    expected = seg.astype("uint32")
    np.testing.assert_array_equal(result, expected)
    assert lineages == [{1: []}, {2: [3, 4], 3: [], 4: []}]


def test_ids_need_only_be_unique_per_frame():
    """Random, huge, non-consecutive ids (uint64), different in every frame: the same tracks."""
    seg = division_movie()
    scrambled = relabel_frames(seg, seed=3, offset=2 ** 40)
    result, lineages = _track(scrambled)
    assert_same_tracks(result, lineages, seg, [{1: []}, {2: [3, 4], 3: [], 4: []}])
    assert set(np.unique(result)) == {0, 1, 2, 3, 4}


def test_without_divisions():
    seg = division_movie()
    result, lineages = _track(seg, divisions=False)
    # Exactly one daughter continues the mother's track 2, the other one starts track 3.
    assert set(np.unique(result[3])) == {0, 1, 2, 3}
    assert lineages == [{1: []}, {2: []}, {3: []}]
    assert np.array_equal(result[:3] == 2, seg[:3] == 2)


@pytest.mark.parametrize("max_gap, n_tracks", [(2, 1), (1, 2), (0, 2)])
def test_gap_closing(max_gap, n_tracks):
    """An object missing in two frames is one track if gaps of two frames are closed."""
    seg = np.zeros((7, 30, 30), dtype="uint8")
    for t in range(7):
        seg[t, 5:12, 3 + 2 * t:10 + 2 * t] = 1
    seg[3:5] = 0  # missing in frames 3 and 4 (and frames 3, 4 have no object at all)
    result, lineages = _track(seg, max_gap=max_gap)
    assert len(lineages) == n_tracks
    assert set(np.unique(result)) == set(range(n_tracks + 1))
    assert (result[:3] == 1).sum() == (seg[:3] == 1).sum()  # the track keeps id 1 before the gap
    assert not result[3:5].any()  # the gap is not filled


def test_fast_motion_linked_by_distance():
    """An object that jumps by more than its size is linked when max_distance allows it."""
    seg = np.zeros((3, 20, 80), dtype="uint8")
    for t in range(3):
        seg[t, 5:11, 5 + 20 * t:11 + 20 * t] = 1
    assert len(_track(seg, max_distance=25)[1]) == 1
    assert len(_track(seg, max_distance=15)[1]) == 3  # 20 px > 15 px and no overlap: three tracks
    assert len(_track(seg)[1]) == 3  # default: the median diameter (~6.8 px)


def test_neighbours_keep_their_identity():
    """Two touching objects moving in parallel, with per-frame shuffled ids."""
    seg = np.zeros((8, 30, 60), dtype="uint8")
    for t in range(8):
        seg[t, 5:15, 2 + 3 * t:10 + 3 * t] = 1
        seg[t, 15:25, 2 + 3 * t:10 + 3 * t] = 2
    result, lineages = _track(relabel_frames(seg))
    assert_same_tracks(result, lineages, seg, [{1: []}, {2: []}])


def test_synthetic_timelapse_with_true_segmentation():
    """Given the true masks (per frame shuffled ids), the linker recovers >= 95 % of links, >= 80 % of divisions."""
    from micro_sam.sample_data import synthetic_timelapse

    _, labels, lineages = synthetic_timelapse(n_frames=40, shape=(256, 256), seed=0)
    result, predicted = _track(relabel_frames(labels))
    scores = evaluate_tracking(result, predicted, labels, lineages)
    assert scores["n_true_divisions"] >= 20
    assert scores["link_recall"] >= 0.95 and scores["link_precision"] >= 0.95
    assert scores["division_recall"] >= 0.8 and scores["division_precision"] >= 0.8
