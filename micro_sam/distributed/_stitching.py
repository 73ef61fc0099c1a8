"""Stitching of blockwise segmentations: pure numpy / scipy functions, independent of dask and of I/O.

A large image is cut into blocks (``micro_sam._tiling``: block ``b`` owns the *inner* region, and is segmented
on its *outer* region, the inner region grown by ``halo``). Each block keeps the labels of its inner region,
renumbered 1..n (:func:`crop_block`), and its view of the strips just across its faces, the *skirts*: the
first ``halo`` pixels of each neighbour's inner region, labelled with the same ids. Two blocks sharing a face
then see the same pixels on both sides of it: the face strips of both inner regions. An object of the lower
block and an object of the upper block are the same object when their pixels in these strips overlap with an
intersection over union of at least ``iou_threshold`` (:func:`match_face`). A global relabelling joins the
matched objects: connected components of the match graph (:func:`merge_labels`).

Every pixel is written by exactly one block (its owner), so no pixel can be labelled twice or lost at a seam;
two different objects that merely touch at a face stay apart, because the blocks see each other's side.
Ids: local ids are 1..n per block (0 = background); global ids are ``offset[b] + local``, ``offset`` the
cumulative object count of the blocks before ``b`` (C order); final ids are 1..N.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .. import _tiling

__all__ = ["BlockLabels", "block_faces", "crop_block", "face_regions", "iterate_blocks", "match_face", "merge_labels",
           "stitch_blocks"]


@dataclass
class BlockLabels:
    """A block's share of a blockwise segmentation (see :func:`crop_block`).

    Attributes:
        inner: The labels of the block's inner region, ids 1..``n_objects`` (uint32).
        skirts: ``{(axis, side): labels}`` with ``side`` -1 (the strip below the block's lower face along ``axis``)
            or +1 (above its upper face): the block's view of the neighbour's first ``halo`` pixels, with the
            block's own ids (objects that do not reach into the inner region are 0).
        n_objects: Number of objects in the inner region.
    """

    inner: np.ndarray
    skirts: Dict[Tuple[int, int], np.ndarray]
    n_objects: int


def iterate_blocks(shape: Sequence[int], block_shape: Sequence[int], halo: Sequence[int]) -> List[_tiling.Tile]:
    """The blocks covering ``shape`` in C order, each with its ``inner`` and ``outer`` slices (one per axis).

    Args:
        shape: Spatial shape ((Y, X) or (Z, Y, X)).
        block_shape: Block shape, one value per axis.
        halo: Halo, one value per axis: the outer region is the inner one grown by it, clipped to the image.

    Returns:
        The blocks (``tile_id`` is the block id).
    """
    return list(_tiling.iterate_tiles(tuple(shape), tuple(block_shape), tuple(halo)))


def block_faces(shape: Sequence[int], block_shape: Sequence[int]) -> List[Tuple[int, int, int]]:
    """The faces between neighbouring blocks.

    Args:
        shape: Spatial shape of the image ((Y, X) or (Z, Y, X)).
        block_shape: Block shape, one value per axis of ``shape``.

    Returns:
        ``(lower_block_id, upper_block_id, axis)`` for every pair of blocks that share a face, block ids in
        C order over the block grid.
    """
    grid = _tiling.grid_shape(shape, block_shape)
    faces = []
    for block_id in range(int(np.prod(grid))):
        position = np.unravel_index(block_id, grid)
        for axis in range(len(grid)):
            if position[axis] + 1 < grid[axis]:
                upper = list(position)
                upper[axis] += 1
                faces.append((block_id, int(np.ravel_multi_index(upper, grid)), axis))
    return faces


def face_regions(block: _tiling.Tile, axis: int, side: int, shape: Sequence[int], halo: Sequence[int]):
    """The strip across a face of ``block``: global slices of the strip, or None at the image border.

    The strip lies in the neighbour's inner region: along ``axis`` the first ``halo[axis]`` pixels beyond the
    face (fewer if the image ends), across the other axes the block's inner extent.
    """
    inner = list(block.inner)
    if side < 0:
        if inner[axis].start == 0:
            return None
        strip = slice(max(inner[axis].start - halo[axis], 0), inner[axis].start)
    else:
        if inner[axis].stop >= shape[axis]:
            return None
        strip = slice(inner[axis].stop, min(inner[axis].stop + halo[axis], shape[axis]))
    inner[axis] = strip
    return tuple(inner)


def _local(block: _tiling.Tile, region) -> Tuple[slice, ...]:
    return tuple(slice(r.start - o.start, r.stop - o.start) for r, o in zip(region, block.outer))


def crop_block(outer_labels: np.ndarray, block: _tiling.Tile, shape: Sequence[int],
               halo: Sequence[int]) -> BlockLabels:
    """Keep a block's inner labels (renumbered 1..n) and its skirts, from its segmentation of the outer region.

    Args:
        outer_labels: Label image of the block's outer region (shape of ``block.outer``), any integer ids.
        block: The block (``micro_sam._tiling.get_tile`` with the block shape and halo).
        shape: Spatial shape of the whole image.
        halo: The halo, one value per axis.

    Returns:
        The :class:`BlockLabels`. Objects are numbered in the order of their ids in ``outer_labels``.

    Raises:
        ValueError: ``outer_labels`` does not have the outer region's shape, or has negative ids.
    """
    outer_labels = np.asarray(outer_labels)
    expected = tuple(s.stop - s.start for s in block.outer)
    if outer_labels.shape != expected:
        raise ValueError(f"The block segmentation has shape {outer_labels.shape}, expected the outer region's "
                         f"shape {expected}.")
    inner = outer_labels[block.local]
    if inner.size and inner.min() < 0:
        raise ValueError("Label images must not contain negative ids.")
    ids = np.unique(inner)
    ids = ids[ids != 0]

    def renumber(labels: np.ndarray) -> np.ndarray:
        """Ids of the inner region -> 1..n, all others -> 0."""
        position = np.searchsorted(ids, labels)
        position = np.minimum(position, max(len(ids) - 1, 0))
        found = (labels != 0) & (ids[position] == labels) if len(ids) else np.zeros(labels.shape, bool)
        return np.where(found, position + 1, 0).astype("uint32")

    skirts = {}
    for axis in range(len(block.inner)):
        for side in (-1, 1):
            region = face_regions(block, axis, side, shape, halo)
            if region is not None:
                skirts[(axis, side)] = renumber(outer_labels[_local(block, region)])
    return BlockLabels(inner=renumber(inner), skirts=skirts, n_objects=int(len(ids)))


def _contingency(x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Pairs (x, y) of nonzero ids that share pixels, and their pixel counts."""
    x, y = np.ravel(x).astype("uint64"), np.ravel(y).astype("uint64")
    both = (x != 0) & (y != 0)
    if not both.any():
        return np.zeros((0, 2), dtype="uint64"), np.zeros(0, dtype="int64")
    keys, counts = np.unique((x[both] << np.uint64(32)) | y[both], return_counts=True)
    return np.stack([keys >> np.uint64(32), keys & np.uint64(0xFFFFFFFF)], axis=1), counts


def _sizes(labels_parts: Sequence[np.ndarray]) -> Dict[int, int]:
    ids, counts = np.unique(np.concatenate([np.ravel(p) for p in labels_parts]), return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts) if i != 0}


def match_face(lower_inner: np.ndarray, lower_skirt: np.ndarray, upper_inner: np.ndarray,
               upper_skirt: np.ndarray, iou_threshold: float = 0.5) -> np.ndarray:
    """Objects of two neighbouring blocks that are the same object, from the two strips along their face.

    The lower block's strip (its last ``halo`` pixels along the face axis) is labelled by the lower block
    (``lower_inner``) and, through its skirt, by the upper block (``upper_skirt``); the upper block's strip by
    the upper block (``upper_inner``) and the lower block's skirt (``lower_skirt``). An object ``a`` of the
    lower block and ``b`` of the upper block are matched when, over both strips, their pixels overlap with an
    intersection over union of at least ``iou_threshold``.

    Args:
        lower_inner: Lower block's labels in its own strip (local ids).
        lower_skirt: Lower block's labels in the upper block's strip.
        upper_inner: Upper block's labels in its own strip.
        upper_skirt: Upper block's labels in the lower block's strip (same shape as ``lower_inner``).
        iou_threshold: Minimal intersection over union for a match, in (0, 1].

    Returns:
        (K, 2) int64 array of matched (lower id, upper id) pairs, sorted.

    Raises:
        ValueError: Strips of different shapes, or a threshold outside (0, 1].
    """
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}.")
    if np.shape(lower_inner) != np.shape(upper_skirt) or np.shape(upper_inner) != np.shape(lower_skirt):
        raise ValueError(f"The strips of a face must have equal shapes, got {np.shape(lower_inner)} / "
                         f"{np.shape(upper_skirt)} and {np.shape(upper_inner)} / {np.shape(lower_skirt)}.")
    pairs_a, counts_a = _contingency(lower_inner, upper_skirt)
    pairs_b, counts_b = _contingency(lower_skirt, upper_inner)
    pairs = np.concatenate([pairs_a, pairs_b])
    if len(pairs) == 0:
        return np.zeros((0, 2), dtype="int64")
    keys, inverse = np.unique((pairs[:, 0] << np.uint64(32)) | pairs[:, 1], return_inverse=True)
    overlap = np.bincount(inverse.ravel(), weights=np.concatenate([counts_a, counts_b]))
    lower_sizes = _sizes([lower_inner, lower_skirt])
    upper_sizes = _sizes([upper_skirt, upper_inner])
    lower_ids, upper_ids = (keys >> np.uint64(32)).astype("int64"), (keys & np.uint64(0xFFFFFFFF)).astype("int64")
    union = np.array([lower_sizes[a] + upper_sizes[b] for a, b in zip(lower_ids, upper_ids)]) - overlap
    keep = overlap >= iou_threshold * union
    return np.stack([lower_ids[keep], upper_ids[keep]], axis=1)


def merge_labels(n_objects: Sequence[int], matches: Sequence[Tuple[int, int, np.ndarray]]) -> List[np.ndarray]:
    """The global relabelling: one lookup table per block from local ids to final ids.

    Args:
        n_objects: Number of objects of each block (C order).
        matches: ``(lower_block_id, upper_block_id, pairs)`` with ``pairs`` from :func:`match_face`.

    Returns:
        Per block a uint32 array ``lut`` of length ``n_objects[b] + 1`` (``lut[0] == 0``): matched objects
        (connected components of the match graph) share one id; final ids are 1..N, numbered in the order of
        each merged object's first (block, local id).

    Raises:
        ValueError: A pair names an object id that its block does not have.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_objects = np.asarray(n_objects, dtype="int64")
    offsets = np.concatenate([[0], np.cumsum(n_objects)])
    total = int(offsets[-1])
    rows, cols = [], []
    for lower, upper, pairs in matches:
        pairs = np.asarray(pairs, dtype="int64").reshape(-1, 2)
        if len(pairs) == 0:
            continue
        if (pairs[:, 0] < 1).any() or (pairs[:, 0] > n_objects[lower]).any() or \
                (pairs[:, 1] < 1).any() or (pairs[:, 1] > n_objects[upper]).any():
            raise ValueError(f"A match between blocks {lower} and {upper} names an object id outside 1..n of its "
                             f"block ({n_objects[lower]} and {n_objects[upper]} objects).")
        rows.append(offsets[lower] + pairs[:, 0] - 1)
        cols.append(offsets[upper] + pairs[:, 1] - 1)
    if rows:
        rows, cols = np.concatenate(rows), np.concatenate(cols)
    else:
        rows, cols = np.zeros(0, "int64"), np.zeros(0, "int64")
    graph = coo_matrix((np.ones(len(rows), dtype="int8"), (rows, cols)), shape=(total, total))
    _, component = connected_components(graph, directed=False)
    # Number the components in the order of their first node.
    _, first = np.unique(component, return_index=True)
    rank = np.empty(len(first), dtype="uint32")
    rank[np.argsort(first)] = np.arange(1, len(first) + 1, dtype="uint32")
    final = rank[component] if total else np.zeros(0, "uint32")
    return [np.concatenate([[0], final[offsets[b]:offsets[b + 1]]]).astype("uint32") for b in range(len(n_objects))]


def stitch_blocks(outer_labels: Sequence[np.ndarray], shape: Sequence[int], block_shape: Sequence[int],
                  halo: Sequence[int], iou_threshold: float = 0.5) -> np.ndarray:
    """Stitch the segmentations of all blocks of an image into one label image (in memory).

    This is the reference composition of :func:`crop_block`, :func:`match_face` and :func:`merge_labels`;
    ``micro_sam.distributed`` runs the same steps as dask tasks on arrays on disk.

    Args:
        outer_labels: Per block (C order over the block grid), its label image of the outer region.
        shape: Spatial shape of the image ((Y, X) or (Z, Y, X)).
        block_shape: Block shape, one value per axis.
        halo: Halo, one value per axis.
        iou_threshold: See :func:`match_face`.

    Returns:
        The uint32 label image of ``shape``: ids 1..N, objects crossing block faces joined.

    Raises:
        ValueError: Wrong number of blocks or a block of the wrong shape.
    """
    shape, block_shape, halo = tuple(shape), tuple(block_shape), tuple(halo)
    n_blocks = _tiling.n_tiles(shape, block_shape)
    if len(outer_labels) != n_blocks:
        raise ValueError(f"Expected {n_blocks} block segmentations for shape {shape} and block_shape "
                         f"{block_shape}, got {len(outer_labels)}.")
    blocks = [_tiling.get_tile(b, shape, block_shape, halo) for b in range(n_blocks)]
    parts = [crop_block(labels, block, shape, halo) for labels, block in zip(outer_labels, blocks)]
    matches = []
    for lower, upper, axis in block_faces(shape, block_shape):
        pairs = match_face(parts[lower].inner[_strip(blocks[lower], axis, +1, halo)], parts[lower].skirts[(axis, 1)],
                           parts[upper].inner[_strip(blocks[upper], axis, -1, halo)],
                           parts[upper].skirts[(axis, -1)], iou_threshold)
        matches.append((lower, upper, pairs))
    luts = merge_labels([p.n_objects for p in parts], matches)
    result = np.zeros(shape, dtype="uint32")
    for block, part, lut in zip(blocks, parts, luts):
        result[block.inner] = lut[part.inner]
    return result


def _strip(block: _tiling.Tile, axis: int, side: int, halo: Sequence[int]) -> Tuple[slice, ...]:
    """The block's own strip along a face, in coordinates of its inner region (the neighbour's skirt region)."""
    size = block.inner[axis].stop - block.inner[axis].start
    strip = [slice(None)] * len(block.inner)
    strip[axis] = slice(max(size - halo[axis], 0), size) if side > 0 else slice(0, min(halo[axis], size))
    return tuple(strip)
