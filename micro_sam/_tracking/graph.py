"""The tracking graph of a label movie and its conversion into tracks and lineages.

Every object of every frame is a node; node ids run frame by frame, and within a frame in the order of the
(sorted) labels, so that sorting by node id is sorting by (frame, label). An edge links an object to its
successor in a later frame: the same cell in the next frame (or after a gap), or one of its daughters.

A *track* is a maximal chain of nodes in which every node has exactly one successor and that successor has
exactly one predecessor. A node with two (or more) successors ends its track (the mother); each successor
starts a new track (the daughters), whose parent is the mother's track.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Tuple

import numpy as np


@dataclass
class FrameObjects:
    """The objects of one frame.

    Attributes:
        labels: The sorted non-zero labels, shape (n,).
        index: Image of the frame's shape: 0 for background, k for the object ``labels[k - 1]``.
        areas: Pixel count per object, shape (n,).
        centroids: (y, x) centroid per object, shape (n, 2).
    """
    labels: np.ndarray
    index: np.ndarray
    areas: np.ndarray
    centroids: np.ndarray


def frame_objects(frame: np.ndarray) -> FrameObjects:
    """Label table, compact index image, areas and centroids of the objects of one 2D frame."""
    frame = np.asarray(frame).astype("int64", copy=False)
    max_label = int(frame.max()) if frame.size else 0
    if max_label < 4 * frame.size + 1024:  # dense labels: one bincount instead of a sort
        counts = np.bincount(frame.ravel(), minlength=max_label + 1)
        labels = np.flatnonzero(counts[1:]) + 1
        lut = np.zeros(max_label + 1, dtype="int64")
        lut[labels] = np.arange(1, len(labels) + 1)
        index = lut[frame]
    else:
        values, inverse = np.unique(frame, return_inverse=True)
        inverse = inverse.reshape(frame.shape)
        if values[0] == 0:
            labels, index = values[1:], inverse
        else:
            labels, index = values, inverse + 1
    n = len(labels)
    index = index.astype("uint16" if n < np.iinfo("uint16").max else "int32")
    flat = index.ravel()
    areas = np.bincount(flat, minlength=n + 1)[1:].astype("int64")
    yy, xx = _pixel_coordinates(frame.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, weights=yy, minlength=n + 1)[1:] / areas
        cx = np.bincount(flat, weights=xx, minlength=n + 1)[1:] / areas
    return FrameObjects(labels.astype("int64"), index, areas, np.stack([cy, cx], axis=1).reshape(n, 2))


@lru_cache(maxsize=4)
def _pixel_coordinates(shape: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """The flattened y and x coordinate of every pixel of a frame (float64, cached per shape)."""
    yy, xx = np.indices(shape, dtype="float64")
    return yy.ravel(), xx.ravel()


def overlap_counts(a: FrameObjects, b: FrameObjects) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixel overlaps between the objects of two frames of the same shape.

    Returns:
        Row indices into ``a.labels``, column indices into ``b.labels`` and the number of shared pixels, one entry
        per overlapping pair (sorted by row, then column).
    """
    mask = (a.index != 0) & (b.index != 0)
    ia, ib = a.index[mask], b.index[mask]
    n_b = len(b.labels) + 1
    codes = ia.astype("int64") * n_b + ib
    if (len(a.labels) + 1) * n_b <= 4 * codes.size + 4096:
        counts = np.bincount(codes, minlength=(len(a.labels) + 1) * n_b)
        codes = np.flatnonzero(counts)
        counts = counts[codes]
    else:
        codes, counts = np.unique(codes, return_counts=True)
    return codes // n_b - 1, codes % n_b - 1, counts.astype("int64")


@dataclass
class TrackingGraph:
    """Nodes (objects per frame) and edges (object -> successor) of a label movie.

    Attributes:
        offsets: Node id range of every frame: the nodes of frame t are ``offsets[t]:offsets[t + 1]``.
        labels: The label of every node, shape (n_nodes,).
        edges: The links, shape (n_edges, 2): (node, successor node in a later frame).
    """
    offsets: np.ndarray
    labels: np.ndarray
    edges: np.ndarray

    @property
    def n_nodes(self) -> int:
        """The number of nodes."""
        return int(self.offsets[-1])

    @property
    def times(self) -> np.ndarray:
        """The frame of every node, shape (n_nodes,)."""
        return np.repeat(np.arange(len(self.offsets) - 1), np.diff(self.offsets))

    def node(self, t: int, label: int) -> int:
        """The node id of the object ``label`` in frame ``t``; KeyError if there is none."""
        start, stop = int(self.offsets[t]), int(self.offsets[t + 1])
        k = start + int(np.searchsorted(self.labels[start:stop], label))
        if k >= stop or self.labels[k] != label:
            raise KeyError(f"There is no object {label} in frame {t}.")
        return k


def graph_nodes(frame_labels: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Node offsets and node labels from the sorted labels of every frame."""
    offsets = np.zeros(len(frame_labels) + 1, dtype="int64")
    offsets[1:] = np.cumsum([len(labels) for labels in frame_labels])
    labels = np.concatenate(frame_labels).astype("int64") if frame_labels else np.zeros(0, dtype="int64")
    return offsets, labels


def _clean_edges(edges: np.ndarray, times: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Edges between living nodes that go forward in time; of several edges into one node the first is kept."""
    edges = np.asarray(edges, dtype="int64").reshape(-1, 2)
    keep = alive[edges[:, 0]] & alive[edges[:, 1]] & (times[edges[:, 1]] > times[edges[:, 0]])
    edges = edges[keep]
    _, first = np.unique(edges[:, 1], return_index=True)  # no merges: one predecessor per node
    return edges[np.sort(first)]


def _tracks(n_nodes: int, edges: np.ndarray, alive: np.ndarray) -> Tuple[np.ndarray, Dict[int, int]]:
    """Track id (from 1, 0 for dead nodes) of every node, and the parent track of every daughter track."""
    n_out = np.bincount(edges[:, 0], minlength=n_nodes)
    predecessor = np.full(n_nodes, -1, dtype="int64")
    predecessor[edges[:, 1]] = edges[:, 0]
    track_of = np.zeros(n_nodes, dtype="int64")
    parents: Dict[int, int] = {}
    next_track = 1
    for node in np.flatnonzero(alive):  # node ids are ordered by (frame, label)
        p = predecessor[node]
        if p >= 0 and n_out[p] == 1:
            track_of[node] = track_of[p]
            continue
        track_of[node] = next_track
        if p >= 0:
            parents[next_track] = int(track_of[p])
        next_track += 1
    return track_of, parents


def resolve_tracks(
    graph: TrackingGraph, min_time_extent: int = 0
) -> Tuple[np.ndarray, Dict[int, int], np.ndarray]:
    """Split the graph into tracks, after removing short tracks that do not divide.

    Args:
        graph: The tracking graph.
        min_time_extent: Tracks without daughters that span fewer frames (last - first + 1) are removed,
            repeatedly, until every remaining track without daughters spans at least this many frames. When one of
            two daughters is removed, the mother and the other daughter become one track.

    Returns:
        The track id of every node (consecutive from 1, ordered by first frame and then label; 0 for removed nodes).
        The parent track of every daughter track.
        The cleaned edges.
    """
    times = graph.times
    alive = np.ones(graph.n_nodes, dtype=bool)
    while True:
        edges = _clean_edges(graph.edges, times, alive)
        track_of, parents = _tracks(graph.n_nodes, edges, alive)
        if not min_time_extent or not alive.any():
            return track_of, parents, edges
        n_tracks = int(track_of.max())
        first = np.full(n_tracks + 1, np.iinfo("int64").max)
        last = np.full(n_tracks + 1, -1)
        np.minimum.at(first, track_of[alive], times[alive])
        np.maximum.at(last, track_of[alive], times[alive])
        has_children = np.zeros(n_tracks + 1, dtype=bool)
        has_children[list(parents.values())] = True
        short = (last - first + 1 < min_time_extent) & ~has_children
        short[0] = False
        if not short.any():
            return track_of, parents, edges
        alive &= ~short[track_of]


def lineages_from_parents(n_tracks: int, parents: Dict[int, int]) -> List[Dict[int, List[int]]]:
    """micro_sam's lineage representation: one dict per lineage tree, ``{track: [daughter tracks]}``.

    The lineages are ordered by their root track; the tracks of a lineage are sorted.
    """
    children: Dict[int, List[int]] = {track: [] for track in range(1, n_tracks + 1)}
    for child, parent in sorted(parents.items()):
        children[parent].append(child)
    lineages = []
    for root in range(1, n_tracks + 1):
        if root in parents:
            continue
        lineage, stack = {}, [root]
        while stack:
            track = stack.pop()
            lineage[track] = children[track]
            stack.extend(children[track])
        lineages.append(dict(sorted(lineage.items())))
    return lineages


def recolor(segmentation: np.ndarray, graph: TrackingGraph, track_of: np.ndarray) -> np.ndarray:
    """The label movie with every object replaced by its track id (uint32; removed objects become 0)."""
    result = np.zeros(segmentation.shape, dtype="uint32")
    for t in range(segmentation.shape[0]):
        start, stop = int(graph.offsets[t]), int(graph.offsets[t + 1])
        if start == stop:
            continue
        frame = np.asarray(segmentation[t]).astype("int64", copy=False)
        labels = graph.labels[start:stop]
        ids = track_of[start:stop].astype("uint32")
        if labels[-1] < 4 * frame.size + 1024:  # small labels: a lookup table
            lut = np.zeros(int(max(labels[-1], frame.max())) + 1, dtype="uint32")
            lut[labels] = ids
            result[t] = lut[frame]
        else:
            position = np.clip(np.searchsorted(labels, frame), 0, len(labels) - 1)
            result[t] = np.where((frame != 0) & (labels[position] == frame), ids[position], 0)
    return result


def graph_to_result(
    segmentation: np.ndarray, graph: TrackingGraph, min_time_extent: int = 0
) -> Tuple[np.ndarray, List[Dict[int, List[int]]]]:
    """The tracking result (label movie coloured by track id) and the lineages of a tracking graph."""
    track_of, parents, _ = resolve_tracks(graph, min_time_extent)
    n_tracks = int(track_of.max()) if track_of.size else 0
    return recolor(segmentation, graph, track_of), lineages_from_parents(n_tracks, parents)


def parents_from_lineages(lineages) -> Dict[int, int]:
    """``{daughter track: mother track}`` from lineages given as one dict or a list of dicts ``{track: [children]}``.

    Raises:
        ValueError: If the lineages are not in that format or a track has two mothers.
    """
    if isinstance(lineages, dict):
        lineages = [lineages]
    if not isinstance(lineages, (list, tuple)) or not all(isinstance(lineage, dict) for lineage in lineages):
        raise ValueError("lineages must be a dict {track id: [daughter track ids]} or a list of such dicts, got "
                         f"{type(lineages).__name__}.")
    parents: Dict[int, int] = {}
    for lineage in lineages:
        for parent, children in lineage.items():
            for child in children:
                if child in parents and parents[child] != parent:
                    raise ValueError(f"Track {child} has two mothers in the lineages: {parents[child]} and {parent}.")
                parents[int(child)] = int(parent)
    return parents


def graph_from_tracks(tracking_result: np.ndarray, lineages) -> Tuple[TrackingGraph, np.ndarray]:
    """The tracking graph of a label movie whose labels are track ids, with the divisions of ``lineages``.

    Consecutive appearances of a track are linked (across frames in which it is missing, too); the last
    appearance of a mother is linked to the first appearance of each daughter.

    Returns:
        The graph, and for every edge whether it is a division edge (mother -> one of two or more daughters),
            shape (n_edges,). The edge to the only daughter of a mother is a continuation.

    Raises:
        ValueError: If a daughter track starts before its mother ends.
    """
    parents = parents_from_lineages(lineages)
    frame_labels = [frame_objects(frame).labels for frame in tracking_result]
    offsets, labels = graph_nodes(frame_labels)
    times = np.repeat(np.arange(len(frame_labels)), np.diff(offsets))
    order = np.lexsort((times, labels))  # by track, then frame
    sorted_labels = labels[order]
    same = sorted_labels[1:] == sorted_labels[:-1]
    continuation = np.stack([order[:-1][same], order[1:][same]], axis=1)
    first, last = {}, {}
    for node in order.tolist():
        track = int(labels[node])
        first.setdefault(track, node)
        last[track] = node
    present = {child: parent for child, parent in parents.items() if child in first and parent in last}
    n_children = Counter(present.values())
    division, is_division = [], []
    for child, parent in sorted(present.items()):
        if times[first[child]] <= times[last[parent]]:
            raise ValueError(f"Track {child} starts in frame {times[first[child]]}, but its mother {parent} is still "
                             f"present there (until frame {times[last[parent]]}).")
        division.append((last[parent], first[child]))
        is_division.append(n_children[parent] > 1)  # a single daughter continues the mother (CTC gap convention)
    division = np.array(division, dtype="int64").reshape(-1, 2)
    edges = np.concatenate([continuation.astype("int64"), division])
    is_division = np.concatenate([np.zeros(len(continuation), dtype=bool), np.array(is_division, dtype=bool)])
    return TrackingGraph(offsets=offsets, labels=labels, edges=edges), is_division
