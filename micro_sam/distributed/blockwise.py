"""Automatic segmentation of one image or volume larger than memory, block by block on a dask cluster.

The input (zarr, OME-Zarr, n5, tif, hdf5) is cut into blocks; each worker reads one block with a halo,
segments it (embeddings and AIS / AMG, with the model it loaded once) and writes the block's labels into a zarr
array. Tiled AIS (2D, or per slice of a volume) first writes the decoder maps of the whole image's tiles (each
block computing the tiles over its inner region) and then segments each block from the maps of its outer region,
so that neighbouring blocks see the same maps where they overlap. Then the objects that cross block faces are
matched by their overlap in the halo strips and relabelled globally (``micro_sam.distributed._stitching``), and
each block's final labels are written.

The output is a zarr group: the labels in ``output_key`` (uint32, chunked like the blocks, 1..N) and, while the
run is not complete, a work group with per-block markers. An interrupted run (client stopped, cluster lost)
resumes where it stopped when called again with the same arguments; a complete output is returned as it is.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from .. import util
from ._cluster import client_or_none, get_client
from ._run import make_spec, run_tasks, validate_generate_kwargs
from ._worker import (
    Blocking, compute_block_maps, ensure_block_arrays, match_face, read_markers, relabel_block, segment_block,
    uses_decoder_maps,
)

__all__ = ["segment_blockwise", "DEFAULT_BLOCK_SHAPE", "DEFAULT_BLOCK_HALO"]

#: Default block shape and halo for images (Y, X) and volumes (Z, Y, X).
DEFAULT_BLOCK_SHAPE = {2: (1024, 1024), 3: (32, 512, 512)}
DEFAULT_BLOCK_HALO = {2: (128, 128), 3: (4, 64, 64)}

_WORK = "_micro_sam_blockwise"
_ATTRIBUTE = "micro_sam_blockwise"


def _validate_blocking(shape: Tuple[int, ...], block_shape, block_halo) -> Blocking:
    ndim = len(shape)
    block_shape = DEFAULT_BLOCK_SHAPE[ndim] if block_shape is None else block_shape
    block_halo = DEFAULT_BLOCK_HALO[ndim] if block_halo is None else block_halo
    block_shape = tuple(int(b) for b in np.atleast_1d(block_shape))
    block_halo = tuple(int(h) for h in np.atleast_1d(block_halo))
    if len(block_shape) != ndim or len(block_halo) != ndim:
        raise ValueError(f"block_shape {block_shape} and block_halo {block_halo} need {ndim} values for an input "
                         f"with spatial shape {shape}.")
    if any(b < 1 for b in block_shape) or any(h < 0 for h in block_halo):
        raise ValueError(f"block_shape must be positive and block_halo non-negative, got {block_shape} and "
                         f"{block_halo}.")
    if any(b < h for b, h in zip(block_shape, block_halo)):
        raise ValueError(f"block_shape {block_shape} is smaller than the block_halo {block_halo}; each block must be "
                         "at least as large as the halo (the halo is the overlap seen by the neighbouring block).")
    block_shape = tuple(min(b, s) for b, s in zip(block_shape, shape))
    split = [axis for axis in range(ndim) if int(np.ceil(shape[axis] / block_shape[axis])) > 1]
    if any(block_halo[axis] < 1 for axis in split):
        raise ValueError(f"block_halo {block_halo} must be at least 1 along the axes cut into several blocks "
                         f"({split}); without an overlap, objects crossing the blocks cannot be matched.")
    return Blocking(tuple(shape), block_shape, block_halo)


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def _check_output(output_path: str, output_key: str, parameters: Dict[str, Any], overwrite: bool) -> str:
    """"new", "resume" or "complete"; removes an earlier micro_sam output with other parameters if overwrite."""
    if not os.path.exists(output_path):
        return "new"
    recorded = None
    if os.path.isdir(output_path):
        import zarr

        try:
            recorded = zarr.open_group(output_path, mode="r").attrs.get(_ATTRIBUTE)
        except Exception:  # noqa: BLE001  (not a zarr group)
            recorded = None
    if recorded is None:
        raise ValueError(f"The output path {output_path!r} exists and is not a blockwise micro_sam segmentation; "
                         "choose a new output path (existing data is never overwritten).")
    if recorded.get("parameters") == parameters:
        return "complete" if recorded.get("complete") else "resume"
    if not overwrite:
        changed = sorted(k for k in set(parameters) | set(recorded.get("parameters", {}))
                         if parameters.get(k) != recorded.get("parameters", {}).get(k))
        raise ValueError(f"The output {output_path!r} holds a blockwise segmentation with other settings "
                         f"(differing: {', '.join(changed)}); pass overwrite=True (--overwrite) to replace it, or "
                         "choose another output path.")
    shutil.rmtree(output_path)
    return "new"


def segment_blockwise(
    input_path: Union[str, os.PathLike],
    output_path: Union[str, os.PathLike],
    key: Optional[str] = None,
    output_key: str = "segmentation",
    model_type: str = util._DEFAULT_MODEL,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    segmentation_mode: Optional[str] = None,
    ndim: Optional[int] = None,
    block_shape: Optional[Sequence[int]] = None,
    block_halo: Optional[Sequence[int]] = None,
    tile_shape: Optional[Tuple[int, int]] = None,
    halo: Optional[Tuple[int, int]] = None,
    iou_threshold: float = 0.5,
    scheduler=None,
    n_workers: Optional[int] = None,
    device: Optional[str] = None,
    retries: int = 2,
    overwrite: bool = False,
    keep_intermediates: bool = False,
    verbose: bool = True,
    segmenter_kwargs: Optional[Dict[str, Any]] = None,
    segmenter_factory: Optional[Callable] = None,
    **generate_kwargs,
):
    """Segment a large image or volume blockwise on a dask cluster and stitch the blocks into one label image.

    Args:
        input_path: The input: a zarr / OME-Zarr / n5 container, a tif file or an hdf5 file, (Y, X[, C]) or
            (Z, Y, X[, C]). It is read lazily, one block per task; workers must be able to read the path.
        output_path: A zarr group to write; workers must be able to write to it (shared file system).
        key: The array inside the input container (optional for zarr arrays, OME-Zarr images and tif files).
        output_key: Name of the label array in the output group.
        model_type: A registered model name or, with ``checkpoint``, the architecture.
        checkpoint: A checkpoint file that every worker can read.
        segmentation_mode: "ais", "apg", "amg" or None (AIS if the model has a decoder, else AMG).
        ndim: 2 or 3; None infers it from the shape ((Y, X, 3) is an RGB image).
        block_shape: Block shape ((Y, X) or (Z, Y, X)); default 1024 x 1024 or 32 x 512 x 512. A block is
            segmented as one image (or volume), with ``tile_shape`` in tiles.
        block_halo: The overlap each block sees of its neighbours (default 128 x 128 or 4 x 64 x 64); it must be
            larger than the part of an object that one block needs to see to recognise it.
        tile_shape: Tiles for the segmentation (e.g. (512, 512)); None segments each block (slice) at once.
            With AIS, the tiles are laid out on the whole image (on every slice of a volume), as a
            single-process tiled run does, and their decoder maps written first (12 bytes per pixel while the
            run lasts); each block is then segmented from the maps of its outer region, so that neighbouring
            blocks agree and blockwise and single-process tiled results match. With AMG each block is an image
            of its own, tiled within.
        halo: The overlap of these tiles (with ``tile_shape``).
        iou_threshold: Objects of two blocks are one object if their pixels in the strips along the face overlap
            with at least this intersection over union.
        scheduler: None (a ``LocalCluster`` on 127.0.0.1), a scheduler address ("tcp://host:8786") or a
            ``distributed.Client``.
        n_workers: Worker processes of the local cluster (ignored with ``scheduler``).
        device: The workers' torch device (None: the best on each worker).
        retries: How often a failed task is retried (tasks of a worker that died are rerun in any case).
        overwrite: Replace an existing output written with other settings (only micro_sam outputs are removed).
        keep_intermediates: Keep the work group (local labels, skirts, markers) after completion.
        verbose: Print the dashboard link and show progress bars.
        segmenter_kwargs: Arguments of the segmenter class (e.g. ``points_per_side`` for AMG).
        segmenter_factory: A picklable ``factory(is_tiled) -> (predictor, segmenter)`` for your own model (then
            ``model_type`` / ``checkpoint`` are not used); called once per worker.
        generate_kwargs: Arguments of the segmenter's ``generate`` (e.g. ``center_distance_threshold``) and, for
            volumes, of the 3D merge (``gap_closing``, ``min_z_extent``).

    Returns:
        The label array (zarr, read-only): uint32, the input's spatial shape, ids 1..N.

    Raises:
        ValueError: Unreadable input, an input that is neither 2D nor 3D, invalid blocks (a block smaller than
            its halo), an output path holding other data, a scheduler that does not answer: all before any work
            is sent to the cluster.
        RuntimeError: Blocks that failed on the workers (after ``retries``); finished blocks are kept.
    """
    import zarr

    from ._io import open_input

    input_path, output_path = os.path.abspath(os.fspath(input_path)), os.path.abspath(os.fspath(output_path))
    data = open_input(input_path, key)
    ndim = _spatial_ndim(data, ndim)
    shape = tuple(int(s) for s in data.shape[:ndim])
    blocking = _validate_blocking(shape, block_shape, block_halo)
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}.")
    if output_key.startswith(_WORK) or "/" in output_key or not output_key:
        raise ValueError(f"Invalid output_key {output_key!r}.")
    spec = make_spec(model_type, checkpoint, device, segmentation_mode, tile_shape, halo, segmenter_kwargs,
                     segmenter_factory)
    validate_generate_kwargs(spec, generate_kwargs, ndim)
    tile_shape = None if tile_shape is None else tuple(int(t) for t in tile_shape)
    halo = None if halo is None else tuple(int(h) for h in halo)
    if tile_shape is not None:
        from .._tiling import validate_tiling

        outer = tuple(min(b + 2 * h, s) for b, h, s in zip(blocking.block_shape, blocking.halo, shape))[-2:]
        validate_tiling(tuple(max(o, t) for o, t in zip(outer, tile_shape)), tile_shape, halo)
    parameters = _jsonable({
        "input_path": input_path, "key": key, "input_shape": list(data.shape), "input_dtype": str(data.dtype),
        "ndim": ndim, "block_shape": blocking.block_shape, "block_halo": blocking.halo, "tile_shape": tile_shape,
        "halo": halo, "iou_threshold": iou_threshold, "model": spec.describe(), "generate_kwargs": generate_kwargs,
        "output_key": output_key,
    })
    scheduler = client_or_none(scheduler)
    state = _check_output(output_path, output_key, parameters, overwrite)
    if state == "complete":
        if verbose:
            print(f"The blockwise segmentation {output_path!r} is complete already; nothing to do.")
        return zarr.open_array(os.path.join(output_path, output_key), mode="r")

    generate_items = tuple(sorted(generate_kwargs.items()))
    with get_client(scheduler, n_workers, verbose=verbose) as client:
        # Tiled AIS (2D, or per slice of a volume): the decoder maps are computed on the whole image's tile grid
        # first (as a single-process tiled run computes them), then each block runs the watershed (and the 3D
        # merge) on the maps of its outer region; the blocks agree on their overlap, so objects crossing a face
        # are cut the same way on both sides.
        from_maps = tile_shape is not None and bool(
            client.submit(uses_decoder_maps, spec, pure=False, retries=retries).result())
        ensure_block_arrays(output_path, _WORK, output_key, blocking,
                            {_ATTRIBUTE: {"parameters": parameters, "complete": False}}, with_maps=from_maps)
        todo = [b for b, n in enumerate(read_markers(output_path, _WORK, "n_objects")) if n < 0]
        if verbose and len(todo) < blocking.n_blocks:
            print(f"Resuming: {blocking.n_blocks - len(todo)} of {blocking.n_blocks} blocks are segmented already.")
        if from_maps and todo:  # 1a. The maps of the blocks that have none yet.
            missing = [b for b, done in enumerate(read_markers(output_path, _WORK, "maps_done")) if not done]
            run_tasks(client, compute_block_maps, [
                (spec, input_path, key, blocking, output_path, _WORK, b, tile_shape, halo) for b in missing],
                f"Decoder maps of the tiles ({blocking.n_blocks} blocks)", retries, verbose)
        # 1. Segment the blocks that have no object count yet.
        run_tasks(client, segment_block, [
            (spec, input_path, key, ndim, blocking, output_path, _WORK, b, tile_shape, halo, generate_items,
             from_maps) for b in todo], f"Segment blocks ({blocking.n_blocks} in all)", retries, verbose)
        # 2. Match objects across the faces, relabel globally.
        from ._stitching import block_faces, merge_labels

        n_objects = read_markers(output_path, _WORK, "n_objects")
        faces = block_faces(shape, blocking.block_shape)
        matches = run_tasks(client, match_face, [(output_path, _WORK, blocking, lower, upper, axis, iou_threshold)
                                                 for lower, upper, axis in faces],
                            "Match objects across block faces", retries, verbose)
        luts = merge_labels(n_objects, matches)
        # 3. Write the final labels of the blocks not written yet.
        todo = [b for b, done in enumerate(read_markers(output_path, _WORK, "relabelled")) if not done]
        run_tasks(client, relabel_block, [(output_path, _WORK, output_key, blocking, b, luts[b]) for b in todo],
                  "Write the stitched labels", retries, verbose)

    root = zarr.open_group(output_path, mode="a")
    if not keep_intermediates:
        shutil.rmtree(os.path.join(output_path, _WORK), ignore_errors=True)
    root.attrs[_ATTRIBUTE] = {"parameters": parameters, "complete": True,
                              "n_objects": int(max((int(lut.max()) for lut in luts if len(lut)), default=0))}
    if verbose:
        print(f"{root.attrs[_ATTRIBUTE]['n_objects']} objects written to {output_path!r} (array {output_key!r}).")
    return zarr.open_array(os.path.join(output_path, output_key), mode="r")


def _spatial_ndim(data, ndim: Optional[int]) -> int:
    from .._image import infer_ndim

    shape = tuple(data.shape)
    if len(shape) < 2 or len(shape) > 4:
        raise ValueError(f"The input has shape {shape}; expect a 2D image (Y, X[, C]) or a 3D volume (Z, Y, X[, C]).")
    return infer_ndim(data, ndim)
