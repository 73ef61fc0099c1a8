"""Tile and halo geometry, shared by embeddings, prompts, AMG and AIS (2D) and the blockwise dask layer (nD).

Tiles cover the image in C order (row-major over the tile grid). Tile ``i`` owns the *inner* block
``[begin, min(begin + tile_shape, shape))``; its embedding is computed on the *outer* block, the inner
block grown by ``halo`` on each side and clipped to the image. This is the same geometry micro_sam uses,
so tile ids in embedding caches agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class Tile:
    """One tile. Slices are in (y, x) order (one per axis, (z, y, x) for 3D blocks); ``local`` locates the
    inner block inside the outer block."""

    tile_id: int
    inner: Tuple[slice, ...]
    outer: Tuple[slice, ...]

    @property
    def local(self) -> Tuple[slice, ...]:
        """The inner block in coordinates of the outer block."""
        return tuple(
            slice(i.start - o.start, i.stop - o.start) for i, o in zip(self.inner, self.outer)
        )

    @property
    def offset(self) -> Tuple[int, ...]:
        """Position ((z,) y, x) of the outer block's first pixel in the full image."""
        return tuple(o.start for o in self.outer)


def validate_tiling(shape: Sequence[int], tile_shape, halo) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Check ``tile_shape`` and ``halo`` for a 2D image of ``shape`` and return them as int tuples."""
    if tile_shape is None:
        if halo is not None:
            raise ValueError("halo was given without tile_shape; pass both for tiled processing, or neither.")
        return None, None
    tile_shape = tuple(int(t) for t in np.atleast_1d(tile_shape))
    halo = (0, 0) if halo is None else tuple(int(h) for h in np.atleast_1d(halo))
    if len(tile_shape) != 2 or len(halo) != 2:
        raise ValueError(f"tile_shape and halo must have two values (y, x), got tile_shape={tile_shape}, halo={halo}.")
    if any(t <= 0 for t in tile_shape) or any(h < 0 for h in halo):
        raise ValueError(f"tile_shape must be positive and halo non-negative, got {tile_shape} and {halo}.")
    if any(t > s for t, s in zip(tile_shape, shape)):
        raise ValueError(
            f"tile_shape {tile_shape} is larger than the image {tuple(shape)}; use a tile_shape that fits into "
            "the image, or tile_shape=None to process the image as a whole."
        )
    if any(2 * h >= t for h, t in zip(halo, tile_shape)):
        raise ValueError(f"halo {halo} must be smaller than half the tile_shape {tile_shape}.")
    return tile_shape, halo


def grid_shape(shape: Sequence[int], tile_shape: Sequence[int]) -> Tuple[int, ...]:
    """Number of tiles along each axis of ``tile_shape`` ((y, x) for 2D tiles; trailing channels ignored)."""
    return tuple(int(np.ceil(s / t)) for s, t in zip(shape[:len(tile_shape)], tile_shape))


def n_tiles(shape: Sequence[int], tile_shape: Sequence[int]) -> int:
    """Number of tiles (or blocks) covering ``shape``."""
    return int(np.prod(grid_shape(shape, tile_shape)))


def get_tile(tile_id: int, shape: Sequence[int], tile_shape: Sequence[int], halo: Sequence[int]) -> Tile:
    """The geometry of tile ``tile_id`` for an image of ``shape`` (2D tiles, or nD blocks: one entry of
    ``tile_shape`` and ``halo`` per blocked axis; further axes of ``shape``, e.g. channels, are ignored)."""
    grid = grid_shape(shape, tile_shape)
    n = int(np.prod(grid))
    if not 0 <= tile_id < n:
        raise ValueError(f"tile_id {tile_id} is out of range for {n} tiles.")
    grid_pos = np.unravel_index(tile_id, grid)
    inner, outer = [], []
    for pos, size, tile, h in zip(grid_pos, shape[:len(tile_shape)], tile_shape, halo):
        begin, end = int(pos) * tile, min((int(pos) + 1) * tile, size)
        inner.append(slice(begin, end))
        outer.append(slice(max(begin - h, 0), min(end + h, size)))
    return Tile(tile_id, tuple(inner), tuple(outer))


def iterate_tiles(shape, tile_shape, halo) -> Iterator[Tile]:
    """All tiles in C order."""
    for tile_id in range(n_tiles(shape, tile_shape)):
        yield get_tile(tile_id, shape, tile_shape, halo)


def tile_of_point(point_yx: Sequence[float], shape, tile_shape, halo) -> Tile:
    """The tile whose inner block contains the point (y, x)."""
    ny, nx = grid_shape(shape, tile_shape)
    y, x = (int(np.clip(int(p), 0, s - 1)) for p, s in zip(point_yx, shape[:2]))
    return get_tile((y // tile_shape[0]) * nx + x // tile_shape[1], shape, tile_shape, halo)


def tiles_overlapping(box: Sequence[int], shape, tile_shape, halo) -> List[Tile]:
    """The tiles whose inner blocks intersect the box [y0, x0, y1, x1) (half-open)."""
    return [
        tile for tile in iterate_tiles(shape, tile_shape, halo)
        if tile.inner[0].start < box[2] and box[0] < tile.inner[0].stop
        and tile.inner[1].start < box[3] and box[1] < tile.inner[1].stop
    ]
