"""Automatic segmentation of many images on a dask cluster: one label image per input.

Each worker loads the model once and segments one image per task; results are written under a temporary name
and renamed when complete, so that a rerun (after an interruption, or with more inputs) only segments the
inputs whose label image is missing. A small manifest in the output folder records the settings: a folder
holding results of other settings, or other files, is refused.
"""
from __future__ import annotations

import json
import os
from glob import glob, has_magic
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .. import util
from ._cluster import client_or_none, get_client
from ._run import make_spec, run_tasks, validate_generate_kwargs
from ._worker import segment_file

__all__ = ["segment_images"]

_MANIFEST = ".micro_sam_batch.json"
PathLike = Union[str, os.PathLike]


def collect_inputs(inputs: Union[PathLike, Sequence[PathLike]], pattern: Optional[str] = None) -> List[str]:
    """Expand files, folders (all images in them, or those matching ``pattern``) and glob patterns to files.

    Raises:
        ValueError: A path that does not exist, a pattern or folder without images, or no inputs at all.
    """
    from ..automatic_segmentation import _collect_inputs

    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    paths = []
    for entry in map(os.fspath, inputs):
        if not os.path.exists(entry) and has_magic(entry):
            found = sorted(glob(entry))
            if not found:
                raise ValueError(f"No input images match {entry!r}.")
            paths.extend(found)
        else:
            paths.extend(_collect_inputs([entry], pattern))
    if not paths:
        raise ValueError("No input images were given.")
    return [os.path.abspath(p) for p in paths]


def _plan(inputs: List[str], output_folder: str) -> List[Tuple[str, str]]:
    names = [Path(p.rstrip("/")).stem for p in inputs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Several inputs have the same name {duplicates}; their outputs would collide.")
    return [(path, os.path.join(output_folder, f"{name}.tif")) for path, name in zip(inputs, names)]


def _check_output_folder(output_folder: str, manifest: Dict[str, Any], overwrite: bool) -> None:
    if os.path.exists(output_folder) and not os.path.isdir(output_folder):
        raise ValueError(f"The output path {output_folder!r} exists and is not a folder.")
    if not os.path.isdir(output_folder):
        return
    path = os.path.join(output_folder, _MANIFEST)
    entries = [n for n in os.listdir(output_folder) if not n.startswith(".")]
    if not os.path.exists(path):
        if entries:
            raise ValueError(f"The output folder {output_folder!r} holds files that micro_sam.distributed did not "
                             f"write ({', '.join(sorted(entries)[:3])}, ...); choose an empty or new folder.")
        return
    with open(path) as f:
        recorded = json.load(f)
    if recorded != manifest and not overwrite:
        changed = sorted(k for k in set(manifest) | set(recorded) if manifest.get(k) != recorded.get(k))
        raise ValueError(f"The output folder {output_folder!r} holds results of other settings (differing: "
                         f"{', '.join(changed)}); pass overwrite=True (--overwrite) to recompute all, or choose "
                         "another folder.")


def _write_manifest(output_folder: str, manifest: Dict[str, Any]) -> None:
    os.makedirs(output_folder, exist_ok=True)
    path = os.path.join(output_folder, _MANIFEST)
    tmp = f"{path}.{os.getpid()}.partial"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, path)


def segment_images(
    inputs: Union[PathLike, Sequence[PathLike]],
    output_folder: PathLike,
    model_type: str = util._DEFAULT_MODEL,
    checkpoint: Optional[PathLike] = None,
    segmentation_mode: Optional[str] = None,
    pattern: Optional[str] = None,
    key: Optional[str] = None,
    ndim: Optional[int] = None,
    tile_shape: Optional[Tuple[int, int]] = None,
    halo: Optional[Tuple[int, int]] = None,
    scheduler=None,
    n_workers: Optional[int] = None,
    device: Optional[str] = None,
    retries: int = 2,
    overwrite: bool = False,
    verbose: bool = True,
    segmenter_kwargs: Optional[Dict[str, Any]] = None,
    segmenter_factory: Optional[Callable] = None,
    **generate_kwargs,
) -> List[str]:
    """Segment many images (or volumes) on a dask cluster, writing ``<output_folder>/<input name>.tif`` each.

    Args:
        inputs: Image files, folders (all images in them, or those matching ``pattern``) or glob patterns
            ("plate/*.tif"). Workers must be able to read these paths.
        output_folder: Folder for the label images (zlib-compressed uint32 tif, one per input); workers write
            into it. Existing label images of the same settings are kept and not recomputed.
        model_type: A registered model name or, with ``checkpoint``, the architecture.
        checkpoint: A checkpoint file that every worker can read.
        segmentation_mode: "ais", "apg", "amg" or None (AIS if the model has a decoder, else AMG).
        pattern: Glob pattern for the files in input folders, e.g. "*.tif".
        key: Dataset key for container inputs (zarr, n5, hdf5).
        ndim: 2 or 3; None infers it per input.
        tile_shape: (y, x) tiles for large images; None segments each image at once.
        halo: (y, x) overlap of the tiles.
        scheduler: None (a ``LocalCluster`` on 127.0.0.1), a scheduler address ("tcp://host:8786") or a
            ``distributed.Client``.
        n_workers: Worker processes of the local cluster (ignored with ``scheduler``).
        device: The workers' torch device (None: the best on each worker).
        retries: How often a failed task is retried (tasks of a worker that died are rerun in any case).
        overwrite: Recompute all outputs, also existing ones (and accept a folder of other settings).
        verbose: Print the dashboard link and show a progress bar.
        segmenter_kwargs: Arguments of the segmenter class (e.g. ``points_per_side`` for AMG).
        segmenter_factory: A picklable ``factory(is_tiled) -> (predictor, segmenter)`` for your own model (then
            ``model_type`` / ``checkpoint`` are not used); called once per worker.
        generate_kwargs: Arguments of the segmenter's ``generate`` (and, for volumes, of the 3D merge).

    Returns:
        The output paths, in the order of the inputs.

    Raises:
        ValueError: Missing inputs, colliding names, invalid arguments, an output folder with other content or
            settings, a scheduler that does not answer: all before any work is sent to the cluster.
        RuntimeError: Inputs that failed on the workers (after ``retries``); the other outputs are written.
    """
    inputs = collect_inputs(inputs, pattern)
    output_folder = os.path.abspath(os.fspath(output_folder))
    plan = _plan(inputs, output_folder)
    spec = make_spec(model_type, checkpoint, device, segmentation_mode, tile_shape, halo, segmenter_kwargs,
                     segmenter_factory)
    if ndim not in (None, 2, 3):
        raise ValueError(f"ndim must be 2, 3 or None, got {ndim}.")
    validate_generate_kwargs(spec, generate_kwargs, 3 if ndim in (None, 3) else 2)
    tile_shape = None if tile_shape is None else tuple(int(t) for t in tile_shape)
    halo = None if halo is None else tuple(int(h) for h in halo)
    manifest = json.loads(json.dumps({
        "model": spec.describe(), "key": key, "ndim": ndim, "tile_shape": tile_shape, "halo": halo,
        "generate_kwargs": generate_kwargs,
    }, default=str))
    scheduler = client_or_none(scheduler)
    _check_output_folder(output_folder, manifest, overwrite)

    todo = [(path, out) for path, out in plan if overwrite or not os.path.exists(out)]
    if verbose and len(todo) < len(plan):
        print(f"{len(plan) - len(todo)} of {len(plan)} label images exist already; segmenting the other "
              f"{len(todo)}.")
    _write_manifest(output_folder, manifest)
    if todo:
        generate_items = tuple(sorted(generate_kwargs.items()))
        with get_client(scheduler, n_workers, verbose=verbose) as client:
            run_tasks(client, segment_file, [(spec, path, key, out, ndim, tile_shape, halo, generate_items)
                                             for path, out in todo], "Segment images", retries, verbose)
    return [out for _, out in plan]
