"""Precompute image embeddings, and optionally the automatic segmentation state, for images on disk.

The embeddings go to a zarr cache in micro_sam's layout (see ``util.precompute_image_embeddings``). The state
of the automatic segmentation (what ``initialize`` of AMG / AIS computes) is stored inside the same zarr
group: ``amg_state/state`` (or ``amg_state/state-<i>`` per slice) for AMG and ``is_state/state`` (or
``is_state/state-<i>``) for AIS, as plain arrays (no pickles), so it loads without running any code from the
file. Command line: ``micro_sam.precompute_embeddings`` (see ``--help``).
"""
from __future__ import annotations

import os
import sys
from glob import glob
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

import numpy as np

from . import util

if TYPE_CHECKING:  # imports torch: imported where used, so that --help is fast
    from . import instance_segmentation

__all__ = ["cache_amg_state", "cache_is_state", "precompute_state", "main"]

_TABLE_KEYS = ("iou_preds", "stability_score", "boxes", "points", "areas", "mask_bits", "mask_offsets")


def _state_group(save_path, name: str, i: Optional[int], mode: str = "a"):
    """The zarr group for a cached state (None if it does not exist and ``mode`` is "r")."""
    import zarr

    save_path = os.fspath(save_path)
    if mode == "r" and not os.path.exists(save_path):
        return None
    root = zarr.open_group(save_path, mode="a")
    key = "state" if i is None else f"state-{int(i)}"
    if mode == "r":
        if name not in root or key not in root[name]:
            return None
        group = root[name][key]
        return group if group.attrs.get("complete", False) else None
    parent = root.require_group(name)
    if key in parent:
        del parent[key]
    return parent.create_group(key)


def _write_array(group, name: str, data: np.ndarray) -> None:
    data = np.ascontiguousarray(data)
    group.create_array(name, data=data, overwrite=True)


def _amg_parameters(amg) -> Dict[str, Any]:
    return {
        "class": type(amg).__name__,
        "points_per_side": amg._points_per_side,
        "points_per_batch": amg._points_per_batch,
        "crop_n_layers": amg._crop_n_layers,
        "crop_overlap_ratio": float(amg._crop_overlap_ratio),
        "crop_n_points_downscale_factor": amg._crop_n_points_downscale_factor,
        "stability_score_offset": float(amg._stability_score_offset),
        "point_grids_sum": float(sum(float(np.sum(g)) for g in amg.point_grids)),
    }


def _save_amg_state(group, amg) -> None:
    state = amg.get_state()
    for c, table in enumerate(state["crop_list"]):
        crop = group.create_group(f"crop-{c}")
        for key in _TABLE_KEYS:
            _write_array(crop, key, np.asarray(table[key]))
    attrs = {"crop_boxes": [[int(v) for v in box] for box in state["crop_boxes"]],
             "original_size": [int(s) for s in state["original_size"]], "parameters": _amg_parameters(amg)}
    if state.get("inner_boxes") is not None:
        attrs["inner_boxes"] = [[int(v) for v in box] for box in state["inner_boxes"]]
    attrs["complete"] = True  # written last
    group.attrs.update(attrs)


def _load_amg_state(group) -> Dict[str, Any]:
    attrs = dict(group.attrs)
    crop_list = []
    for c in range(len(attrs["crop_boxes"])):
        crop = group[f"crop-{c}"]
        crop_list.append({key: crop[key][...] for key in _TABLE_KEYS})
    state = {"crop_list": crop_list, "crop_boxes": attrs["crop_boxes"], "original_size": attrs["original_size"]}
    if "inner_boxes" in attrs:
        state["inner_boxes"] = attrs["inner_boxes"]
    return state


def _is_tiled(image_embeddings) -> bool:
    features = image_embeddings["features"]
    return hasattr(features, "keys") and not hasattr(features, "shape")


def cache_amg_state(
    predictor,
    raw: np.ndarray,
    image_embeddings: Dict[str, Any],
    save_path: Union[str, os.PathLike],
    verbose: bool = True,
    i: Optional[int] = None,
    **kwargs,
) -> instance_segmentation.AMGBase:
    """Load the cached AMG state from ``save_path``, or compute and cache it.

    A cached state computed with other generator parameters (e.g. ``points_per_side``) is recomputed.

    Args:
        predictor: The ``SamPredictor``.
        raw: The image (or the volume, with ``i``).
        image_embeddings: The embeddings of ``raw`` (tiled embeddings give the tiled generator).
        save_path: The embeddings' zarr cache; the state is stored in its ``amg_state`` group.
        verbose: Print what happens and show progress bars.
        i: Slice index for volumes (one state per slice).
        kwargs: Arguments of the generator class (e.g. ``points_per_side``).

    Returns:
        The initialized automatic mask generator.
    """
    from . import instance_segmentation

    amg = instance_segmentation.get_instance_segmentation_generator(
        predictor, is_tiled=_is_tiled(image_embeddings), segmentation_mode="amg", **kwargs
    )
    group = _state_group(save_path, "amg_state", i, mode="r")
    if group is not None and dict(group.attrs.get("parameters", {})) == _amg_parameters(amg):
        if verbose:
            print(f"Load the AMG state from {os.fspath(save_path)!r}" + ("" if i is None else f" (slice {i})"))
        amg.set_state(_load_amg_state(group))
        return amg
    if verbose:
        print("Precompute the state for automatic mask generation.")
    amg.initialize(raw, image_embeddings=image_embeddings, verbose=verbose, i=i)
    _save_amg_state(_state_group(save_path, "amg_state", i), amg)
    return amg


def cache_is_state(
    predictor,
    decoder,
    raw: np.ndarray,
    image_embeddings: Dict[str, Any],
    save_path: Union[str, os.PathLike],
    verbose: bool = True,
    i: Optional[int] = None,
    skip_load: bool = False,
    **kwargs,
) -> Optional[instance_segmentation.InstanceSegmentationWithDecoder]:
    """Load the cached AIS state (the decoder's maps) from ``save_path``, or compute and cache it.

    Args:
        predictor: The ``SamPredictor``.
        decoder: The AIS decoder.
        raw: The image (or the volume, with ``i``).
        image_embeddings: The embeddings of ``raw`` (tiled embeddings give the tiled segmenter).
        save_path: The embeddings' zarr cache; the state is stored in its ``is_state`` group.
        verbose: Print what happens and show progress bars.
        i: Slice index for volumes (one state per slice).
        skip_load: Return None without loading if the state is cached already.
        kwargs: Arguments of the segmenter class.

    Returns:
        The initialized segmenter (None with ``skip_load`` for a cached state).
    """
    from . import instance_segmentation

    segmenter = instance_segmentation.get_instance_segmentation_generator(
        predictor, is_tiled=_is_tiled(image_embeddings), decoder=decoder, segmentation_mode="ais", **kwargs
    )
    group = _state_group(save_path, "is_state", i, mode="r")
    if group is not None:
        if skip_load:
            return None
        if verbose:
            print(f"Load the instance segmentation state from {os.fspath(save_path)!r}"
                  + ("" if i is None else f" (slice {i})"))
        segmenter.set_state({key: group[key][...] for key in ("foreground", "center_distances", "boundary_distances")})
        return segmenter
    if verbose:
        print("Precompute the state for instance segmentation with the decoder.")
    segmenter.initialize(raw, image_embeddings=image_embeddings, verbose=verbose, i=i)
    group = _state_group(save_path, "is_state", i)
    for key, value in segmenter.get_state().items():
        _write_array(group, key, np.asarray(value, dtype="float32"))
    group.attrs["complete"] = True
    return segmenter


def _precompute_state_for_file(predictor, input_path, output_path, key, ndim, tile_shape, halo,
                               precompute_amg_state, decoder, verbose):
    from ._image import infer_ndim
    from ._progress import track

    image = input_path if isinstance(input_path, np.ndarray) else util.load_image_data(os.fspath(input_path), key)
    ndim = infer_ndim(image, ndim)
    output_path = Path(output_path).with_suffix(".zarr")
    embeddings = util.precompute_image_embeddings(
        predictor, image, save_path=output_path, ndim=ndim, tile_shape=tile_shape, halo=halo, verbose=verbose,
    )
    if not precompute_amg_state:
        return output_path
    if decoder is None:
        def cache(i, verbose):
            return cache_amg_state(predictor, image, embeddings, output_path, verbose=verbose, i=i)
    else:
        def cache(i, verbose):
            return cache_is_state(predictor, decoder, image, embeddings, output_path, verbose=verbose, i=i,
                                  skip_load=True)
    if ndim == 2:
        cache(None, verbose)
    else:
        for i in track(range(image.shape[0]), "Precompute the segmentation state", verbose=verbose):
            cache(i, False)
    return output_path


def precompute_state(
    input_path: Union[os.PathLike, str],
    output_path: Union[os.PathLike, str],
    pattern: Optional[str] = None,
    model_type: str = util._DEFAULT_MODEL,
    checkpoint_path: Optional[Union[os.PathLike, str]] = None,
    key: Optional[str] = None,
    ndim: Optional[int] = None,
    tile_shape: Optional[Tuple[int, int]] = None,
    halo: Optional[Tuple[int, int]] = None,
    precompute_amg_state: bool = False,
    device: Optional[str] = None,
    verbose: bool = True,
) -> None:
    """Precompute the image embeddings (and optionally the automatic segmentation state) for image(s).

    The inputs are checked before the model is loaded.

    Args:
        input_path: An image file, a container file (with ``key``), or a folder (with ``pattern``).
        output_path: The zarr cache for one input ("<output_path>.zarr"), or the folder for
            "<input name>.zarr" caches when ``pattern`` is given.
        pattern: Glob pattern selecting the files in the ``input_path`` folder, e.g. "*.tif".
        model_type: The model (registered name, or the architecture of ``checkpoint_path``).
        checkpoint_path: A local checkpoint.
        key: Dataset key in container inputs.
        ndim: 2 or 3; inferred by default.
        tile_shape: (y, x) tile shape for tiled embeddings.
        halo: (y, x) tile overlap.
        precompute_amg_state: Also cache the automatic segmentation state: AIS if the model has a decoder,
            else AMG.
        device: The device; None picks the best available one.
        verbose: Show progress bars (per slice / tile for one input, per file for a folder).

    Raises:
        ValueError: Missing inputs or an input that matches no files.
    """
    from . import instance_segmentation
    from ._progress import track

    if pattern is None:
        if not os.path.exists(os.fspath(input_path)):
            raise ValueError(f"The input path {os.fspath(input_path)!r} does not exist.")
        files = None
    else:
        files = sorted(glob(os.path.join(os.fspath(input_path), pattern)))
        if not files:
            raise ValueError(f"No files match {pattern!r} in {os.fspath(input_path)!r}.")
    predictor, state = util.get_sam_model(model_type=model_type, checkpoint_path=checkpoint_path,
                                          device=util.get_device(device), return_state=True)
    decoder = None
    if isinstance(state, dict) and state.get("decoder_state") is not None:
        decoder = instance_segmentation.get_decoder(predictor.model.image_encoder, state["decoder_state"],
                                                    device=predictor.device)
    if files is None:
        _precompute_state_for_file(predictor, input_path, output_path, key, ndim, tile_shape, halo,
                                   precompute_amg_state, decoder, verbose=verbose)
        return
    os.makedirs(output_path, exist_ok=True)
    for path in track(files, "Precompute state for files", verbose=verbose):
        out = os.path.join(os.fspath(output_path), Path(path).stem + ".zarr")
        _precompute_state_for_file(predictor, path, out, key, ndim, tile_shape, halo, precompute_amg_state,
                                   decoder, verbose=False)


_PROG = "micro_sam.precompute_embeddings"


def _main(argv: Optional[List[str]]) -> int:
    from . import _cli, _registry, _tiling

    parser = _cli.ArgumentParser(
        prog=_PROG,
        description="Compute the image embeddings for an image, a volume or a folder of images and cache them in "
                    "zarr, so that the annotation tools and automatic segmentation start instantly. Existing "
                    "caches are reused (incomplete ones are resumed); a cache made for another image or model is "
                    "an error. Optionally also cache the state of the automatic segmentation (-p). Inputs are "
                    "checked before the model is loaded; missing output folders are created. Exit status: 0 "
                    "done, 1 failed, 2 invalid arguments or inputs.",
    )
    parser.add_argument("-i", "--input_path", required=True,
                        help="An image file (tif, png, ...), a container file (zarr, n5, hdf5; with --key), or a "
                             "folder (with --pattern).")
    parser.add_argument("-e", "--embedding_path", required=True,
                        help="The zarr cache to write ('.zarr' is appended); with --pattern the folder for "
                             "<input name>.zarr caches.")
    parser.add_argument("--pattern", default=None, help="Glob pattern for the files in a folder, e.g. '*.tif'.")
    parser.add_argument("-k", "--key", default=None, help="Dataset key inside container inputs.")
    parser.add_argument("-m", "--model_type", default=util._DEFAULT_MODEL,
                        help=f"The model (default: {util._DEFAULT_MODEL}); a registered name (see "
                             "micro_sam.util.get_model_names()) or, with --checkpoint, the architecture (vit_t, "
                             "vit_b, vit_l, vit_h).")
    parser.add_argument("-c", "--checkpoint", default=None, help="A local model checkpoint to use.")
    parser.add_argument("--tile_shape", nargs=2, type=int, default=None, metavar=("Y", "X"),
                        help="Compute tiled embeddings with tiles of this shape (for large images).")
    parser.add_argument("--halo", nargs=2, type=int, default=None, metavar=("Y", "X"),
                        help="Overlap added on each side of a tile (required with --tile_shape).")
    parser.add_argument("-n", "--ndim", type=int, default=None, choices=[2, 3],
                        help="2 for images, 3 for volumes; inferred by default.")
    parser.add_argument("-d", "--device", default=None, help="'cpu', 'cuda', 'cuda:N' or 'mps'; best available "
                                                             "by default.")
    parser.add_argument("-p", "--precompute_amg_state", action="store_true",
                        help="Also cache the automatic segmentation state (AIS for models with a decoder, else AMG).")
    _cli.add_quiet_argument(parser)
    args = parser.parse_args(argv)
    if (args.tile_shape is None) != (args.halo is None):
        raise _cli.UsageError("--tile_shape and --halo must be given together")
    tile_shape = None if args.tile_shape is None else tuple(args.tile_shape)
    halo = None if args.halo is None else tuple(args.halo)
    if args.checkpoint is None:
        try:
            _registry.get_entry(args.model_type)
        except ValueError as error:  # names the registered models
            raise _cli.UsageError(str(error)) from None
    elif not os.path.isfile(args.checkpoint):
        raise _cli.UsageError(f"the checkpoint {args.checkpoint!r} does not exist")
    if args.pattern is None:  # one input: read and check it now, before the model is loaded
        data, ndim = _cli.load_input(args.input_path, args.key, args.ndim)
        spatial = tuple(data.shape[1:3]) if ndim == 3 else tuple(data.shape[:2])
        try:
            _tiling.validate_tiling(spatial, tile_shape, halo)
        except ValueError as error:
            raise _cli.UsageError(str(error)) from None
        _cli.check_writable(Path(args.embedding_path).with_suffix(".zarr"), "embedding cache")
    elif not os.path.isdir(args.input_path):
        raise _cli.UsageError(f"--pattern needs a folder as input, {args.input_path!r} is not one")
    else:
        _cli.check_writable(args.embedding_path, "output folder")
    _cli.check_device(args.device)
    precompute_state(
        args.input_path, args.embedding_path, pattern=args.pattern, model_type=args.model_type,
        checkpoint_path=args.checkpoint, key=args.key, ndim=args.ndim, tile_shape=tile_shape, halo=halo,
        precompute_amg_state=args.precompute_amg_state, device=args.device, verbose=not args.quiet,
    )
    if not args.quiet:
        output = args.embedding_path if args.pattern else Path(args.embedding_path).with_suffix(".zarr")
        print(f"{args.input_path} -> {output}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point ``micro_sam.precompute_embeddings`` (see ``--help``).

    Args:
        argv: The arguments; None reads ``sys.argv``.

    Returns:
        The exit code: 0 done, 1 failed, 2 invalid arguments or inputs (one line on stderr).
    """
    from . import _cli

    return _cli.run_main(_main, argv, prog=_PROG)


if __name__ == "__main__":
    sys.exit(main())
