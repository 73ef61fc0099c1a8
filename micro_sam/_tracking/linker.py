"""A tracker that needs no trained weights: objects linked by overlap and distance, solved optimally per frame.

For every pair of consecutive frames t, t + 1:

1. **Frame-to-frame links.** Candidate pairs are objects that overlap or whose centroids are at most
   ``max_distance`` apart. A link costs ``(1 - IoU) + distance / max_distance`` (0 for an object that does
   not move or change); leaving an object unlinked costs 1 on each side, so any candidate pair may be linked
   and the assignment with the lowest total cost is chosen (``scipy.optimize.linear_sum_assignment`` on the
   augmented cost matrix of Jaqaman et al., Nat. Methods 2008, one problem per connected group of candidates).
2. **Divisions and gap closing.** Objects of frame t + 1 that were not linked (new objects) are assigned, again
   optimally, either as the second daughter of an object in frame t that was linked to the first daughter,
   or as the continuation of a track that ended up to ``max_gap`` frames before (the object was missed in the
   frames in between), or stay new tracks. A division needs two daughters that are each smaller than the
   mother and together at most twice its area (segmented masks of small objects are often too large); it costs
   ``(1 - fraction of the new daughter inside the mother) + distance / max_distance + size asymmetry``.
   A gap closing costs ``(1 - IoU) + distance / (max_distance * sqrt(gap + 1)) + 0.1 * gap``.

The image itself is not used: only the segmentation. Objects are nodes of a :class:`TrackingGraph`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Callable, List, Optional, Tuple

import numpy as np

from .graph import FrameObjects, TrackingGraph, frame_objects, graph_nodes, overlap_counts

# Cost of leaving an object unlinked (per side) in the frame-to-frame step, and of a new object staying new.
_UNLINKED_COST = 1.0
# Cost of a mother not dividing: a division is made when its cost is below this plus the new object's cost.
_NO_DIVISION_COST = 0.5
# Extra cost per missing frame when closing a gap.
_GAP_COST = 0.1
# The two daughters together have at most this multiple of the mother's area.
_MAX_DAUGHTER_AREA_RATIO = 2.0
# Each daughter has less than this fraction of the mother's area.
_MAX_DAUGHTER_FRACTION = 1.0


def solve_assignment(
    rows: np.ndarray, cols: np.ndarray, costs: np.ndarray, row_alternative: np.ndarray,
    col_alternative: np.ndarray,
) -> Tuple[np.ndarray, np.ndarray]:
    """Optimal partial assignment between rows and columns with costs for staying unassigned.

    Minimises the sum of the costs of the chosen (row, column) candidates plus ``row_alternative`` of every
    unassigned row plus ``col_alternative`` of every unassigned column; every row and column is used at most once.
    The problem is split into the connected groups of candidates, each solved exactly with
    ``linear_sum_assignment`` on the augmented (n_rows + n_cols) square cost matrix.

    Args:
        rows: Row index of each candidate pair, shape (n,).
        cols: Column index of each candidate pair, shape (n,).
        costs: Cost of each candidate pair, shape (n,), finite.
        row_alternative: Cost of leaving each row unassigned, shape (n_rows,).
        col_alternative: Cost of leaving each column unassigned, shape (n_cols,).

    Returns:
        The assigned rows and columns, two arrays of equal length.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows, cols = np.asarray(rows, dtype="int64"), np.asarray(cols, dtype="int64")
    costs = np.asarray(costs, dtype="float64")
    n_rows, n_cols = len(row_alternative), len(col_alternative)
    if len(rows) == 0:
        return np.zeros(0, dtype="int64"), np.zeros(0, dtype="int64")
    adjacency = coo_matrix((np.ones(len(rows)), (rows, n_rows + cols)), shape=(n_rows + n_cols,) * 2)
    _, component = connected_components(adjacency, directed=False)
    pair_component = component[rows]
    # A group with a single candidate pair: linked if that is cheaper than leaving both unassigned.
    n_pairs = np.bincount(pair_component)
    single = n_pairs[pair_component] == 1
    take = single & (costs < row_alternative[rows] + col_alternative[cols])
    chosen_rows, chosen_cols = [rows[take]], [cols[take]]
    multiple = np.flatnonzero(~single)
    order = multiple[np.argsort(pair_component[multiple], kind="stable")]
    bounds = np.flatnonzero(np.diff(pair_component[order])) + 1
    for group in np.split(order, bounds) if len(order) else []:
        group_rows, r = np.unique(rows[group], return_inverse=True)
        group_cols, c = np.unique(cols[group], return_inverse=True)
        nr, nc = len(group_rows), len(group_cols)
        matrix = np.full((nr + nc, nc + nr), np.inf)
        matrix[r, c] = costs[group]
        matrix[np.arange(nr), nc + np.arange(nr)] = row_alternative[group_rows]
        matrix[nr + np.arange(nc), np.arange(nc)] = col_alternative[group_cols]
        matrix[nr + c, nc + r] = 0.0
        assigned_rows, assigned_cols = linear_sum_assignment(matrix)
        link = (assigned_rows < nr) & (assigned_cols < nc)
        chosen_rows.append(group_rows[assigned_rows[link]])
        chosen_cols.append(group_cols[assigned_cols[link]])
    return np.concatenate(chosen_rows), np.concatenate(chosen_cols)


def _candidates(
    a: FrameObjects, b: FrameObjects, radius: float, rows_a: Optional[np.ndarray] = None,
    cols_b: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i in a, j in b) that overlap or lie within ``radius``, restricted to the given objects.

    Returns:
        Row and column indices, the IoU, the overlap in pixels and the centroid distance of each pair, as
        (rows, cols, iou, overlap, distance) with overlap in a separate array.
    """
    from scipy.spatial import cKDTree

    ri, cj, counts = overlap_counts(a, b)
    pairs = {}
    for i, j, n in zip(ri.tolist(), cj.tolist(), counts.tolist()):
        pairs[(i, j)] = n
    if len(a.labels) and len(b.labels) and radius > 0:
        near = cKDTree(a.centroids).sparse_distance_matrix(cKDTree(b.centroids), radius, output_type="ndarray")
        for i, j in zip(near["i"].tolist(), near["j"].tolist()):
            pairs.setdefault((i, j), 0)
    if not pairs:
        empty = np.zeros(0, dtype="int64")
        return empty, empty, np.zeros(0), empty, np.zeros(0)
    keys = np.array(list(pairs.keys()), dtype="int64")
    i, j = keys[:, 0], keys[:, 1]
    overlap = np.array(list(pairs.values()), dtype="int64")
    keep = np.ones(len(i), dtype=bool)
    if rows_a is not None:
        keep &= np.isin(i, rows_a)
    if cols_b is not None:
        keep &= np.isin(j, cols_b)
    i, j, overlap = i[keep], j[keep], overlap[keep]
    iou = overlap / (a.areas[i] + b.areas[j] - overlap)
    distance = np.linalg.norm(a.centroids[i] - b.centroids[j], axis=1)
    return i, j, iou, overlap, distance


@dataclass
class OverlapLinker:
    """The weight-free linker: links objects of consecutive frames by overlap and distance (see the module doc).

    Select it with ``track_across_frames(..., tracking_model="overlap")`` (default settings) or by passing an
    instance as ``tracking_model``; it is also the fallback when trackastra or its weights are not available.

    Attributes:
        max_distance: The largest centroid displacement (pixels) of a linked object between two frames (it may
            move further while its masks still overlap). None: the median equivalent diameter of the objects
            of the movie.
        max_gap: Objects missing in up to this many consecutive frames are linked across the gap (0: no gap
            closing). The label movie is not filled in the missing frames; the track keeps its id.
        divisions: Whether to detect divisions.
    """
    max_distance: Optional[float] = None
    max_gap: int = 2
    divisions: bool = True

    def __post_init__(self):
        if self.max_distance is not None and (
            isinstance(self.max_distance, bool) or not isinstance(self.max_distance, Real)
            or not math.isfinite(self.max_distance) or self.max_distance <= 0
        ):
            raise ValueError(f"max_distance must be None or a positive number of pixels, got {self.max_distance!r}.")
        if isinstance(self.max_gap, bool) or not isinstance(self.max_gap, Integral) or self.max_gap < 0:
            raise ValueError(f"max_gap must be a non-negative integer (frames), got {self.max_gap!r}.")
        if not isinstance(self.divisions, (bool, np.bool_)):
            raise ValueError(f"divisions must be True or False, got {self.divisions!r}.")

    def link(
        self, segmentation: np.ndarray, divisions: Optional[bool] = None, pbar_update: Optional[Callable] = None,
    ) -> TrackingGraph:
        """Link the objects of a label movie.

        Args:
            segmentation: The per-frame instance segmentation, shape (T, Y, X), non-negative integer labels (ids
                need to be unique within a frame only).
            divisions: Overrides the ``divisions`` attribute when given.
            pbar_update: Called with 1 after each frame.

        Returns:
            The tracking graph (nodes = objects per frame, edges = links to successors).
        """
        divisions = self.divisions if divisions is None else bool(divisions)
        update = pbar_update if pbar_update is not None else (lambda n: None)
        n_frames = segmentation.shape[0]
        tables = [frame_objects(segmentation[t]) for t in range(n_frames)]  # index images uint16 (or int32)
        offsets, labels = graph_nodes([table.labels for table in tables])
        max_distance = self.max_distance
        if max_distance is None:
            areas = np.concatenate([table.areas for table in tables]) if tables else np.zeros(0)
            max_distance = float(max(2.0 * np.sqrt(np.median(areas) / np.pi), 1.0)) if areas.size else 1.0

        def objects_of(t: int) -> FrameObjects:
            return tables[t]

        n_nodes = int(offsets[-1])
        n_successors = np.zeros(n_nodes, dtype="int64")
        successor = np.full(n_nodes, -1, dtype="int64")  # the first successor
        has_predecessor = np.zeros(n_nodes, dtype=bool)
        edges: List[Tuple[int, int]] = []

        def add_edge(u: int, v: int) -> None:
            edges.append((u, v))
            if n_successors[u] == 0:
                successor[u] = v
            n_successors[u] += 1
            has_predecessor[v] = True

        update(1)
        for t in range(n_frames - 1):
            a, b = objects_of(t), objects_of(t + 1)
            off_a, off_b = int(offsets[t]), int(offsets[t + 1])
            # 1. frame-to-frame links
            i, j, iou, _, distance = _candidates(a, b, max_distance)
            gated = (iou > 0) | (distance <= max_distance)
            i, j = i[gated], j[gated]
            cost = (1.0 - iou[gated]) + distance[gated] / max_distance
            rows, cols = solve_assignment(i, j, cost, np.full(len(a.labels), _UNLINKED_COST),
                                          np.full(len(b.labels), _UNLINKED_COST))
            for r, c in zip(rows.tolist(), cols.tolist()):
                add_edge(off_a + r, off_b + c)
            # 2. divisions and gap closing for the objects of t + 1 that are new
            new = np.flatnonzero(~has_predecessor[off_b:off_b + len(b.labels)])
            if len(new):
                self._assign_new(t, new, a, b, objects_of, offsets, max_distance, divisions, n_successors,
                                 successor, add_edge)
            update(1)

        edge_array = np.array(edges, dtype="int64").reshape(-1, 2)
        return TrackingGraph(offsets=offsets, labels=labels, edges=edge_array)

    def _assign_new(self, t, new, a, b, objects_of, offsets, max_distance, divisions, n_successors, successor,
                    add_edge) -> None:
        """Step 2 for the new objects of frame t + 1: second daughters, gap closing or new tracks."""
        off_a, off_b = int(offsets[t]), int(offsets[t + 1])
        row_nodes, row_alternative = [], []
        cand_rows, cand_cols, cand_costs = [], [], []

        def add_candidates(node_offset, i, j, cost, alternative):
            """Rows for the objects i (node ids node_offset + i) with their candidate columns j and costs."""
            row_of = {m: len(row_nodes) + k for k, m in enumerate(np.unique(i).tolist())}
            row_nodes.extend(node_offset + m for m in row_of)
            row_alternative.extend([alternative] * len(row_of))
            cand_rows.extend(row_of[m] for m in i.tolist())
            cand_cols.extend(j.tolist())
            cand_costs.extend(cost.tolist())

        if divisions:
            mothers = np.flatnonzero(n_successors[off_a:off_a + len(a.labels)] == 1)
            if len(mothers):
                i, j, _, overlap, distance = _candidates(a, b, max_distance, rows_a=mothers, cols_b=new)
                sibling = successor[off_a + i] - off_b  # the first daughter, linked in step 1
                area_i, area_j, area_s = a.areas[i], b.areas[j], b.areas[sibling]
                ok = (overlap > 0) | (distance <= max_distance)
                ok &= (area_j < _MAX_DAUGHTER_FRACTION * area_i) & (area_s < _MAX_DAUGHTER_FRACTION * area_i)
                ok &= area_j + area_s <= _MAX_DAUGHTER_AREA_RATIO * area_i
                cost = (1.0 - overlap / area_j) + distance / max_distance
                cost += np.abs(area_j - area_s) / (area_j + area_s)
                add_candidates(off_a, i[ok], j[ok], cost[ok], _NO_DIVISION_COST)

        for gap in range(1, self.max_gap + 1):
            t_end = t - gap
            if t_end < 0:
                break
            off_e = int(offsets[t_end])
            ends = np.flatnonzero(n_successors[off_e:int(offsets[t_end + 1])] == 0)
            if len(ends) == 0:
                continue
            radius = max_distance * math.sqrt(gap + 1)
            i, j, iou, _, distance = _candidates(objects_of(t_end), b, radius, rows_a=ends, cols_b=new)
            ok = (iou > 0) | (distance <= radius)
            cost = (1.0 - iou) + distance / radius + _GAP_COST * gap
            add_candidates(off_e, i[ok], j[ok], cost[ok], _UNLINKED_COST)

        if not cand_rows:
            return
        rows, cols = solve_assignment(
            np.array(cand_rows), np.array(cand_cols), np.array(cand_costs), np.array(row_alternative),
            np.full(len(b.labels), _UNLINKED_COST),
        )
        for r, c in zip(rows.tolist(), cols.tolist()):
            add_edge(row_nodes[r], off_b + c)
