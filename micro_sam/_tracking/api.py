"""The public tracking functions; exported by :mod:`micro_sam.multi_dimensional_segmentation`."""
from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from .backends import OVERLAP_MODEL, resolve_linker
from .graph import graph_to_result
from .linker import OverlapLinker

TrackingModel = Union[str, os.PathLike, OverlapLinker]


def _validate_segmentation(segmentation) -> np.ndarray:
    from ..multi_dimensional_segmentation import _validate_label_stack

    segmentation = _validate_label_stack(segmentation, "segmentation")
    if segmentation.dtype == np.uint64 and segmentation.size and segmentation.max() > np.iinfo("int64").max:
        raise ValueError("segmentation labels must be below 2**63.")
    return segmentation


def _validate_timeseries(timeseries, n_frames_needed: int = 2) -> Tuple[int, ...]:
    """Shape check of a (T, Y, X) or (T, Y, X, C) time series (without loading it); returns (T, Y, X)."""
    shape = tuple(getattr(timeseries, "shape", ()))
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] > 4):
        raise ValueError(f"timeseries must have the shape (T, Y, X) or (T, Y, X, C) with up to 4 channels, got "
                         f"{shape if shape else type(timeseries).__name__}.")
    if shape[0] < n_frames_needed:
        raise ValueError(f"Tracking needs a time series with at least {n_frames_needed} frames, got {shape[0]} "
                         f"(shape {shape}); segment a single image with automatic_instance_segmentation.")
    return shape[:3]


def _validate_extent(value, name: str) -> Optional[int]:
    from ..multi_dimensional_segmentation import _validate_optional_int

    return _validate_optional_int(value, name)


def _check_output_folder(output_folder) -> None:
    if output_folder is not None and os.path.exists(output_folder) and not os.path.isdir(output_folder):
        raise ValueError(f"output_folder {os.fspath(output_folder)!r} exists and is not a folder.")


def _track(timeseries, segmentation, description, link, gap_closing, min_time_extent, verbose, pbar_init,
           pbar_update, output_folder):
    from ..multi_dimensional_segmentation import _close_gaps
    from ..util import handle_pbar

    _, pbar_init, pbar_update, pbar_close = handle_pbar(verbose, pbar_init, pbar_update)
    n_frames = segmentation.shape[0]
    steps = n_frames if description == "overlap" else 1
    pbar_init(steps + (n_frames if gap_closing else 0), "Track objects")
    if gap_closing:
        segmentation = _close_gaps(segmentation, gap_closing, pbar_update)
    if not segmentation.any():
        warnings.warn("The segmentation contains no objects: the tracking result is empty.", stacklevel=3)
    graph = link(timeseries, segmentation, pbar_update, verbose)
    result, lineages = graph_to_result(segmentation, graph, min_time_extent or 0)
    if output_folder is not None:
        from .ctc import write_ctc

        write_ctc(output_folder, result, lineages)
    pbar_close()
    return result, lineages


def track_across_frames(
    timeseries: np.ndarray,
    segmentation: np.ndarray,
    gap_closing: Optional[int] = None,
    min_time_extent: Optional[int] = None,
    mode: str = "greedy",
    tracking_model: TrackingModel = "general_2d",
    verbose: bool = True,
    pbar_init: Optional[Callable] = None,
    pbar_update: Optional[Callable] = None,
    output_folder: Optional[Union[str, os.PathLike]] = None,
) -> Tuple[np.ndarray, List[Dict[int, List[int]]]]:
    """Link the objects of a segmented time series into tracks, with divisions (automatic tracking).

    Two linkers are available:

    - **trackastra** (Gallusser and Weigert, ECCV 2024; please cite it when you use it), a transformer trained on
      many time-lapse datasets, used when the optional package ``trackastra`` is installed: ``tracking_model`` is
      one of its pretrained models (downloaded on first use into trackastra's cache) or a local model folder.
    - **the overlap linker** of micro_sam (:class:`OverlapLinker`, ``tracking_model="overlap"``), which needs no
      weights: optimal frame-to-frame assignment by overlap and distance, divisions and gap closing.

    With a pretrained name (the default), the overlap linker is used instead, with a warning, when trackastra is
    not installed or the model is neither cached nor downloadable (no network).

    Args:
        timeseries: The images, shape (T, Y, X) or (T, Y, X, C); only trackastra looks at them.
        segmentation: The per-frame instance segmentation, shape (T, Y, X), non-negative integer labels; ids need
            to be unique within a frame only (any values, not necessarily consecutive). Not modified.
        gap_closing: If given, objects missing in up to ``2 * gap_closing`` frames are filled in before linking
            (a binary closing along time, as in micro_sam 1.8; the filled masks are part of the result).
        min_time_extent: If given, tracks without daughters that span fewer frames are removed (repeatedly; a
            mother left with one daughter continues into it), e.g. short false detections.
        mode: The linking mode: 'greedy' (with divisions), 'greedy_nodiv' (without) or 'ilp' (trackastra's
            integer linear program, needs motile). The overlap linker is solved optimally per frame pair in any
            mode; 'greedy_nodiv' switches its divisions off.
        tracking_model: A trackastra pretrained model ('general_2d', 'ctc', ...), the path of a trackastra model
            folder, 'overlap', or an :class:`OverlapLinker` with custom settings.
        verbose: Whether to show progress.
        pbar_init: Callback to initialise an external progress bar, called with (total, description).
        pbar_update: Callback to update an external progress bar, called with the number of steps done.
        output_folder: If given, the result is also written there in the Cell Tracking Challenge format
            (``man_track.txt`` and ``man_track0000.tif``, ...; see :mod:`micro_sam._tracking.ctc`).

    Returns:
        The tracking result, shape (T, Y, X), uint32: every object labelled with its track id (consecutive from 1,
            ordered by first frame, then label); a track keeps its id across closed gaps.
        The lineages: a list with one dict per lineage (ordered by root track) mapping each of its track ids to the
            ids of its daughter tracks (two after a division, none otherwise).

    Raises:
        ValueError: For a segmentation that is not a non-negative integer (T, Y, X) array, fewer than two frames,
            a time series of another length or frame shape, an invalid mode, gap_closing or min_time_extent, or an
            unknown tracking model (a name trackastra does not know, or a folder that is no trackastra model).
        RuntimeError: If a model folder is given but trackastra is not installed, or a model fails to load.
    """
    segmentation = _validate_segmentation(segmentation)
    shape = _validate_timeseries(timeseries)
    if shape != segmentation.shape:
        raise ValueError(f"timeseries (shape {tuple(timeseries.shape)}) and segmentation (shape "
                         f"{segmentation.shape}) must have the same number of frames and frame shape (T, Y, X).")
    gap_closing = _validate_extent(gap_closing, "gap_closing")
    min_time_extent = _validate_extent(min_time_extent, "min_time_extent")
    _check_output_folder(output_folder)
    if pbar_init is not None and pbar_update is None:
        raise ValueError("pbar_init was given without pbar_update; pass both callbacks or neither.")
    description, link = resolve_linker(tracking_model, mode)
    return _track(np.asarray(timeseries), segmentation, description, link, gap_closing, min_time_extent, verbose,
                  pbar_init, pbar_update, output_folder)


def automatic_tracking_implementation(
    timeseries: np.ndarray,
    predictor,
    segmentor,
    embedding_path: Optional[Union[str, os.PathLike]] = None,
    gap_closing: Optional[int] = None,
    min_time_extent: Optional[int] = None,
    mode: str = "greedy",
    tracking_model: TrackingModel = "general_2d",
    tile_shape: Optional[Tuple[int, int]] = None,
    halo: Optional[Tuple[int, int]] = None,
    verbose: bool = True,
    return_embeddings: bool = False,
    batch_size: int = 1,
    output_folder: Optional[Union[str, os.PathLike]] = None,
    **kwargs,
):
    """Segment every frame of a time series automatically, then link the objects over time.

    The image embeddings of all frames are computed once (batched) and cached in one zarr file when
    ``embedding_path`` is given (the (t, y, x) layout of :func:`micro_sam.util.precompute_image_embeddings` with
    ``ndim=3``); the frames are segmented with ``segmentor`` (AIS, APG or AMG) and linked with
    :func:`track_across_frames`. The tracking model is checked (and a trackastra model loaded, or the fallback to
    the overlap linker decided) before the embeddings are computed.

    Args:
        timeseries: The images, shape (T, Y, X) or (T, Y, X, C), at least two frames.
        predictor: The Segment Anything predictor.
        segmentor: The automatic segmentation class (from
            :func:`micro_sam.automatic_segmentation.get_predictor_and_segmenter`; tiled with ``tile_shape``).
        embedding_path: A zarr path to cache the embeddings in (reused when it holds the same frames).
        gap_closing: See :func:`track_across_frames`.
        min_time_extent: See :func:`track_across_frames`.
        mode: See :func:`track_across_frames`.
        tracking_model: See :func:`track_across_frames`.
        tile_shape: (y, x) tile shape for tiled embeddings and segmentation.
        halo: (y, x) overlap of the tiles.
        verbose: Whether to show progress.
        return_embeddings: Whether to also return the image embeddings.
        batch_size: Frames (or tiles) per image encoder pass.
        output_folder: If given, the result is also written there in the Cell Tracking Challenge format.
        kwargs: Arguments of the segmentor's ``generate`` (e.g. ``min_size``).

    Returns:
        The tracking result, shape (T, Y, X), uint32, labelled by track id.
        The lineages (see :func:`track_across_frames`).
        The image embeddings, only if ``return_embeddings`` is True.

    Raises:
        ValueError: As :func:`track_across_frames`, before any embedding is computed.
    """
    from ..instance_segmentation._volume import segment_slices

    _validate_timeseries(timeseries)
    gap_closing = _validate_extent(gap_closing, "gap_closing")
    min_time_extent = _validate_extent(min_time_extent, "min_time_extent")
    _check_output_folder(output_folder)
    description, link = resolve_linker(tracking_model, mode)
    segmentation, image_embeddings = segment_slices(
        timeseries, predictor, segmentor, embedding_path=embedding_path, verbose=verbose, tile_shape=tile_shape,
        halo=halo, batch_size=batch_size, **kwargs,
    )
    result, lineages = _track(np.asarray(timeseries), segmentation, description, link, gap_closing,
                              min_time_extent, verbose, None, None, output_folder)
    return (result, lineages, image_embeddings) if return_embeddings else (result, lineages)


def get_napari_track_data(
    segmentation: np.ndarray, lineages: List[Dict[int, List[int]]], n_threads: Optional[int] = None,
) -> Tuple[np.ndarray, Dict[int, List[int]]]:
    """Convert a tracking result into the data of napari's tracks layer.

    Args:
        segmentation: The tracking result, shape (T, Y, X): every object labelled with its track id.
        lineages: The lineages: a list of dicts (or one dict) mapping a track id to its daughter track ids.
        n_threads: Unused (the computation is vectorised); kept for compatibility with micro_sam.

    Returns:
        The track data, shape (n_points, 4): one row (track_id, t, y, x) per track and frame, with the centroid of
            the object in that frame, sorted by frame and then track id.
        The parent graph in napari's convention: daughter track id -> [mother track id].
    """
    from .graph import frame_objects, parents_from_lineages

    segmentation = _validate_segmentation(segmentation)
    rows = []
    for t in range(segmentation.shape[0]):
        objects = frame_objects(segmentation[t])
        if len(objects.labels):
            rows.append(np.column_stack([objects.labels.astype("float64"), np.full(len(objects.labels), float(t)),
                                         objects.centroids]))
    track_data = np.concatenate(rows) if rows else np.zeros((0, 4))
    parent_graph = {child: [parent] for child, parent in sorted(parents_from_lineages(lineages).items())}
    return track_data, parent_graph


__all__ = ["OVERLAP_MODEL", "OverlapLinker", "automatic_tracking_implementation", "get_napari_track_data",
           "track_across_frames"]
