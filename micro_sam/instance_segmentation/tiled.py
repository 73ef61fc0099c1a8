"""Tiled automatic segmentation for images larger than SAM's input: one seamless label image.

Both generators use tiled embeddings (``util.precompute_image_embeddings(..., tile_shape, halo)``), whose
tiles overlap by ``halo`` (geometry in ``micro_sam._tiling``).

- :class:`TiledInstanceSegmentationWithDecoder` runs the decoder per tile (on the tile with its halo), keeps
  each tile's inner region of the predicted maps, stitches them into full image maps and runs the watershed
  once on the whole image: objects crossing tile borders are neither cut nor duplicated, by construction.
- :class:`TiledAutomaticMaskGenerator` predicts masks on a point grid per tile (with its halo). Masks cut by a
  tile border are dropped (the neighbouring tile sees the object whole, if the halo is large enough), masks of
  the same object from two tiles are de-duplicated: by box NMS as in micro_sam, and then by mask overlap,
  keeping the mask of the tile that owns the object's centre. Masks are never clipped to tiles.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import _tiling
from . import _mask_store as store
from .ais import InstanceSegmentationWithDecoder, background_maps, run_decoder
from .amg import AutomaticMaskGenerator, _select_image

__all__ = ["TiledAutomaticMaskGenerator", "TiledInstanceSegmentationWithDecoder"]


def _is_tiled(image_embeddings) -> bool:
    features = image_embeddings["features"]
    return hasattr(features, "keys") and not hasattr(features, "shape")


def _process_tiled_embeddings(predictor, image, image_embeddings, tile_shape, halo, verbose, batch_size, mask, i):
    """Compute (or check) tiled embeddings for ``image``.

    Returns:
        The embeddings, the tile shape, the halo and the ids of the tiles to process (all, or those in ``mask``).
    """
    from ..util import precompute_image_embeddings

    shape = tuple(int(s) for s in image.shape[:2])
    if image_embeddings is None:
        if tile_shape is None or halo is None:
            raise ValueError("tile_shape and halo are needed to compute tiled embeddings; pass both, or pass "
                             "precomputed tiled image_embeddings.")
        image_embeddings = precompute_image_embeddings(
            predictor, image, ndim=2, tile_shape=tile_shape, halo=halo, verbose=verbose, batch_size=batch_size,
            mask=mask,
        )
    if not _is_tiled(image_embeddings):
        raise ValueError("The image embeddings are not tiled; use the untiled segmenter (is_tiled=False) for "
                         "them, or compute tiled embeddings with tile_shape and halo.")
    attrs = image_embeddings["features"].attrs
    tile_shape_, halo_ = tuple(int(t) for t in attrs["tile_shape"]), tuple(int(h) for h in attrs["halo"])
    if tile_shape is not None and tuple(int(t) for t in tile_shape) != tile_shape_:
        raise ValueError(f"tile_shape {tuple(tile_shape)} does not match the precomputed embeddings' {tile_shape_}.")
    if halo is not None and tuple(int(h) for h in halo) != halo_:
        raise ValueError(f"halo {tuple(halo)} does not match the precomputed embeddings' {halo_}.")
    if "shape" in attrs and tuple(int(s) for s in attrs["shape"]) != shape:
        raise ValueError(
            f"The image embeddings were computed for an image of shape {tuple(attrs['shape'])}, but the image "
            f"has shape {shape}; recompute the embeddings for this image."
        )
    tiles_in_mask = attrs.get("tiles_in_mask", None)
    if tiles_in_mask is None:
        tile_ids = list(range(_tiling.n_tiles(shape, tile_shape_)))
    elif isinstance(tiles_in_mask, dict):
        tile_ids = [int(t) for t in tiles_in_mask.get(str(i), [])] if i is not None else \
            sorted({int(t) for ts in tiles_in_mask.values() for t in ts})
    else:
        tile_ids = [int(t) for t in tiles_in_mask]
    return image_embeddings, tile_shape_, halo_, tile_ids


class TiledAutomaticMaskGenerator(AutomaticMaskGenerator):
    """Automatic mask generation on tiled embeddings; one point grid per tile (including its halo).

    Args:
        predictor: The segment_anything ``SamPredictor``.
        points_per_side: Points along each side of a tile.
        points_per_batch: Points passed through the mask decoder together.
        point_grids: Explicit grid (a list with one (N, 2) array of (x, y) in [0, 1]); needs points_per_side=None.
        stability_score_offset: Logit offset for the stability score.
    """

    def __init__(
        self,
        predictor,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        point_grids: Optional[List[np.ndarray]] = None,
        stability_score_offset: float = 1.0,
    ) -> None:
        super().__init__(predictor=predictor, points_per_side=points_per_side, points_per_batch=points_per_batch,
                         point_grids=point_grids, stability_score_offset=stability_score_offset)

    def initialize(
        self,
        image: np.ndarray,
        image_embeddings: Optional[Dict[str, Any]] = None,
        i: Optional[int] = None,
        tile_shape: Optional[Tuple[int, int]] = None,
        halo: Optional[Tuple[int, int]] = None,
        verbose: bool = False,
        pbar_init: Optional[callable] = None,
        pbar_update: Optional[callable] = None,
        batch_size: int = 1,
        mask: Optional[np.ndarray] = None,
    ) -> None:
        """Predict the masks for the point grids of all tiles (the expensive step).

        Args:
            image: (Y, X) or (Y, X, C) image; or a volume together with the slice index ``i``.
            image_embeddings: Precomputed tiled embeddings of this image; computed here if None.
            i: Slice index for 3D embeddings.
            tile_shape: (y, x) tile shape, needed when the embeddings are computed here.
            halo: (y, x) overlap, needed when the embeddings are computed here.
            verbose: Show progress bars.
            pbar_init: External progress bar callback ``pbar_init(total, description)``.
            pbar_update: External progress bar callback ``pbar_update(n)``.
            batch_size: Tiles per encoder pass when computing embeddings.
            mask: Optional (Y, X) mask; only tiles overlapping it are processed.
        """
        import torch

        from ..util import handle_pbar, set_precomputed

        image = _select_image(image, i)
        shape = tuple(int(s) for s in image.shape[:2])
        image_embeddings, tile_shape, halo, tile_ids = _process_tiled_embeddings(
            self._predictor, image, image_embeddings, tile_shape, halo, verbose, batch_size, mask, i
        )
        self.clear_state()
        self._original_size = shape
        _, init, update, close = handle_pbar(verbose, pbar_init, pbar_update)
        init(len(tile_ids), "Compute masks for tile")
        crop_list, crop_boxes, owners = [], [], []
        try:
            with torch.inference_mode():
                for tile_id in tile_ids:
                    tile = _tiling.get_tile(tile_id, shape, tile_shape, halo)
                    set_precomputed(self._predictor, image_embeddings, i=i, tile_id=tile_id)
                    (y0, y1), (x0, x1) = ((s.start, s.stop) for s in tile.outer)
                    crop_hw = (y1 - y0, x1 - x0)
                    points = self.point_grids[0] * np.array(crop_hw)[None, ::-1]
                    crop_list.append(self._predict_crop(points, crop_hw, lambda n: None))
                    crop_boxes.append([x0, y0, x1, y1])
                    (iy0, iy1), (ix0, ix1) = ((s.start, s.stop) for s in tile.inner)
                    owners.append([ix0, iy0, ix1, iy1])
                    update(1)
        finally:
            close()
        self._crop_list, self._crop_boxes, self._inner_boxes = crop_list, crop_boxes, owners
        self._is_initialized = True

    def get_state(self) -> Dict[str, Any]:
        """The initialized state (as the untiled generator's, plus the tiles' ``inner_boxes``)."""
        state = super().get_state()
        state["inner_boxes"] = self._inner_boxes
        return state

    def set_state(self, state: Dict[str, Any]) -> None:
        """Set a state from :meth:`get_state` (states without ``inner_boxes`` skip the ownership rule)."""
        super().set_state(state)
        inner = state.get("inner_boxes")
        self._inner_boxes = None if inner is None else [[int(v) for v in box] for box in inner]

    def clear_state(self) -> None:
        super().clear_state()
        self._inner_boxes = None

    def _deduplicate(self, crop_ids, mask_ids, boxes, overlap_thresh: float = 0.5):
        """Remove masks of the same object predicted in different tiles; returns a bool keep mask.

        Two masks from different tiles whose intersection covers more than ``overlap_thresh`` of the smaller
        one are duplicates. Of each such pair, the mask of the tile whose inner block contains its box centre
        is kept (else the earlier one, i.e. the better NMS score).
        """
        n = len(crop_ids)
        keep = np.ones(n, dtype=bool)
        if n < 2 or self._inner_boxes is None:
            return keep
        inner = np.asarray(self._inner_boxes)[crop_ids]
        cx, cy = (boxes[:, 0] + boxes[:, 2] + 1) / 2.0, (boxes[:, 1] + boxes[:, 3] + 1) / 2.0
        owned = (cx >= inner[:, 0]) & (cx < inner[:, 2]) & (cy >= inner[:, 1]) & (cy < inner[:, 3])
        # Candidate pairs: boxes that intersect and come from different tiles.
        ix = (np.minimum(boxes[:, None, 2], boxes[None, :, 2]) >= np.maximum(boxes[:, None, 0], boxes[None, :, 0]))
        iy = (np.minimum(boxes[:, None, 3], boxes[None, :, 3]) >= np.maximum(boxes[:, None, 1], boxes[None, :, 1]))
        candidates = np.triu(ix & iy & (crop_ids[:, None] != crop_ids[None, :]), k=1)
        cache = {}

        def content(k):
            if k not in cache:
                cache[k] = store.unpack_box(self.crop_list[crop_ids[k]], mask_ids[k])
            return cache[k]

        areas = np.array([self.crop_list[c]["areas"][m] for c, m in zip(crop_ids, mask_ids)])
        for a, b in zip(*np.nonzero(candidates)):
            if not (keep[a] and keep[b]) or areas[a] == 0 or areas[b] == 0:
                continue
            x0, y0 = max(boxes[a, 0], boxes[b, 0]), max(boxes[a, 1], boxes[b, 1])
            x1, y1 = min(boxes[a, 2], boxes[b, 2]), min(boxes[a, 3], boxes[b, 3])
            ma = content(a)[y0 - boxes[a, 1]:y1 - boxes[a, 1] + 1, x0 - boxes[a, 0]:x1 - boxes[a, 0] + 1]
            mb = content(b)[y0 - boxes[b, 1]:y1 - boxes[b, 1] + 1, x0 - boxes[b, 0]:x1 - boxes[b, 0] + 1]
            overlap = np.count_nonzero(ma & mb) / min(areas[a], areas[b])
            if overlap <= overlap_thresh:
                continue
            drop = b if (owned[a] or not owned[b]) else a
            keep[drop] = False
        return keep

    def generate(
        self,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        box_nms_thresh: float = 0.7,
        crop_nms_thresh: float = 0.7,
        min_mask_region_area: int = 0,
        output_mode: str = "instance_segmentation",
        with_background: bool = True,
    ):
        """Filter and merge the masks of all tiles into one label image (or records); see
        :meth:`AutomaticMaskGenerator.generate`. ``crop_nms_thresh`` is the box NMS threshold between tiles."""
        return self._generate(pred_iou_thresh, stability_score_thresh, box_nms_thresh, crop_nms_thresh,
                              min_mask_region_area, output_mode, with_background, select=self._deduplicate)


def _context(outer: Tuple[slice, slice], shape: Tuple[int, int], min_size: int = 64) -> Tuple[slice, slice]:
    """The tile's outer block grown to at least ``min_size`` pixels per axis (within the image): the block in which
    it is decided whether the tile holds anything beyond noise (a thin tile at the border holds too few pixels)."""
    out = []
    for sl, n in zip(outer, shape):
        grow = max(0, min_size - (sl.stop - sl.start))
        start = max(0, sl.start - grow // 2 - grow % 2)
        stop = min(n, max(sl.stop + grow // 2, start + min_size))
        out.append(slice(max(0, min(start, stop - min_size)), stop))
    return tuple(out)


def decoder_maps_of_tile(predictor, decoder, image, tile: _tiling.Tile, image_embeddings=None,
                         i: Optional[int] = None) -> Optional[np.ndarray]:
    """The decoder's maps of one tile's inner region, as a tiled run over the whole image computes them.

    Args:
        predictor: The ``SamPredictor``.
        decoder: The AIS decoder.
        image: The whole (Y, X[, C]) image; any array that can be sliced (numpy, zarr): only the tile's outer
            region and its surroundings (for the noise check) are read.
        tile: The tile (``micro_sam._tiling.get_tile`` on the whole image's shape).
        image_embeddings: The whole image's tiled embeddings; None computes the tile's embedding from
            ``image[tile.outer]`` (the same computation as the tiled embedding cache).
        i: Slice index of 3D tiled embeddings.

    Returns:
        (3, h, w) float32 maps (foreground, centre distances, boundary distances) of ``tile.inner``, or None
        when the tile holds no signal (constant or noise, judged on at least 64 x 64 pixels around it): no
        objects there, the decoder is not run.
    """
    from .._embeddings import encode_images
    from .._image import to_image
    from .._structure import has_signal
    from ..util import set_precomputed

    shape = tuple(int(s) for s in image.shape[:2])
    if not has_signal(np.asarray(image[_context(tile.outer, shape)])):
        return None
    if image_embeddings is None:
        encode_images(predictor, [to_image(np.asarray(image[tile.outer]))])
    else:
        set_precomputed(predictor, image_embeddings, i=i, tile_id=tile.tile_id)
    output = run_decoder(decoder, predictor.features, predictor.input_size, predictor.original_size)
    return output[(slice(None),) + tile.local]


class TiledInstanceSegmentationWithDecoder(InstanceSegmentationWithDecoder):
    """Decoder-based instance segmentation on tiled embeddings: the maps of all tiles are stitched (inner
    regions) and segmented at once, so the result is seamless. Same interface as the untiled class.

    The decoder is applied one tile at a time (its normalisation uses per-image statistics, so batching tiles
    would change the result); ``batch_size`` only affects the embedding computation.
    """

    def initialize(
        self,
        image: np.ndarray,
        image_embeddings: Optional[Dict[str, Any]] = None,
        i: Optional[int] = None,
        tile_shape: Optional[Tuple[int, int]] = None,
        halo: Optional[Tuple[int, int]] = None,
        verbose: bool = False,
        pbar_init: Optional[callable] = None,
        pbar_update: Optional[callable] = None,
        batch_size: int = 1,
        mask: Optional[np.ndarray] = None,
    ) -> None:
        """Compute (or load) the tiled embeddings and stitch the decoder's maps of all tiles.

        Args:
            image: (Y, X) or (Y, X, C) image; or a volume together with the slice index ``i``.
            image_embeddings: Precomputed tiled embeddings of this image; computed here if None.
            i: Slice index for 3D embeddings.
            tile_shape: (y, x) tile shape, needed when the embeddings are computed here.
            halo: (y, x) overlap, needed when the embeddings are computed here.
            verbose: Show progress bars.
            pbar_init: External progress bar callback ``pbar_init(total, description)``.
            pbar_update: External progress bar callback ``pbar_update(n)``.
            batch_size: Tiles per encoder pass when computing embeddings.
            mask: Optional (Y, X) mask; only tiles overlapping it are processed (others stay background).

        Tiles without contrast or with pure noise (judged on at least 64 x 64 pixels around them) stay background
        without running the decoder, as does the whole image (see the untiled class).
        """
        from .._structure import has_signal
        from ..util import handle_pbar

        image = _select_image(image, i)
        shape = tuple(int(s) for s in image.shape[:2])
        if image_embeddings is None and not has_signal(image):  # nothing to find: no embeddings either
            self._set_maps(background_maps(shape), i)
            return
        image_embeddings, tile_shape, halo, tile_ids = _process_tiled_embeddings(
            self._predictor, image, image_embeddings, tile_shape, halo, verbose, batch_size, mask, i
        )
        maps = background_maps(shape)  # outside processed tiles: background, far from any object
        _, init, update, close = handle_pbar(verbose, pbar_init, pbar_update)
        init(len(tile_ids), "Initialize tiled instance segmentation with decoder")
        try:
            for tile_id in tile_ids:
                tile = _tiling.get_tile(tile_id, shape, tile_shape, halo)
                tile_maps = decoder_maps_of_tile(self._predictor, self._decoder, image, tile, image_embeddings, i)
                if tile_maps is not None:
                    maps[(slice(None),) + tile.inner] = tile_maps
                update(1)
        finally:
            close()
        self._image_embeddings = image_embeddings
        self._set_maps(maps, i)
