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
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from . import util
from .instance_segmentation import (
    DEFAULT_SEGMENTATION_MODE_WITH_DECODER, AMGBase, AutomaticMaskGenerator, AutomaticPromptGenerator,
    InstanceSegmentationWithDecoder, TiledAutomaticMaskGenerator, TiledAutomaticPromptGenerator,
    TiledInstanceSegmentationWithDecoder, get_decoder, get_instance_segmentation_generator,
)

__all__ = ["get_predictor_and_segmenter", "automatic_instance_segmentation", "automatic_tracking", "main"]

_IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_TILED_CLASSES = (TiledAutomaticMaskGenerator, TiledInstanceSegmentationWithDecoder)  # (APG: a subclass)


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
    tiled = isinstance(segmenter, _TILED_CLASSES)
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
        if isinstance(segmenter, _TILED_CLASSES):
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

    if output_tif is not None:
        _write_labels(output_tif, instances)
        if verbose:
            print(f"The segmentation was written to {os.path.abspath(output_tif)!r}.")
    return (instances, image_embeddings) if return_embeddings else instances


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
    """Segment every frame of a time series and link the objects over time.

    See :func:`micro_sam.multi_dimensional_segmentation.automatic_tracking_implementation`: trackastra links the
    objects when it is installed and its model can be had, otherwise micro_sam's weight-free overlap linker
    (``tracking_model="overlap"``), with a warning.

    Args:
        predictor: The ``SamPredictor``.
        segmenter: The segmenter from :func:`get_predictor_and_segmenter`.
        input_path: A (T, Y, X[, C]) time series, as file path or array.
        output_path: Folder for the tracking result in the Cell Tracking Challenge format.
        embedding_path: A zarr path to cache the embeddings of all frames in.
        key: Dataset key for container inputs.
        tile_shape: (y, x) tile shape for tiled processing.
        halo: (y, x) overlap of the tiles.
        verbose: Show progress bars.
        return_embeddings: Also return the embeddings.
        annotate: Not available in this package; must be False.
        batch_size: Frames or tiles per image encoder pass.
        mode: The linking mode ("greedy", "greedy_nodiv" or "ilp").
        tracking_model: A trackastra pretrained model name, a trackastra model folder or "overlap".
        generate_kwargs: Arguments of the segmenter's ``generate``; ``gap_closing`` and ``min_time_extent``
            are passed to the tracking.

    Returns:
        The tracked label time series (T, Y, X) and the lineages (and the embeddings if requested).
    """
    from .multi_dimensional_segmentation import automatic_tracking_implementation

    if annotate:
        raise ValueError("annotate=True needs micro_sam's napari annotator, which is not part of this package.")
    timeseries = _load(input_path, key, "input_path")
    _check_tiling(segmenter, tile_shape, halo)
    gap_closing = generate_kwargs.pop("gap_closing", None)
    min_time_extent = generate_kwargs.pop("min_time_extent", None)
    return automatic_tracking_implementation(
        timeseries, predictor, segmenter, embedding_path=embedding_path, gap_closing=gap_closing,
        min_time_extent=min_time_extent, mode=mode, tracking_model=tracking_model, tile_shape=tile_shape,
        halo=halo, verbose=verbose, return_embeddings=return_embeddings, batch_size=batch_size,
        output_folder=output_path, **generate_kwargs,
    )


def __getattr__(name: str):
    # micro_sam 1.8 exposes these two from here too; imported on first use to keep the start-up light.
    if name in ("automatic_3d_segmentation", "automatic_tracking_implementation"):
        from . import multi_dimensional_segmentation

        return getattr(multi_dimensional_segmentation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
                raise ValueError(f"No input images found in the folder {path!r}"
                                 + (f" with the pattern {pattern!r}." if pattern else "."))
            inputs.extend(found)
        elif os.path.exists(path):
            inputs.append(path)
        else:
            raise ValueError(f"The input path {path!r} does not exist.")
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
            raise ValueError(f"Unexpected argument {argument!r}; segmenter parameters are given as --name value.")
        name = argument[2:]
        if "=" in name:
            name, value = name.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(arguments):
                raise ValueError(f"The parameter {argument} needs a value.")
            value = arguments[i + 1]
            i += 2
        extra[name] = _parse_value(value)
    return extra


def _parameters(function) -> List[str]:
    skip = {"self", "predictor", "decoder"}
    return [name for name, p in inspect.signature(function).parameters.items()
            if name not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def _segmenter_classes(mode: str, tiled: bool):
    if mode == "amg":
        return TiledAutomaticMaskGenerator if tiled else AutomaticMaskGenerator
    if mode == "apg":
        return TiledAutomaticPromptGenerator if tiled else AutomaticPromptGenerator
    return TiledInstanceSegmentationWithDecoder if tiled else InstanceSegmentationWithDecoder


_VOLUME_PARAMETERS = ("gap_closing", "min_z_extent", "with_background", "min_time_extent")


def _split_extra(extra: Dict[str, Any], segmenter_class) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    init_names = set(_parameters(segmenter_class.__init__))
    generate_names = set(_parameters(segmenter_class.generate)) | set(_VOLUME_PARAMETERS)
    generate_names.discard("output_mode")
    unknown = sorted(set(extra) - init_names - generate_names)
    if unknown:
        raise ValueError(
            f"Unknown parameter(s) {', '.join('--' + u for u in unknown)} for {segmenter_class.__name__}; "
            f"valid: {', '.join('--' + n for n in sorted(init_names | generate_names))}."
        )
    init = {k: v for k, v in extra.items() if k in init_names}
    generate = {k: v for k, v in extra.items() if k not in init_names}
    return init, generate


def _build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="micro_sam.automatic_segmentation",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Segment all objects in images or volumes automatically and write label images (zlib-compressed tif).\n\n"
            "Modes: AIS (instance segmentation with the decoder of models such as vit_b_lm), APG (SAM prompted "
            "with points derived from the decoder) or AMG (SAM's automatic mask generation with a point grid; "
            "for models without a decoder).\n"
            "Existing outputs are skipped (with a message) unless --overwrite is given; results are written to a "
            "temporary file first and renamed when complete.\n\n"
            "Further segmenter parameters can be added as --name value, e.g.\n"
            "  AIS: --center_distance_threshold 0.5 --boundary_distance_threshold 0.5 --foreground_threshold 0.5\n"
            "       --foreground_smoothing 1.0 --distance_smoothing 1.6 --min_size 0\n"
            "  APG: --min_size 25 --nms_threshold 0.9 --multimasking true --refine_with_box_prompts true\n"
            "  AMG: --points_per_side 32 --points_per_batch 64 --pred_iou_thresh 0.88 --stability_score_thresh 0.95\n"
            "       --box_nms_thresh 0.7 --min_mask_region_area 0 --with_background true\n"
            "  volumes: --gap_closing N --min_z_extent N (3D merge of the per-slice segmentations)"
        ),
    )
    parser.add_argument("-i", "--input_path", required=True, nargs="+",
                        help="Image file(s) (tif, png, ...), container files (zarr, n5, hdf5; with --key) or folders "
                             "(all images in them, or those matching --pattern).")
    parser.add_argument("-o", "--output_path", required=True,
                        help="Output tif for a single input; otherwise (or if it is an existing folder) the folder "
                             "for <input name>.tif outputs.")
    parser.add_argument("-e", "--embedding_path", default=None,
                        help="Cache the image embeddings here (zarr; a folder of <input name>.zarr for several "
                             "inputs). Cached embeddings are reused.")
    parser.add_argument("--pattern", default=None, help="Glob pattern for the files in input folders, e.g. '*.tif'.")
    parser.add_argument("-k", "--key", default=None, help="Dataset key inside container inputs (zarr, n5, hdf5).")
    parser.add_argument("-m", "--model_type", default=util._DEFAULT_MODEL,
                        help=f"The model (default: {util._DEFAULT_MODEL}); a registered name or, with --checkpoint, "
                             "the architecture (vit_t, vit_b, vit_l, vit_h).")
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
                        help="Track objects over time instead (time series inputs (T, Y, X)). The output is a folder "
                             "in the Cell Tracking Challenge format. Linking: trackastra if installed and its model "
                             "can be had, else micro_sam's overlap linker (with a warning); see --tracking_model. "
                             "Further options: --gap_closing N --min_time_extent N.")
    parser.add_argument("--tracking_model", default="general_2d",
                        help="With --tracking: a trackastra pretrained model (default: general_2d), a trackastra "
                             "model folder, or 'overlap' for micro_sam's linker that needs no weights.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Show progress bars for each input.")
    return parser


def _plan_outputs(inputs: List[str], output_path: str, embedding_path: Optional[str], tracking: bool):
    """(input, output, embedding) paths: one output for one input, else a folder of <name>.tif outputs."""
    names = [Path(p.rstrip("/")).stem for p in inputs]
    # With --tracking the output of a single input is a folder itself (the CTC result), as in micro_sam 1.8.
    single = len(inputs) == 1 and (tracking or not os.path.isdir(output_path))
    if not single and len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"Several inputs have the same name {duplicates}; their outputs would collide.")
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


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point ``micro_sam.automatic_segmentation``."""
    from tqdm import tqdm

    parser = _build_parser()
    args, unknown = parser.parse_known_args(argv)
    try:
        extra = _parse_extra(unknown)
        if (args.tile_shape is None) != (args.halo is None):
            raise ValueError("--tile_shape and --halo must be given together.")
        inputs = _collect_inputs(args.input_path, args.pattern)
        plan = _plan_outputs(inputs, args.output_path, args.embedding_path, args.tracking)
    except ValueError as error:
        parser.error(str(error))

    todo = []
    for path, out, emb in plan:
        if out.exists() and not args.overwrite:
            print(f"Skipping {path!r}: the output {os.fspath(out)!r} exists (use --overwrite to replace it).")
        else:
            todo.append((path, out, emb))
    if not todo:
        return 0

    try:
        predictor, state = util.get_sam_model(model_type=args.model_type, device=util.get_device(args.device),
                                              checkpoint_path=args.checkpoint, return_state=True)
        has_decoder = isinstance(state, dict) and state.get("decoder_state") is not None
        mode = args.mode if args.mode != "auto" else (DEFAULT_SEGMENTATION_MODE_WITH_DECODER if has_decoder else "amg")
        tiled = args.tile_shape is not None
        init_kwargs, generate_kwargs = _split_extra(extra, _segmenter_classes(mode, tiled))
        predictor, segmenter = get_predictor_and_segmenter(
            model_type=args.model_type, segmentation_mode=mode, is_tiled=tiled, predictor=predictor, state=state,
            **init_kwargs,
        )
    except ValueError as error:
        parser.error(str(error))

    tile_shape = None if args.tile_shape is None else tuple(args.tile_shape)
    halo = None if args.halo is None else tuple(args.halo)
    description = "Automatic tracking" if args.tracking else f"Automatic segmentation ({mode.upper()})"
    failed = []
    for path, out, emb in tqdm(todo, desc=description):
        if emb is not None:
            Path(emb).parent.mkdir(parents=True, exist_ok=True)
        try:
            if args.tracking:
                tracks, _ = automatic_tracking(
                    predictor, segmenter, path, output_path=os.fspath(out), embedding_path=emb, key=args.key,
                    tile_shape=tile_shape, halo=halo, verbose=args.verbose, batch_size=args.batch_size,
                    tracking_model=args.tracking_model, **generate_kwargs)
                tqdm.write(f"{path} -> {os.fspath(out)} ({len(np.unique(tracks)) - 1} tracks)")
                continue
            image = util.load_image_data(path, args.key)
            labels = automatic_instance_segmentation(
                predictor, segmenter, image, output_path=out, embedding_path=emb, ndim=args.ndim,
                tile_shape=tile_shape, halo=halo, verbose=args.verbose, batch_size=args.batch_size,
                overwrite=True, **generate_kwargs,
            )
            if args.overlay:
                from ._image import infer_ndim

                _write_overlay(out.with_name(f"{out.stem}_overlay.png"), image, labels, infer_ndim(image, args.ndim))
        except ValueError as error:
            tqdm.write(f"Error for {path!r}: {error}", file=sys.stderr)
            failed.append(path)
            continue
        tqdm.write(f"{path} -> {os.fspath(out)} ({int(labels.max())} objects)")
    if failed:
        print(f"{len(failed)} of {len(todo)} input(s) failed: {', '.join(map(repr, failed))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
