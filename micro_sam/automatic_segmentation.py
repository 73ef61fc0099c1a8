"""Automatic instance segmentation of images and volumes (files or arrays), and its command line interface.

Python::

    predictor, segmenter = get_predictor_and_segmenter(model_type="vit_b_lm")   # AIS if the model has a decoder
    labels = automatic_instance_segmentation(predictor, segmenter, "image.tif", output_path="labels.tif")

Command line (see ``micro_sam.automatic_segmentation --help``)::

    micro_sam.automatic_segmentation -i image.tif -o labels.tif -e embeddings.zarr
    micro_sam.automatic_segmentation -i images/ --pattern "*.tif" -o labels/ --overlay
"""
from __future__ import annotations

import inspect
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from . import _cli, util

if TYPE_CHECKING:  # the segmenter classes import torch: imported where used, so that --help is fast
    from .instance_segmentation import AMGBase, InstanceSegmentationWithDecoder

__all__ = ["get_predictor_and_segmenter", "automatic_instance_segmentation", "automatic_tracking", "main"]

_PROG = "micro_sam.automatic_segmentation"
_IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _is_tiled(segmenter) -> bool:
    from .instance_segmentation import TiledAutomaticMaskGenerator, TiledInstanceSegmentationWithDecoder

    return isinstance(segmenter, (TiledAutomaticMaskGenerator, TiledInstanceSegmentationWithDecoder))  # APG: subclass


# --- model and segmenter ------------------------------------------------------------------------------------
def get_predictor_and_segmenter(
    model_type: str,
    checkpoint: Optional[Union[os.PathLike, str]] = None,
    device: Optional[str] = None,
    segmentation_mode: Optional[str] = None,
    is_tiled: bool = False,
    predictor=None,
    state: Optional[Dict[str, Any]] = None,
    **kwargs,
):
    """Load a SAM model and the matching automatic segmentation class.

    Args:
        model_type: A registered model name (e.g. "vit_b_lm") or, with ``checkpoint``, its architecture.
        checkpoint: A local checkpoint to load instead of the registered weights.
        device: "cpu", "cuda", "mps", ...; None picks the best available device.
        segmentation_mode: "ais" (decoder), "apg" (SAM prompted from the decoder's maps), "amg" (point grid)
            or None / "auto": AIS if the model has a decoder, else AMG.
        is_tiled: Return the tiled variant (for tiled embeddings of large images).
        predictor: An already loaded predictor (then ``state`` must be given too and nothing is loaded).
        state: The checkpoint state of ``predictor`` (from ``util.get_sam_model(..., return_state=True)``).
        kwargs: Arguments of the segmenter class (e.g. ``points_per_side`` for AMG).

    Returns:
        The ``SamPredictor`` and the segmenter.

    Raises:
        ValueError: AIS requested for a model without decoder, an unknown mode, or ``predictor`` without ``state``.
    """
    from .instance_segmentation import (
        DEFAULT_SEGMENTATION_MODE_WITH_DECODER, get_decoder, get_instance_segmentation_generator,
    )

    if predictor is None:
        device = util.get_device(device)
        predictor, state = util.get_sam_model(model_type=model_type, device=device, checkpoint_path=checkpoint,
                                              return_state=True)
    elif state is None:
        raise ValueError("state must be given together with predictor (util.get_sam_model(..., return_state=True)).")
    has_decoder = isinstance(state, dict) and state.get("decoder_state") is not None
    if segmentation_mode is None or str(segmentation_mode).lower() == "auto":
        segmentation_mode = DEFAULT_SEGMENTATION_MODE_WITH_DECODER if has_decoder else "amg"
    decoder = None
    if str(segmentation_mode).lower() != "amg":
        if not has_decoder:
            raise ValueError(
                f"segmentation_mode={segmentation_mode!r} needs an instance segmentation decoder, but the model "
                f"{model_type!r} has none; use segmentation_mode='amg' or a model with a decoder (e.g. 'vit_b_lm')."
            )
        decoder = get_decoder(predictor.model.image_encoder, state["decoder_state"], device=predictor.device)
    segmenter = get_instance_segmentation_generator(
        predictor=predictor, is_tiled=is_tiled, decoder=decoder, segmentation_mode=segmentation_mode, **kwargs
    )
    return predictor, segmenter


# --- writing results ------------------------------------------------------------------------------------------
def _output_tif(output_path: Union[str, os.PathLike]) -> Path:
    path = Path(output_path)
    return path if path.suffix.lower() in (".tif", ".tiff") else path.with_suffix(".tif")


def _atomic_write(path: Path, suffix: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` for a temporary file next to ``path``, then rename it to ``path``.

    The file gets the permissions of a newly created file (0o666 minus the umask), not mkstemp's 0o600; on any
    error the temporary file is removed and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_labels(path: Path, labels: np.ndarray) -> None:
    """Write a zlib-compressed tif atomically."""
    import tifffile

    _atomic_write(path, ".tif.partial", lambda tmp: tifffile.imwrite(tmp, np.asarray(labels), compression="zlib"))


def _write_overlay(path: Path, image: np.ndarray, labels: np.ndarray, ndim: int) -> Optional[Path]:
    """PNG overlay of the labels on the image (the middle slice for volumes), via micro_sam.visualization."""
    from .visualization import save_overlay

    image, labels = np.asarray(image), np.asarray(labels)
    if ndim == 3:
        z = labels.shape[0] // 2
        image, labels = image[z], labels[z]
    _atomic_write(path, ".png", lambda tmp: save_overlay(tmp, image, labels))
    return path


# --- segmentation of one input --------------------------------------------------------------------------------
def _load(input_, key, name):
    if isinstance(input_, (str, os.PathLike)):
        return util.load_image_data(os.fspath(input_), key)
    if not hasattr(input_, "shape"):
        raise ValueError(f"{name} must be a file path or an array, got {type(input_).__name__}.")
    return input_


def _check_tiling(segmenter, tile_shape, halo) -> None:
    tiled = _is_tiled(segmenter)
    if tile_shape is not None and not tiled:
        raise ValueError("tile_shape was given, but the segmenter is not tiled; create it with is_tiled=True "
                         "(get_predictor_and_segmenter(..., is_tiled=True)).")
    if tile_shape is None and tiled and halo is not None:
        raise ValueError("halo was given without tile_shape.")


def automatic_instance_segmentation(
    predictor,
    segmenter: Union[AMGBase, InstanceSegmentationWithDecoder],
    input_path: Union[os.PathLike, str, np.ndarray],
    output_path: Optional[Union[os.PathLike, str]] = None,
    embedding_path: Optional[Union[os.PathLike, str]] = None,
    mask_path: Optional[Union[os.PathLike, str, np.ndarray]] = None,
    key: Optional[str] = None,
    mask_key: Optional[str] = None,
    ndim: Optional[int] = None,
    tile_shape: Optional[Tuple[int, int]] = None,
    halo: Optional[Tuple[int, int]] = None,
    verbose: bool = True,
    return_embeddings: bool = False,
    annotate: bool = False,
    batch_size: int = 1,
    overwrite: bool = False,
    **generate_kwargs,
) -> np.ndarray:
    """Segment all objects in an image or volume automatically.

    Args:
        predictor: The ``SamPredictor``.
        segmenter: The segmenter from :func:`get_predictor_and_segmenter` (tiled if ``tile_shape`` is given).
        input_path: An image file (tif, png, ...), a container file with ``key`` (zarr, n5, hdf5), or an array:
            (Y, X[, C]) image or (Z, Y, X[, C]) volume.
        output_path: Where to write the label image (zlib-compressed tif; ".tif" is appended if needed).
            An existing output is not recomputed: it is read and returned, with a message, unless
            ``overwrite`` is True.
        embedding_path: A zarr path to cache the image embeddings in (reused when it exists).
        mask_path: Optional foreground mask (file or array, image shape, 2D only); tiles outside it are skipped.
        key: Dataset key for container inputs.
        mask_key: Dataset key for a container mask.
        ndim: 2 or 3; None infers it (an (Y, X, 3) array is an RGB image; pass ndim=3 for 3-slice volumes).
        tile_shape: (y, x) tile shape for tiled processing of large images.
        halo: (y, x) overlap of the tiles.
        verbose: Show progress bars and messages.
        return_embeddings: Also return the image embeddings.
        annotate: Open the result in the napari annotator (not available in this package; must be False).
        batch_size: Slices or tiles per image encoder pass.
        overwrite: Recompute and replace an existing output.
        generate_kwargs: Arguments of the segmenter's ``generate`` (e.g. ``center_distance_threshold`` for AIS,
            ``pred_iou_thresh`` for AMG) and, for volumes, ``gap_closing`` / ``min_z_extent`` /
            ``with_background`` of the 3D merge.

    Returns:
        The uint32 label image (Y, X) or volume (Z, Y, X); with ``return_embeddings`` also the embeddings
        (None when an existing output was returned).

    Raises:
        ValueError: Unreadable input, an input that does not match ``ndim``, embeddings of another image,
            or tiling arguments that do not match the segmenter.
    """
    if annotate:
        raise ValueError("annotate=True needs micro_sam's napari annotator, which is not part of this package.")
    output_tif = None if output_path is None else _output_tif(output_path)
    if output_tif is not None and output_tif.exists() and not overwrite:
        import tifffile

        print(f"The segmentation {os.path.abspath(output_tif)!r} exists already; it is not recomputed "
              "(pass overwrite=True / --overwrite to replace it).")
        existing = tifffile.imread(output_tif)
        return (existing, None) if return_embeddings else existing

    from ._image import infer_ndim, validate_array

    if output_tif is not None:
        _cli.check_writable(output_tif, "output")  # fail now, not after the segmentation
    image = _load(input_path, key, "input_path")
    validate_array(image, "input")
    ndim = infer_ndim(image, ndim)
    mask = None if mask_path is None else _load(mask_path, mask_key, "mask_path")
    _check_tiling(segmenter, tile_shape, halo)

    if ndim == 2:
        image_embeddings = util.precompute_image_embeddings(
            predictor, image, save_path=embedding_path, ndim=2, tile_shape=tile_shape, halo=halo,
            verbose=verbose, batch_size=batch_size, mask=mask,
        )
        init_kwargs = dict(image=image, image_embeddings=image_embeddings, verbose=verbose)
        if _is_tiled(segmenter):
            init_kwargs.update(batch_size=batch_size, mask=mask)
        elif mask is not None:
            raise ValueError("mask_path is only supported with tiling (tile_shape / is_tiled=True).")
        segmenter.initialize(**init_kwargs)
        instances = segmenter.generate(**generate_kwargs)
    else:
        if mask is not None:
            raise ValueError("mask_path is only supported for 2D inputs.")
        instances, image_embeddings = _automatic_3d_segmentation(
            volume=image, predictor=predictor, segmentor=segmenter, embedding_path=embedding_path,
            tile_shape=tile_shape, halo=halo, verbose=verbose, return_embeddings=True, batch_size=batch_size,
            **generate_kwargs,
        )
    if not isinstance(instances, np.ndarray):
        raise ValueError("automatic_instance_segmentation needs the label image output; do not pass output_mode.")
    instances = _as_uint32(instances)

    if output_tif is not None:
        _write_labels(output_tif, instances)
        if verbose:
            print(f"The segmentation was written to {os.path.abspath(output_tif)!r}.")
    return (instances, image_embeddings) if return_embeddings else instances


def _as_uint32(labels: np.ndarray) -> np.ndarray:
    """Label images are uint32 in 2D and 3D (uint64 is kept only if the ids do not fit)."""
    if labels.dtype == np.uint32 or (labels.size and int(labels.max()) > np.iinfo(np.uint32).max):
        return labels
    return labels.astype(np.uint32)


def _automatic_3d_segmentation(**kwargs):
    from .multi_dimensional_segmentation import automatic_3d_segmentation

    return automatic_3d_segmentation(**kwargs)


def automatic_tracking(
    predictor,
    segmenter: Union[AMGBase, InstanceSegmentationWithDecoder],
    input_path: Union[os.PathLike, str, np.ndarray],
    output_path: Optional[Union[os.PathLike, str]] = None,
    embedding_path: Optional[Union[os.PathLike, str]] = None,
    key: Optional[str] = None,
    tile_shape: Optional[Tuple[int, int]] = None,
    halo: Optional[Tuple[int, int]] = None,
    verbose: bool = True,
    return_embeddings: bool = False,
    annotate: bool = False,
    batch_size: int = 1,
    mode: str = "greedy",
    tracking_model: str = "general_2d",
    **generate_kwargs,
):
    """Segment every frame of a time series and link the objects over time (needs ``trackastra``).

    Args:
        predictor: The ``SamPredictor``.
        segmenter: The segmenter from :func:`get_predictor_and_segmenter`.
        input_path: A (T, Y, X[, C]) time series, as file path or array.
        output_path: Folder for the tracking result in the Cell Tracking Challenge format.
        embedding_path: A zarr path to cache the embeddings in.
        key: Dataset key for container inputs.
        tile_shape: (y, x) tile shape for tiled processing.
        halo: (y, x) overlap of the tiles.
        verbose: Show progress bars.
        return_embeddings: Also return the embeddings.
        annotate: Not available in this package; must be False.
        batch_size: Frames or tiles per image encoder pass.
        mode: The trackastra linking mode ("greedy_nodiv", "greedy" or "ilp").
        tracking_model: The trackastra model.
        generate_kwargs: Arguments of the segmenter's ``generate``; ``gap_closing`` and ``min_time_extent``
            are passed to the tracking.

    Returns:
        The tracked label time series and the lineages (and the embeddings if requested).
    """
    from . import multi_dimensional_segmentation as mds
    from .instance_segmentation._volume import segment_slices

    if annotate:
        raise ValueError("annotate=True needs micro_sam's napari annotator, which is not part of this package.")
    timeseries = _load(input_path, key, "input_path")
    if len(timeseries.shape) not in (3, 4) or (len(timeseries.shape) == 4 and timeseries.shape[-1] > 4):
        raise ValueError(f"Tracking needs a time series of shape (T, Y, X[, C]), got {tuple(timeseries.shape)}.")
    _check_tiling(segmenter, tile_shape, halo)
    gap_closing = generate_kwargs.pop("gap_closing", None)
    min_time_extent = generate_kwargs.pop("min_time_extent", None)
    implementation = getattr(mds, "automatic_tracking_implementation", None)
    if implementation is not None:
        result = implementation(
            timeseries, predictor, segmenter, embedding_path=embedding_path, gap_closing=gap_closing,
            min_time_extent=min_time_extent, mode=mode, tracking_model=tracking_model, tile_shape=tile_shape,
            halo=halo, verbose=verbose, return_embeddings=True, batch_size=batch_size, output_folder=output_path,
            **generate_kwargs,
        )
        segmentation, lineages, embeddings = result
    else:
        segmentation, embeddings = segment_slices(
            timeseries, predictor, segmenter, embedding_path=embedding_path, verbose=verbose,
            tile_shape=tile_shape, halo=halo, batch_size=batch_size, **generate_kwargs,
        )
        segmentation, lineages = mds.track_across_frames(
            timeseries=timeseries, segmentation=segmentation, gap_closing=gap_closing,
            min_time_extent=min_time_extent, mode=mode, tracking_model=tracking_model, verbose=verbose,
            output_folder=output_path,
        )
    return (segmentation, lineages, embeddings) if return_embeddings else (segmentation, lineages)


# --- command line ---------------------------------------------------------------------------------------------
def _collect_inputs(paths: List[str], pattern: Optional[str]) -> List[str]:
    from glob import glob

    inputs = []
    for path in paths:
        if os.path.isdir(path) and not _is_container(path):
            if pattern is not None:
                found = sorted(glob(os.path.join(path, pattern)))
            else:
                found = sorted(os.path.join(path, name) for name in os.listdir(path)
                               if name.lower().endswith(_IMAGE_SUFFIXES))
            if not found:
                raise _cli.UsageError(f"no input images found in the folder {path!r}"
                                      + (f" with the pattern {pattern!r}" if pattern else ""))
            inputs.extend(found)
        elif os.path.exists(path):
            inputs.append(path)
        else:
            raise _cli.UsageError(f"the input path {path!r} does not exist")
    return inputs


def _is_container(path: str) -> bool:
    return str(path).rstrip("/").endswith((".zarr", ".n5"))


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _parse_extra(arguments: List[str]) -> Dict[str, Any]:
    """Parse ``--name value`` / ``--name=value`` pairs (segmenter parameters) into a dict."""
    extra, i = {}, 0
    while i < len(arguments):
        argument = arguments[i]
        if not argument.startswith("--"):
            raise _cli.UsageError(f"unexpected argument {argument!r}; segmenter parameters are given as --name value")
        name = argument[2:]
        if "=" in name:
            name, value = name.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(arguments):
                raise _cli.UsageError(f"the parameter {argument} needs a value")
            value = arguments[i + 1]
            i += 2
        extra[name] = _parse_value(value)
    return extra


def _parameters(function) -> List[str]:
    # Not settable as --name value: the objects, the options of their own (--tile_shape, ...) and arrays.
    skip = {"self", "predictor", "decoder", "tile_shape", "halo", "batch_size", "segmentation", "point_grids",
            "prompt_function", "n_threads", "optimize_memory"}
    return [name for name, p in inspect.signature(function).parameters.items()
            if name not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def _segmenter_classes(mode: str, tiled: bool):
    from . import instance_segmentation as ins

    if mode == "amg":
        return ins.TiledAutomaticMaskGenerator if tiled else ins.AutomaticMaskGenerator
    if mode == "apg":
        return ins.TiledAutomaticPromptGenerator if tiled else ins.AutomaticPromptGenerator
    return ins.TiledInstanceSegmentationWithDecoder if tiled else ins.InstanceSegmentationWithDecoder


_VOLUME_PARAMETERS = ("gap_closing", "min_z_extent", "with_background", "min_time_extent")


def _names(segmenter_class) -> Tuple[set, set]:
    """The parameter names of a segmenter class's ``__init__`` and of its ``generate`` (with the 3D merge's)."""
    init_names = set(_parameters(segmenter_class.__init__))
    generate_names = set(_parameters(segmenter_class.generate)) | set(_VOLUME_PARAMETERS)
    generate_names.discard("output_mode")
    return init_names, generate_names


def _check_extra_names(extra: Dict[str, Any], modes: List[str], tiled: bool) -> None:
    """Reject parameters that no segmenter of the given modes accepts (checked before the model is loaded)."""
    valid = set()
    for mode in modes:
        valid.update(*_names(_segmenter_classes(mode, tiled)))
    unknown = sorted(set(extra) - valid)
    if unknown:
        from difflib import get_close_matches

        close = get_close_matches(unknown[0], valid, n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        raise _cli.UsageError(
            f"unknown parameter(s) {', '.join('--' + u for u in unknown)}{hint} for mode {'/'.join(modes)}; "
            f"valid: {', '.join('--' + n for n in sorted(valid))}"
        )


def _split_extra(extra: Dict[str, Any], segmenter_class) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    init_names, generate_names = _names(segmenter_class)
    unknown = sorted(set(extra) - init_names - generate_names)
    if unknown:
        raise _cli.UsageError(
            f"unknown parameter(s) {', '.join('--' + u for u in unknown)} for {segmenter_class.__name__}; "
            f"valid: {', '.join('--' + n for n in sorted(init_names | generate_names))}"
        )
    init = {k: v for k, v in extra.items() if k in init_names}
    generate = {k: v for k, v in extra.items() if k not in init_names}
    return init, generate


def _build_parser():
    import argparse

    parser = _cli.ArgumentParser(
        prog=_PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Segment all objects in images or volumes automatically and write label images (zlib-compressed tif,\n"
            "uint32, 0 = background).\n\n"
            "Modes: AIS (instance segmentation with the decoder of models such as vit_b_lm), APG (SAM prompted "
            "with points derived from the decoder) or AMG (SAM's automatic mask generation with a point grid; "
            "for models without a decoder).\n"
            "Inputs, the model name and the output folders are checked before the model is loaded. Existing "
            "outputs are skipped (with a message) unless --overwrite is given; results are written to a "
            "temporary file first and renamed when complete. Progress is shown per slice / tile (plain lines "
            "when the output is not a terminal); --quiet shows only results and errors.\n\n"
            "Further segmenter parameters can be added as --name value, e.g.\n"
            "  AIS: --center_distance_threshold 0.5 --boundary_distance_threshold 0.5 --foreground_threshold 0.5\n"
            "       --foreground_smoothing 1.0 --distance_smoothing 1.6 --min_size 0\n"
            "  APG: --min_size 25 --nms_threshold 0.9 --multimasking true --refine_with_box_prompts true\n"
            "  AMG: --points_per_side 32 --points_per_batch 64 --pred_iou_thresh 0.88 --stability_score_thresh 0.95\n"
            "       --box_nms_thresh 0.7 --min_mask_region_area 0 --with_background true\n"
            "  volumes: --gap_closing N --min_z_extent N (3D merge of the per-slice segmentations)\n\n"
            "Exit status: 0 done, 1 the segmentation of an input failed, 2 invalid arguments or inputs."
        ),
    )
    parser.add_argument("-i", "--input_path", required=True, nargs="+",
                        help="Image file(s) (tif, png, ...), container files (zarr, n5, hdf5; with --key) or folders "
                             "(all images in them, or those matching --pattern).")
    parser.add_argument("-o", "--output_path", required=True,
                        help="Output tif for a single input; otherwise (or if it is an existing folder) the folder "
                             "for <input name>.tif outputs. Missing folders are created.")
    parser.add_argument("-e", "--embedding_path", default=None,
                        help="Cache the image embeddings here (zarr; a folder of <input name>.zarr for several "
                             "inputs). Cached embeddings are reused.")
    parser.add_argument("--pattern", default=None, help="Glob pattern for the files in input folders, e.g. '*.tif'.")
    parser.add_argument("-k", "--key", default=None, help="Dataset key inside container inputs (zarr, n5, hdf5).")
    parser.add_argument("-m", "--model_type", default=util._DEFAULT_MODEL,
                        help=f"The model (default: {util._DEFAULT_MODEL}, downloaded on first use; vit_t_demo is "
                             "bundled); a registered name (see micro_sam.util.get_model_names()) or, with "
                             "--checkpoint, the architecture (vit_t, vit_b, vit_l, vit_h).")
    parser.add_argument("-c", "--checkpoint", default=None, help="A local model checkpoint to use.")
    parser.add_argument("--mode", default="auto", choices=["auto", "ais", "apg", "amg"],
                        help="Segmentation mode: 'ais' (decoder), 'apg' (SAM prompted with points derived from the "
                             "decoder), 'amg' (point grid) or 'auto' (default: AIS if the model has a decoder, "
                             "else AMG).")
    parser.add_argument("--tile_shape", nargs=2, type=int, default=None, metavar=("Y", "X"),
                        help="Process large images in tiles of this shape, e.g. --tile_shape 1024 1024.")
    parser.add_argument("--halo", nargs=2, type=int, default=None, metavar=("Y", "X"),
                        help="Overlap added on each side of a tile, e.g. --halo 256 256 (required with --tile_shape).")
    parser.add_argument("-n", "--ndim", type=int, default=None, choices=[2, 3],
                        help="2 for images, 3 for volumes; inferred by default ((Y, X, 3) arrays are RGB images).")
    parser.add_argument("-d", "--device", default=None,
                        help="'cpu', 'cuda', 'cuda:N' or 'mps'; the best available device by default.")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="Slices or tiles per image encoder pass (default: 1).")
    parser.add_argument("--overwrite", action="store_true", help="Recompute and replace existing outputs.")
    parser.add_argument("--overlay", action="store_true",
                        help="Also write <output name>_overlay.png: the labels drawn over the image (middle slice "
                             "for volumes).")
    parser.add_argument("--tracking", action="store_true",
                        help="Track objects over time instead (time series inputs; needs trackastra). The output "
                             "is a folder in the Cell Tracking Challenge format.")
    _cli.add_quiet_argument(parser)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Accepted for compatibility with micro_sam; progress is shown unless --quiet is given.")
    return parser


def _plan_outputs(inputs: List[str], output_path: str, embedding_path: Optional[str], tracking: bool):
    """(input, output, embedding) paths: one output for one input, else a folder of <name>.tif outputs."""
    names = [Path(p.rstrip("/")).stem for p in inputs]
    single = len(inputs) == 1 and not os.path.isdir(output_path)
    if not single and len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise _cli.UsageError(f"several inputs have the same name {duplicates}; their outputs would collide")
    plan = []
    for path, name in zip(inputs, names):
        if single:
            out = Path(output_path) if tracking else _output_tif(output_path)
            emb = embedding_path
        else:
            out = Path(output_path) / (name if tracking else f"{name}.tif")
            emb = None if embedding_path is None else os.path.join(embedding_path, f"{name}.zarr")
        plan.append((path, out, emb))
    return plan


def _check_model_arguments(args) -> None:
    """The model name / checkpoint and the device, checked without loading anything."""
    from . import _registry

    if args.checkpoint is None:
        try:
            _registry.get_entry(args.model_type)
        except ValueError as error:  # names the registered models
            raise _cli.UsageError(str(error)) from None
    elif not os.path.isfile(args.checkpoint):
        raise _cli.UsageError(f"the checkpoint {args.checkpoint!r} does not exist")
    elif args.model_type[:5] not in _registry._ARCHITECTURES:
        raise _cli.UsageError(f"with --checkpoint, -m must name the architecture (vit_t, vit_b, vit_l or vit_h), "
                              f"got {args.model_type!r}")


def _check_inputs(todo, args, tile_shape, halo) -> Dict[str, Any]:
    """Read and check every input and check that the outputs can be written, before the model is loaded.

    Returns the loaded data of a single input (to be reused); several inputs are read again when processed.
    """
    from . import _tiling

    loaded = {}
    for path, out, emb in todo:
        data, ndim = _cli.load_input(path, args.key, None if args.tracking else args.ndim)
        if args.tracking and (len(data.shape) not in (3, 4) or ndim != 3):
            raise _cli.UsageError(f"--tracking needs a time series (T, Y, X[, C]); {path!r} has shape "
                                  f"{tuple(data.shape)}")
        spatial = tuple(data.shape[1:3]) if ndim == 3 else tuple(data.shape[:2])
        try:
            _tiling.validate_tiling(spatial, tile_shape, halo)
        except ValueError as error:
            raise _cli.UsageError(f"{path!r}: {error}") from None
        _cli.check_writable(out, "output")
        if emb is not None:
            _cli.check_writable(emb, "embedding cache")
        if len(todo) == 1:
            loaded[path] = data
    return loaded


def _load_model(args, extra: Dict[str, Any], tiled: bool, verbose: bool):
    """Load the model, choose the mode and build the segmenter; returns (predictor, segmenter, mode, generate)."""
    from .instance_segmentation import DEFAULT_SEGMENTATION_MODE_WITH_DECODER

    if verbose:
        print(f"Loading the model {args.model_type}" + (f" from {args.checkpoint}" if args.checkpoint else ""),
              file=sys.stderr, flush=True)
    predictor, state = util.get_sam_model(model_type=args.model_type, device=util.get_device(args.device),
                                          checkpoint_path=args.checkpoint, return_state=True)
    has_decoder = isinstance(state, dict) and state.get("decoder_state") is not None
    mode = args.mode if args.mode != "auto" else (DEFAULT_SEGMENTATION_MODE_WITH_DECODER if has_decoder else "amg")
    if mode != "amg" and not has_decoder:
        raise _cli.UsageError(f"--mode {mode} needs a model with an instance segmentation decoder; "
                              f"{args.model_type!r} has none (use --mode amg, or a model such as vit_b_lm)")
    init_kwargs, generate_kwargs = _split_extra(extra, _segmenter_classes(mode, tiled))
    predictor, segmenter = get_predictor_and_segmenter(
        model_type=args.model_type, segmentation_mode=mode, is_tiled=tiled, predictor=predictor, state=state,
        **init_kwargs,
    )
    return predictor, segmenter, mode, generate_kwargs


def _main(argv: Optional[List[str]]) -> int:
    parser = _build_parser()
    args, unknown = parser.parse_known_args(argv)
    verbose = not args.quiet
    extra = _parse_extra(unknown)
    if (args.tile_shape is None) != (args.halo is None):
        raise _cli.UsageError("--tile_shape and --halo must be given together")
    if args.batch_size < 1:
        raise _cli.UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    tile_shape = None if args.tile_shape is None else tuple(args.tile_shape)
    halo = None if args.halo is None else tuple(args.halo)
    plan = _plan_outputs(_collect_inputs(args.input_path, args.pattern), args.output_path, args.embedding_path,
                         args.tracking)
    _check_model_arguments(args)
    if extra:  # (imports torch for the segmenter classes' signatures)
        modes = ["ais", "apg", "amg"] if args.mode == "auto" else [args.mode]
        _check_extra_names(extra, modes, tile_shape is not None)

    todo = []
    for path, out, emb in plan:
        if out.exists() and not args.overwrite:
            print(f"Skipping {path!r}: the output {os.fspath(out)!r} exists (use --overwrite to replace it).")
        else:
            todo.append((path, out, emb))
    if not todo:
        return 0
    loaded = _check_inputs(todo, args, tile_shape, halo)
    _cli.check_device(args.device)
    predictor, segmenter, mode, generate_kwargs = _load_model(args, extra, tile_shape is not None, verbose)

    failed = []
    for number, (path, out, emb) in enumerate(todo, start=1):
        if verbose and len(todo) > 1:
            print(f"[{number}/{len(todo)}] {path}", file=sys.stderr, flush=True)
        if emb is not None:
            Path(emb).parent.mkdir(parents=True, exist_ok=True)
        try:
            if args.tracking:
                automatic_tracking(predictor, segmenter, loaded.get(path, path), output_path=os.fspath(out),
                                   embedding_path=emb, key=args.key, tile_shape=tile_shape, halo=halo,
                                   verbose=verbose, batch_size=args.batch_size, **generate_kwargs)
                print(f"{path} -> {os.fspath(out)}", flush=True)
                continue
            image = loaded.pop(path) if path in loaded else _cli.load_input(path, args.key, args.ndim)[0]
            labels = automatic_instance_segmentation(
                predictor, segmenter, image, embedding_path=emb, ndim=args.ndim, tile_shape=tile_shape, halo=halo,
                verbose=verbose, batch_size=args.batch_size, **generate_kwargs,
            )
            _write_labels(out, labels)
            if args.overlay:
                from ._image import infer_ndim

                _write_overlay(out.with_name(f"{out.stem}_overlay.png"), image, labels, infer_ndim(image, args.ndim))
        except (ValueError, _cli.CommandError) as error:
            print(f"{_PROG}: error: {path}: {_cli.one_line(error)}", file=sys.stderr, flush=True)
            failed.append(path)
            continue
        print(f"{path} -> {os.fspath(out)} ({int(labels.max())} objects, {mode.upper()})", flush=True)
    if failed:
        raise _cli.CommandError(f"{len(failed)} of {len(todo)} input(s) failed: {', '.join(map(repr, failed))}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point ``micro_sam.automatic_segmentation`` (see ``--help``).

    Args:
        argv: The arguments; None reads ``sys.argv``.

    Returns:
        The exit code: 0 done, 1 an input failed, 2 invalid arguments or inputs (one line on stderr).
    """
    return _cli.run_main(_main, argv, prog=_PROG)


if __name__ == "__main__":
    sys.exit(main())
