"""Segmentation of volumes (z, y, x) with Segment Anything.

- :func:`segment_mask_in_volume`: interactive 3D segmentation of one object. The object is segmented in one or
  more slices; its mask is projected to the neighbouring slice as a prompt (box / mask / points), SAM
  segments it there, and so on. Outwards from the segmented slices the projection stops when the new mask
  overlaps the previous one with an IoU below ``iou_threshold`` (the object ended or SAM lost it).
- :func:`merge_instance_segmentation_3d`: turns a stack of per-slice instance segmentations into 3D objects by
  solving a multicut on the overlaps of objects in adjacent slices.
- :func:`track_across_frames`: links per-frame objects of a timeseries into tracks with lineages (divisions)
  using the optional package trackastra.
- :func:`get_napari_track_data`: the point / parent-graph representation of a tracking result for napari's
  tracks layer.

Arrays are indexed (z, y, x); a 2D slice is (y, x). Light module: torch / segment_anything are only imported
when prompts are projected (through :mod:`micro_sam.prompt_based_segmentation`).
"""
from __future__ import annotations

import os
from numbers import Integral, Real
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
from scipy import ndimage

from . import util
from ._multicut import solve_multicut

#: The projection modes of :func:`segment_mask_in_volume`.
PROJECTION_MODES = ("box", "mask", "points", "points_and_mask", "single_point")

# projection mode -> (use_box, use_mask, use_points, use_single_point) for segment_from_mask
_PROJECTIONS = {
    "mask": (True, True, False, False),
    "points": (False, False, True, False),
    "box": (True, False, False, False),
    "points_and_mask": (False, True, True, False),
    "single_point": (False, False, True, True),
}
_PROJECTION_KEYS = ("use_box", "use_mask", "use_points")

# Overlaps are clipped to [P_MIN, 1 - P_MIN] before the log-odds transform (as elf does for probabilities).
_P_MIN = 0.001


# --- interactive segmentation of one object across slices -------------------------------------------------
def _validate_projection(projection) -> Tuple[bool, bool, bool, bool]:
    """Translate the projection argument into (use_box, use_mask, use_points, use_single_point)."""
    if isinstance(projection, str):
        if projection not in _PROJECTIONS:
            raise ValueError(f"Invalid projection {projection!r}; choose one of {PROJECTION_MODES} or pass a dict "
                             f"with the boolean keys {_PROJECTION_KEYS}.")
        return _PROJECTIONS[projection]
    if isinstance(projection, dict):
        missing = [key for key in _PROJECTION_KEYS if key not in projection]
        unknown = [key for key in projection if key not in _PROJECTION_KEYS + ("use_single_point",)]
        if missing or unknown:
            raise ValueError(f"A projection dict needs exactly the keys {_PROJECTION_KEYS} (and optionally "
                             f"'use_single_point'); missing {missing}, unknown {unknown}.")
        flags = tuple(bool(projection[key]) for key in _PROJECTION_KEYS)
        if not any(flags):
            raise ValueError(f"The projection dict {projection} enables no prompt; set at least one of "
                             f"{_PROJECTION_KEYS} to True.")
        return flags + (bool(projection.get("use_single_point", False)),)
    raise ValueError(f"Invalid projection {projection!r}; choose one of {PROJECTION_MODES} or pass a dict with the "
                     f"boolean keys {_PROJECTION_KEYS}.")


def _validate_segmented_slices(segmented_slices, n_slices: int) -> np.ndarray:
    slices = np.atleast_1d(np.asarray(segmented_slices))
    if slices.ndim != 1 or slices.size == 0:
        raise ValueError(f"segmented_slices must be a non-empty list of slice indices, got {segmented_slices!r}.")
    if not (np.issubdtype(slices.dtype, np.integer) or
            (np.issubdtype(slices.dtype, np.floating) and np.all(np.mod(slices, 1) == 0))):
        raise ValueError(f"segmented_slices must be integer slice indices, got {segmented_slices!r}.")
    slices = np.unique(slices.astype("int64"))
    if slices[0] < 0 or slices[-1] >= n_slices:
        raise ValueError(f"segmented_slices must lie in [0, {n_slices - 1}] (the segmentation has {n_slices} "
                         f"slices), got {slices.tolist()}.")
    return slices


def _segment_from_mask(*args, **kwargs):
    # Imported on use: it pulls in torch.
    from .prompt_based_segmentation import segment_from_mask

    return segment_from_mask(*args, **kwargs)


def _iou(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
    union = np.logical_or(mask_a, mask_b).sum()
    return float(np.logical_and(mask_a, mask_b).sum() / union) if union else 0.0


def segment_mask_in_volume(
    segmentation: np.ndarray,
    predictor,
    image_embeddings: util.ImageEmbeddings,
    segmented_slices: np.ndarray,
    stop_lower: bool,
    stop_upper: bool,
    iou_threshold: float,
    projection: Union[str, dict],
    update_progress: Optional[Callable] = None,
    box_extension: float = 0.0,
    verbose: bool = False,
) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Segment one object through a volume by projecting its mask from slice to slice.

    Between two segmented slices the gap is filled from both sides towards the middle (a middle slice that is
    equally far from both is prompted with the union of its two neighbours). Below the lowest and above the
    highest segmented slice the object is followed outwards until the new mask has an IoU below
    ``iou_threshold`` with the mask of the previous slice, or the volume ends.

    Args:
        segmentation: The object mask, shape (Z, H, W); non-zero in the already segmented slices. Not modified.
        predictor: The Segment Anything predictor.
        image_embeddings: The precomputed 3D embeddings of the volume
            (:func:`micro_sam.util.precompute_image_embeddings` with ``ndim=3``; may be tiled).
        segmented_slices: The indices of the slices in which the object is segmented (or, for a stop slice, the
            object ends); a list, array or single integer in [0, Z - 1].
        stop_lower: Whether the lowest segmented slice is a stop slice: nothing is segmented below it, and the gap
            above it is filled from the next segmented slice downwards only.
        stop_upper: Whether the highest segmented slice is a stop slice (same, upwards).
        iou_threshold: The minimal IoU in [0, 1] between the masks of adjacent slices to continue the projection
            outwards.
        projection: How a mask is turned into the prompt for the next slice: one of 'box', 'mask' (box + mask),
            'points', 'points_and_mask', 'single_point', or a dict with the boolean keys 'use_box', 'use_mask',
            'use_points' (and optionally 'use_single_point').
        update_progress: Called with 1 after each newly segmented slice.
        box_extension: Relative enlargement of the box prompt derived from the projected mask.
        verbose: Whether to print each projection step.

    Returns:
        The segmentation, shape (Z, H, W), same dtype as the input, 1 where the object is (the originally
            segmented slices are kept).
        The first and last slice of the object, (z_min, z_max).
    """
    segmentation = np.array(segmentation, copy=True)
    if segmentation.ndim != 3:
        raise ValueError(f"segmentation must be a 3D array (z, y, x), got shape {segmentation.shape}.")
    n_slices = segmentation.shape[0]
    slices = _validate_segmented_slices(segmented_slices, n_slices)
    use_box, use_mask, use_points, use_single_point = _validate_projection(projection)
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, Real) or not 0 <= iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be a number in [0, 1], got {iou_threshold!r}.")
    if update_progress is None:
        def update_progress(*args):
            return None

    def project(z: int, prompt: np.ndarray) -> np.ndarray:
        """Segment slice z from the prompt mask (the object's mask in a neighbouring slice)."""
        if not prompt.any():  # nothing to project
            return np.zeros(prompt.shape, dtype=bool)
        masks = _segment_from_mask(
            predictor, prompt, image_embeddings=image_embeddings, i=z, use_box=use_box, use_mask=use_mask,
            use_points=use_points, box_extension=box_extension, use_single_point=use_single_point,
        )
        return np.asarray(masks).reshape(prompt.shape) != 0

    def propagate(start: int, stop: int, step: int, threshold: Optional[float]) -> int:
        """Segment start + step, ..., stop from their predecessor; return the last slice that was segmented."""
        last = start
        for z in range(start + step, stop + step, step):
            previous = segmentation[z - step] != 0
            mask = project(z, previous)
            if threshold is not None:
                iou = _iou(previous, mask)
                if iou < threshold:
                    if verbose:
                        print(f"Stopped at slice {z}: IoU {iou:.3f} with slice {z - step} < {threshold}.")
                    break
            if verbose:
                print(f"Segmented slice {z} from slice {z - step}.")
            segmentation[z] = mask
            last = z
            update_progress(1)
        return last

    z0, z1 = int(slices[0]), int(slices[-1])
    z_min = propagate(z0, 0, -1, iou_threshold) if z0 > 0 and not stop_lower else z0
    z_max = propagate(z1, n_slices - 1, 1, iou_threshold) if z1 < n_slices - 1 and not stop_upper else z1

    for z_start, z_stop in zip(slices[:-1].tolist(), slices[1:].tolist()):
        gap = z_stop - z_start
        if gap == 1:
            continue
        if z_start == z0 and stop_lower:  # the lower slice only marks the end: fill from above
            propagate(z_stop, z_start + 1, -1, None)
        elif z_stop == z1 and stop_upper:  # the upper slice only marks the end: fill from below
            propagate(z_start, z_stop - 1, 1, None)
        elif gap % 2 == 1:  # fill from both sides, the lower half (incl. the middle) from below
            z_mid = (z_start + z_stop) // 2
            propagate(z_start, z_mid, 1, None)
            propagate(z_stop, z_mid + 1, -1, None)
        else:  # fill from both sides; the middle slice from the union of its neighbours
            z_mid = (z_start + z_stop) // 2
            propagate(z_start, z_mid - 1, 1, None)
            propagate(z_stop, z_mid + 1, -1, None)
            prompt = (segmentation[z_mid - 1] != 0) | (segmentation[z_mid + 1] != 0)
            segmentation[z_mid] = project(z_mid, prompt)
            if verbose:
                print(f"Segmented slice {z_mid} from slices {z_mid - 1} and {z_mid + 1}.")
            update_progress(1)

    return segmentation, (z_min, z_max)


# --- merging per-slice instance segmentations into 3D objects ---------------------------------------------
def _validate_label_stack(labels, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"{name} must be a 3D label array (z, y, x), got shape {labels.shape}.")
    if labels.dtype == bool:
        return labels.astype("uint8")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label array, got dtype {labels.dtype}.")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} must not contain negative labels, got minimum {labels.min()}.")
    return labels


def _validate_optional_int(value, name: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f"{name} must be None or a non-negative integer, got {value!r}.")
    return int(value)


def _close_gaps(slice_segmentation: np.ndarray, gap_closing: int, pbar_update: Callable) -> np.ndarray:
    """Fill gaps of up to 2 * gap_closing slices in z with a binary closing along z.

    Filled pixels that connect (in-plane, 8-neighbourhood, within the closed mask) to exactly one object of
    their slice are added to that object; filled regions that touch no object become new objects; filled
    pixels touching several objects are dropped, so that close objects are not fused. Original objects are
    kept unchanged. Labels of the result are unique within each slice (not across slices).
    """
    foreground = slice_segmentation != 0
    # Pad in z so that the closing does not erode objects that touch the first / last slice.
    padded = np.pad(foreground, ((gap_closing, gap_closing), (0, 0), (0, 0)))
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[:, 1, 1] = True
    closed = ndimage.binary_closing(padded, structure=structure, iterations=gap_closing)
    closed = closed[gap_closing:-gap_closing]

    result = slice_segmentation.astype("int64")
    next_id = int(result.max()) + 1
    in_plane = np.ones((3, 3), dtype=bool)
    for z in range(result.shape[0]):
        filled = closed[z] & ~foreground[z]
        if filled.any():
            seg_z = result[z]
            components, n_components = ndimage.label(closed[z], structure=in_plane)
            on_object = seg_z != 0
            pairs = np.unique(np.stack([components[on_object], seg_z[on_object]]), axis=1)
            n_touching = np.bincount(pairs[0], minlength=n_components + 1)
            fill = np.zeros(n_components + 1, dtype="int64")
            fill[pairs[0]] = pairs[1]  # the object id, valid where exactly one object is touched
            fill[n_touching > 1] = 0
            new_components = np.flatnonzero(n_touching == 0)[1:]  # [0] is the background component
            fill[new_components] = next_id + np.arange(len(new_components))
            seg_z[filled] = fill[components[filled]]
        pbar_update(1)
    return result


def _overlap_costs(overlaps: np.ndarray, beta: float) -> np.ndarray:
    """Multicut costs (positive = merge) from overlap fractions.

    cost = 1 + logit(p) + log((1 - beta) / beta) with p clipped to [0.001, 0.999]. At beta = 0.5 two objects
    attract each other if the overlap fraction exceeds 1 / (1 + e) ~ 0.27 (as in micro_sam 1.8); a larger beta
    makes all costs more repulsive (more over-segmentation), a smaller one more attractive.
    """
    p = (1.0 - 2 * _P_MIN) * overlaps + _P_MIN
    return 1.0 + np.log(p / (1.0 - p)) + np.log((1.0 - beta) / beta)


def _slice_overlap_graph(slice_segmentation: np.ndarray, with_background: bool):
    """Nodes = (slice, label) pairs; edges = overlaps of labels in adjacent slices.

    Returns:
        The per-slice sorted labels, the node offset of each slice (length Z + 1), the edges (n_edges, 2) as node
        ids (lower slice first) and the overlap of each edge: the fraction of the lower slice's object covered by
        the upper slice's object. Edges from or to label 0 are only included without background.
    """
    n_slices = slice_segmentation.shape[0]
    slice_labels, offsets = [], [0]
    edges, overlaps = [], []
    previous = None
    for z in range(n_slices):
        labels_z, inverse = np.unique(slice_segmentation[z], return_inverse=True)
        inverse = inverse.ravel().astype("int64")
        slice_labels.append(labels_z)
        offsets.append(offsets[-1] + len(labels_z))
        if previous is not None:
            labels_a, index_a = previous
            n_b = len(labels_z)
            sizes_a = np.bincount(index_a, minlength=len(labels_a))
            if with_background:
                keep = (labels_a[index_a] != 0) & (labels_z[inverse] != 0)
                keys = index_a[keep] * n_b + inverse[keep]
            else:
                keys = index_a * n_b + inverse
            keys, counts = np.unique(keys, return_counts=True)
            a, b = keys // n_b, keys % n_b
            edges.append(np.stack([a + offsets[z - 1], b + offsets[z]], axis=1))
            overlaps.append(counts / sizes_a[a])
        previous = (labels_z, inverse)
    edges = np.concatenate(edges) if edges else np.zeros((0, 2), dtype="int64")
    overlaps = np.concatenate(overlaps) if overlaps else np.zeros(0)
    return slice_labels, np.array(offsets), edges, overlaps


def merge_instance_segmentation_3d(
    slice_segmentation: np.ndarray,
    beta: float = 0.5,
    with_background: bool = True,
    gap_closing: Optional[int] = None,
    min_z_extent: Optional[int] = None,
    verbose: bool = True,
    pbar_init: Optional[Callable] = None,
    pbar_update: Optional[Callable] = None,
) -> np.ndarray:
    """Merge a stack of 2D instance segmentations into 3D objects.

    Every object of every slice is a node; objects in adjacent slices are connected by an edge weighted by their
    overlap (the fraction of the lower object's area covered by the upper object). The overlaps are turned into
    multicut costs by a log-odds transform with the bias ``beta`` and the multicut is solved (greedy additive
    edge contraction + Kernighan-Lin local search, :mod:`micro_sam._multicut`); each cluster becomes one 3D
    object. Nodes of the same slice are never connected directly, so several objects of one slice can become one
    3D object if they are joined through other slices.

    Args:
        slice_segmentation: The per-slice instance segmentations, shape (Z, H, W), 0 = background. The ids only
            need to be unique within each slice (micro_sam 1.8 requires them to be unique across slices, which
            is also fine). Not modified.
        beta: The bias in (0, 1). Larger values give more over-segmentation (fewer merges), smaller values more
            merging. At 0.5 objects are joined if their overlap fraction exceeds ~0.27.
        with_background: Whether 0 is background: then no object is ever merged with it. Otherwise label 0
            takes part in the partition like an object (with its overlaps as costs); objects that end up in the
            same cluster as a 0 region become background (0) in the output.
        gap_closing: If given, gaps of up to ``2 * gap_closing`` slices along z are filled by a binary closing
            along z before merging (filled pixels join the only object they touch in their slice, or form new
            objects; pixels touching several objects are not filled).
        min_z_extent: If given, objects spanning fewer than this many slices are removed.
        verbose: Whether to show a progress bar.
        pbar_init: Callback to initialise an external progress bar, called with (total, description).
        pbar_update: Callback to update an external progress bar, called with the number of steps done.

    Returns:
        The 3D segmentation, shape (Z, H, W), dtype uint32, objects numbered consecutively from 1 in the order
            of their first pixel (slice by slice), 0 = background.
    """
    segmentation = _validate_label_stack(slice_segmentation, "slice_segmentation")
    if isinstance(beta, bool) or not isinstance(beta, Real) or not 0 < beta < 1:
        raise ValueError(f"beta must be a number in the open interval (0, 1), got {beta!r}.")
    gap_closing = _validate_optional_int(gap_closing, "gap_closing")
    min_z_extent = _validate_optional_int(min_z_extent, "min_z_extent")

    _, pbar_init, pbar_update, pbar_close = util.handle_pbar(verbose, pbar_init, pbar_update)
    if gap_closing:
        pbar_init(segmentation.shape[0] + 1, "Merge segmentation")
        segmentation = _close_gaps(segmentation, gap_closing, pbar_update)
    else:
        pbar_init(1, "Merge segmentation")

    slice_labels, offsets, edges, overlaps = _slice_overlap_graph(segmentation, with_background)
    n_nodes = int(offsets[-1])
    node_labels = solve_multicut(n_nodes, edges, _overlap_costs(overlaps, beta))

    # Cluster -> output id: background clusters become 0, the others 1, 2, ... (clusters are numbered by their
    # first node, i.e. in slice order).
    is_background = np.zeros(int(node_labels.max()) + 1 if n_nodes else 0, dtype=bool)
    background_nodes = np.array([offsets[z] for z, labels in enumerate(slice_labels) if labels[0] == 0],
                                dtype="int64")
    is_background[node_labels[background_nodes]] = True
    cluster_ids = np.where(is_background, 0, np.cumsum(~is_background))
    node_ids = cluster_ids[node_labels]

    if min_z_extent:
        node_slice = np.repeat(np.arange(len(slice_labels)), np.diff(offsets))
        n_ids = int(node_ids.max()) + 1
        first, last = np.full(n_ids, len(slice_labels)), np.full(n_ids, -1)
        np.minimum.at(first, node_ids, node_slice)
        np.maximum.at(last, node_ids, node_slice)
        keep = (last - first + 1) >= min_z_extent
        keep[0] = False
        new_ids = np.where(keep, np.cumsum(keep), 0)
        node_ids = new_ids[node_ids]

    dtype = "uint32" if (node_ids.max(initial=0) <= np.iinfo(np.uint32).max) else "uint64"  # as the 2D results
    node_ids = node_ids.astype(dtype)
    merged = np.empty(segmentation.shape, dtype=dtype)
    for z, labels in enumerate(slice_labels):
        lut = node_ids[offsets[z]:offsets[z + 1]]
        merged[z] = lut[np.searchsorted(labels, segmentation[z])]

    pbar_update(1)
    pbar_close()
    return merged


# --- automatic 3D instance segmentation --------------------------------------------------------------------
def automatic_3d_segmentation(
    volume: np.ndarray,
    predictor,
    segmentor,
    embedding_path=None,
    with_background: bool = True,
    gap_closing: Optional[int] = None,
    min_z_extent: Optional[int] = None,
    tile_shape: Optional[Tuple[int, int]] = None,
    halo: Optional[Tuple[int, int]] = None,
    verbose: bool = True,
    return_embeddings: bool = False,
    batch_size: int = 1,
    **kwargs,
):
    """Segment a volume automatically: every slice in 2D, then objects merged across slices.

    Each slice is segmented with ``segmentor`` (AMG, AIS or APG from ``micro_sam.instance_segmentation``); the
    per-slice objects are joined into 3D objects by :func:`merge_instance_segmentation_3d`.

    Args:
        volume: (Z, Y, X) or (Z, Y, X, C) volume.
        predictor: The ``SamPredictor``.
        segmentor: An instance segmentation class from ``micro_sam.instance_segmentation``.
        embedding_path: A zarr path to cache (and reuse) the per-slice embeddings.
        with_background: Keep the background separate when merging (see :func:`merge_instance_segmentation_3d`).
        gap_closing: Close gaps of up to this many slices before merging.
        min_z_extent: Remove objects spanning fewer slices.
        tile_shape: (y, x) tile shape for tiled embeddings and segmentation (needs a tiled segmentor).
        halo: (y, x) overlap of the tiles.
        verbose: Show progress bars.
        return_embeddings: Also return the image embeddings.
        batch_size: Slices or tiles per image encoder pass.
        kwargs: Arguments of the segmentor's ``generate``.

    Returns:
        The (Z, Y, X) label volume, and the embeddings if ``return_embeddings`` is True.
    """
    from .instance_segmentation._volume import segment_slices

    segmentation, image_embeddings = segment_slices(
        volume, predictor, segmentor, embedding_path=embedding_path, verbose=verbose, tile_shape=tile_shape,
        halo=halo, batch_size=batch_size, **kwargs,
    )
    segmentation = merge_instance_segmentation_3d(
        segmentation, beta=0.5, with_background=with_background, gap_closing=gap_closing,
        min_z_extent=min_z_extent, verbose=verbose,
    )
    return (segmentation, image_embeddings) if return_embeddings else segmentation


# --- tracking -------------------------------------------------------------------------------------------------
def _tracks_from_graph(graph) -> Tuple[Dict[Tuple[int, int], int], List[Dict[int, List[int]]]]:
    """Split a tracking graph into tracks (linear chains) and lineages.

    Args:
        graph: A networkx DiGraph whose nodes have the attributes 'time' (frame) and 'label' (segmentation id in
            that frame) and whose edges link an object to its successor(s) in a later frame.

    Returns:
        The track id (from 1, numbered by start frame, then label) of each (frame, label).
        The lineages: one dict per lineage (a tree of tracks joined by divisions) mapping every track of the
            lineage to its child tracks (an empty list for tracks that do not divide), ordered by root track.
    """
    def key(node):
        return int(graph.nodes[node]["time"]), int(graph.nodes[node]["label"])

    track_of, parent_of = {}, {}
    next_track = 1
    for node in sorted(graph.nodes, key=key):
        predecessors = list(graph.predecessors(node))
        continues = len(predecessors) == 1 and graph.out_degree(predecessors[0]) == 1
        if continues:
            track_of[node] = track_of[predecessors[0]]
            continue
        track_of[node] = next_track
        if len(predecessors) == 1:  # starts after a division
            parent_of[next_track] = track_of[predecessors[0]]
        next_track += 1

    children = {track: [] for track in range(1, next_track)}
    for child, parent in sorted(parent_of.items()):
        children[parent].append(child)
    lineages = []
    for root in children:
        if root in parent_of:
            continue
        lineage, stack = {}, [root]
        while stack:
            track = stack.pop()
            lineage[track] = children[track]
            stack.extend(children[track])
        lineages.append(dict(sorted(lineage.items())))
    return {key(node): track for node, track in track_of.items()}, lineages


def _recolor(segmentation: np.ndarray, track_of: Dict[Tuple[int, int], int]) -> np.ndarray:
    """Relabel every object of every frame with its track id (objects without a track become 0)."""
    result = np.zeros(segmentation.shape, dtype="uint32")
    for t in range(segmentation.shape[0]):
        labels = np.unique(segmentation[t])
        lut = np.array([track_of.get((t, int(label)), 0) for label in labels], dtype="uint32")
        result[t] = lut[np.searchsorted(labels, segmentation[t])]
    return result


def _filter_short_tracks(tracking_result, lineages, min_time_extent):
    frames = [set(np.unique(frame).tolist()) - {0} for frame in tracking_result]
    extent = {}
    for t, tracks in enumerate(frames):
        for track in tracks:
            first, _ = extent.get(track, (t, t))
            extent[track] = (first, t)
    short = [track for track, (first, last) in extent.items() if last - first + 1 < min_time_extent]
    if short:
        tracking_result = np.where(np.isin(tracking_result, short), 0, tracking_result).astype(tracking_result.dtype)
    kept = set(extent) - set(short)
    lineages = [{track: [child for child in children if child in kept] for track, children in lineage.items()
                 if track in kept} for lineage in lineages]
    return tracking_result, [lineage for lineage in lineages if lineage]


def track_across_frames(
    timeseries: np.ndarray,
    segmentation: np.ndarray,
    gap_closing: Optional[int] = None,
    min_time_extent: Optional[int] = None,
    mode: str = "greedy",
    tracking_model: str = "general_2d",
    verbose: bool = True,
    pbar_init: Optional[Callable] = None,
    pbar_update: Optional[Callable] = None,
    output_folder: Optional[Union[str, os.PathLike]] = None,
) -> Tuple[np.ndarray, List[Dict]]:
    """Track segmented objects over time with Trackastra (https://github.com/weigertlab/trackastra).

    Requires the optional package ``trackastra`` (``pip install trackastra``), which downloads its pretrained
    model on first use. Please cite Trackastra (Gallusser and Weigert, ECCV 2024) when using this function.

    Args:
        timeseries: The images, shape (T, H, W).
        segmentation: The per-frame instance segmentation, shape (T, H, W); ids must be unique within each frame.
        gap_closing: If given, objects missing in up to ``2 * gap_closing`` frames are filled in before tracking
            (the binary closing along time of :func:`merge_instance_segmentation_3d`).
        min_time_extent: If given, tracks present in fewer frames are removed (also from the lineages).
        mode: Trackastra's linking mode: 'greedy_nodiv', 'greedy' or 'ilp' (the latter needs motile).
        tracking_model: The name of the pretrained Trackastra model.
        verbose: Whether to show progress.
        pbar_init: Callback to initialise an external progress bar, called with (total, description).
        pbar_update: Callback to update an external progress bar.
        output_folder: If given, the result is also saved there in the Cell Tracking Challenge format
            (by Trackastra).

    Returns:
        The tracking result, shape (T, H, W), uint32: every object labelled with its track id (from 1).
        The lineages: a list with one dict per lineage that maps each of its track ids to the ids of its child
            tracks (two after a division, none otherwise).
    """
    try:
        from trackastra.model import Trackastra
        from trackastra.tracking import graph_to_ctc
    except ImportError:
        raise RuntimeError("Automatic tracking requires trackastra; install it with 'pip install trackastra'.")
    segmentation = _validate_label_stack(segmentation, "segmentation")
    timeseries = np.asarray(timeseries)
    if timeseries.shape != segmentation.shape:
        raise ValueError(f"timeseries (shape {timeseries.shape}) and segmentation (shape {segmentation.shape}) "
                         "must have the same shape (T, H, W).")
    gap_closing = _validate_optional_int(gap_closing, "gap_closing")
    min_time_extent = _validate_optional_int(min_time_extent, "min_time_extent")
    modes = ("greedy_nodiv", "greedy", "ilp")
    if mode not in modes:
        raise ValueError(f"Invalid mode {mode!r}; choose one of {modes}.")

    _, pbar_init, pbar_update, pbar_close = util.handle_pbar(verbose, pbar_init, pbar_update)
    pbar_init(segmentation.shape[0] + 1 if gap_closing else 1, "Track objects")
    if gap_closing:
        segmentation = _close_gaps(segmentation, gap_closing, pbar_update)

    import torch

    model = Trackastra.from_pretrained(tracking_model, device="cuda" if torch.cuda.is_available() else "cpu")
    result = model.track(timeseries, segmentation, mode=mode)
    graph = result[0] if isinstance(result, tuple) else result  # newer versions also return the tracked masks

    track_of, lineages = _tracks_from_graph(graph)
    tracking_result = _recolor(segmentation, track_of)
    if output_folder is not None:
        graph_to_ctc(graph, segmentation, outdir=output_folder)
    if min_time_extent:
        tracking_result, lineages = _filter_short_tracks(tracking_result, lineages, min_time_extent)
    pbar_update(1)
    pbar_close()
    return tracking_result, lineages


# --- napari helpers -------------------------------------------------------------------------------------------
def get_napari_track_data(
    segmentation: np.ndarray, lineages: List[Dict], n_threads: Optional[int] = None
) -> Tuple[np.ndarray, Dict[int, List]]:
    """Convert a tracking result into the data of napari's tracks layer.

    Args:
        segmentation: The tracking result, shape (T, H, W): every object labelled with its track id.
        lineages: The lineages, a list of dicts mapping a parent track id to its child track ids
            (an empty list when the track does not divide).
        n_threads: Unused (the computation is vectorised); kept for compatibility with micro_sam.

    Returns:
        The track data, shape (n_points, 4): one row (track_id, t, y, x) per track and frame, with the centroid of
            the object in that frame, sorted by frame and then track id.
        The parent graph in napari's convention: child track id -> [parent track id].
    """
    segmentation = _validate_label_stack(segmentation, "segmentation")
    rows = []
    for t in range(segmentation.shape[0]):
        frame = segmentation[t]
        ids = np.unique(frame)
        ids = ids[ids != 0]
        if len(ids) == 0:
            continue
        index = np.searchsorted(ids, frame[frame != 0])
        counts = np.bincount(index, minlength=len(ids))
        y, x = np.nonzero(frame)
        centroid_y = np.bincount(index, weights=y, minlength=len(ids)) / counts
        centroid_x = np.bincount(index, weights=x, minlength=len(ids)) / counts
        rows.append(np.stack([ids.astype("float64"), np.full(len(ids), t, dtype="float64"), centroid_y,
                              centroid_x], axis=1))
    track_data = np.concatenate(rows) if rows else np.zeros((0, 4))
    parent_graph = {
        child: [parent] for lineage in lineages for parent, children in lineage.items() for child in children
    }
    return track_data, parent_graph
