"""Per-slice automatic segmentation of a volume (the first step of ``automatic_3d_segmentation``)."""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np


def segment_slices(
    volume: np.ndarray,
    predictor,
    segmentor,
    embedding_path: Optional[Union[str, os.PathLike]] = None,
    verbose: bool = True,
    tile_shape: Optional[Tuple[int, int]] = None,
    halo: Optional[Tuple[int, int]] = None,
    batch_size: int = 1,
    image_embeddings: Optional[Dict[str, Any]] = None,
    **generate_kwargs,
) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Segment each slice of a volume in 2D, with ids unique across slices.

    Args:
        volume: (Z, Y, X) or (Z, Y, X, C) volume.
        predictor: The segment_anything ``SamPredictor``.
        segmentor: An initialisable segmenter (AMG or AIS class, tiled if ``tile_shape`` is given).
        embedding_path: Zarr path to cache the 3D embeddings in.
        verbose: Show progress bars.
        tile_shape: (y, x) tile shape for tiled embeddings.
        halo: (y, x) overlap for tiled embeddings.
        batch_size: Slices (or tiles) per encoder pass.
        image_embeddings: Precomputed 3D embeddings of the volume (then ``embedding_path`` is not used).
        generate_kwargs: Arguments of ``segmentor.generate`` (``output_mode`` must stay the label image).

    Returns:
        The (Z, Y, X) uint32 segmentation (object ids of slice z follow those of slice z - 1) and the embeddings.
    """
    from .._image import infer_ndim
    from ..util import precompute_image_embeddings

    if not hasattr(volume, "shape") or infer_ndim(volume, 3) != 3:
        raise ValueError(f"Expect a volume of shape (Z, Y, X) or (Z, Y, X, C), got {getattr(volume, 'shape', None)}.")
    if generate_kwargs.get("output_mode", "instance_segmentation") != "instance_segmentation":
        raise ValueError("Per-slice segmentation needs output_mode='instance_segmentation'.")
    if image_embeddings is None:
        image_embeddings = precompute_image_embeddings(
            predictor, volume, save_path=embedding_path, ndim=3, tile_shape=tile_shape, halo=halo,
            verbose=verbose, batch_size=batch_size,
        )
    def segment_slice(z: int) -> np.ndarray:
        segmentor.initialize(volume[z], image_embeddings=image_embeddings, i=z, verbose=False)
        return segmentor.generate(**generate_kwargs)

    segmentation = stack_slice_segmentations(segment_slice, tuple(volume.shape[:3]), verbose)
    return segmentation, image_embeddings


def stack_slice_segmentations(segment_slice: Callable[[int], np.ndarray], shape: Tuple[int, int, int],
                              verbose: bool = False) -> np.ndarray:
    """Stack per-slice label images into a (Z, Y, X) uint32 volume with ids unique across slices.

    Args:
        segment_slice: ``segment_slice(z)`` returns the (Y, X) label image of slice ``z`` (0 = background).
        shape: (Z, Y, X) shape of the volume.
        verbose: Show a progress bar.

    Returns:
        The segmentation: the object ids of slice z follow those of slice z - 1.
    """
    from .._progress import track

    segmentation = np.zeros(shape, dtype="uint32")
    offset = 0
    for z in track(range(shape[0]), "Segment slices", verbose=verbose):
        seg = np.asarray(segment_slice(z))
        n = int(seg.max())
        if n == 0:
            continue
        segmentation[z] = np.where(seg != 0, seg.astype("uint32") + offset, 0)
        offset += n
    return segmentation
