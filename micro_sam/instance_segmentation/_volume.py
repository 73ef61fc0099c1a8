"""Per-slice automatic segmentation of a volume (the first step of ``automatic_3d_segmentation``)."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple, Union

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
    from tqdm import tqdm

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
    segmentation = np.zeros(tuple(volume.shape[:3]), dtype="uint32")
    offset = 0
    for z in tqdm(range(segmentation.shape[0]), desc="Segment slices", disable=not verbose):
        segmentor.initialize(volume[z], image_embeddings=image_embeddings, i=z, verbose=False)
        seg = np.asarray(segmentor.generate(**generate_kwargs))
        n = int(seg.max())
        if n == 0:
            continue
        segmentation[z] = np.where(seg != 0, seg.astype("uint32") + offset, 0)
        offset += n
    return segmentation, image_embeddings


def automatic_3d_segmentation(
    volume: np.ndarray,
    predictor,
    segmentor,
    embedding_path: Optional[Union[str, os.PathLike]] = None,
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
    """Segment a volume: every slice in 2D (:func:`segment_slices`), then objects merged across slices with
    ``multi_dimensional_segmentation.merge_instance_segmentation_3d`` (micro_sam 1.8's signature; this is the
    implementation behind ``micro_sam.multi_dimensional_segmentation.automatic_3d_segmentation``).

    Args:
        volume: (Z, Y, X) or (Z, Y, X, C) volume.
        predictor: The segment_anything ``SamPredictor``.
        segmentor: The segmenter (AMG or AIS class; tiled with ``tile_shape``).
        embedding_path: Zarr path to cache the embeddings in.
        with_background: Whether the data has background (passed to the merge).
        gap_closing: Close gaps of up to this many slices in objects (binary closing along z).
        min_z_extent: Remove objects spanning fewer slices.
        tile_shape: (y, x) tile shape for tiled embeddings.
        halo: (y, x) overlap for tiled embeddings.
        verbose: Show progress bars.
        return_embeddings: Also return the embeddings.
        batch_size: Slices (or tiles) per encoder pass.
        kwargs: Arguments of ``segmentor.generate``.

    Returns:
        The (Z, Y, X) uint32 segmentation (and the embeddings if requested).
    """
    from ..multi_dimensional_segmentation import merge_instance_segmentation_3d

    segmentation, image_embeddings = segment_slices(
        volume, predictor, segmentor, embedding_path=embedding_path, verbose=verbose, tile_shape=tile_shape,
        halo=halo, batch_size=batch_size, **kwargs,
    )
    segmentation = merge_instance_segmentation_3d(
        segmentation, beta=0.5, with_background=with_background, gap_closing=gap_closing,
        min_z_extent=min_z_extent, verbose=verbose,
    )
    return (segmentation, image_embeddings) if return_embeddings else segmentation
