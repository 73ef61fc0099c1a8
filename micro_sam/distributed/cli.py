"""Command line ``micro_sam.distributed_segmentation``: automatic segmentation on a dask cluster.

::

    micro_sam.distributed_segmentation images -i plate/ --pattern "*.tif" -o labels/ -m vit_b_lm
    micro_sam.distributed_segmentation blockwise -i volume.zarr -k raw -o labels.zarr --block_shape 32 512 512
    micro_sam.distributed_segmentation blockwise -i slide.tif -o slide_labels.zarr --scheduler tcp://10.0.0.5:8786

Errors are one line on stderr; exit codes: 0 done, 1 the work failed, 2 invalid arguments or inputs,
130 interrupted (rerun the same command to finish what is missing).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

__all__ = ["main"]

_PROG = "micro_sam.distributed_segmentation"


class _UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Raise a one-line usage error instead of printing the usage and exiting."""
        raise _UsageError(f"{message} (see {self.prog} --help)")


def _common(parser: argparse.ArgumentParser) -> None:
    from .. import util

    parser.add_argument("-m", "--model_type", default=util._DEFAULT_MODEL,
                        help=f"A registered model (default: {util._DEFAULT_MODEL}) or, with --checkpoint, the "
                             "architecture. Workers find registered models in MICROSAM_CACHEDIR.")
    parser.add_argument("-c", "--checkpoint", default=None,
                        help="A checkpoint file; every worker must be able to read this path.")
    parser.add_argument("--mode", default="auto", choices=["auto", "ais", "apg", "amg"],
                        help="Segmentation mode (default: AIS if the model has a decoder, else AMG).")
    parser.add_argument("-k", "--key", default=None, help="Dataset key inside container inputs (zarr, n5, hdf5).")
    parser.add_argument("-n", "--ndim", type=int, default=None, choices=[2, 3],
                        help="2 for images, 3 for volumes; inferred by default.")
    parser.add_argument("--tile_shape", nargs=2, type=int, default=None, metavar=("Y", "X"),
                        help="Segment each image (or block) in tiles of this shape. blockwise with AIS: the "
                             "tiles are laid out on the whole image (every slice of a volume), so that blocks "
                             "agree at their faces; recommended with a real model (e.g. 512 512).")
    parser.add_argument("--halo", nargs=2, type=int, default=None, metavar=("Y", "X"),
                        help="Overlap of these tiles (required with --tile_shape).")
    parser.add_argument("--scheduler", default=None,
                        help="Address of a running dask scheduler (tcp://host:port); default: start a local "
                             "cluster on 127.0.0.1.")
    parser.add_argument("--n_workers", type=int, default=None,
                        help="Worker processes of the local cluster (default: one per core, at most 4).")
    parser.add_argument("-d", "--device", default=None, help="The workers' device (default: the best available).")
    parser.add_argument("--retries", type=int, default=2, help="Retries of a failed task (default: 2).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Recompute and replace outputs written with other settings.")
    parser.add_argument("--segmenter_factory", default=None, metavar="MODULE:FUNCTION",
                        help="Your own model: a function factory(is_tiled) -> (predictor, segmenter) that the "
                             "workers import and call once each (instead of --model_type / --checkpoint).")
    parser.add_argument("-q", "--quiet", action="store_true", help="No dashboard link, progress bars or messages.")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=_PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Automatic segmentation on a dask cluster (a local cluster by default, or --scheduler).\n\n"
            "  images:    many images -> one label image (tif) per input in the output folder\n"
            "  blockwise: one large image or volume (zarr, OME-Zarr, n5, tif, hdf5) -> one zarr label array,\n"
            "             segmented in blocks with a halo and stitched\n\n"
            "Finished work is kept: rerun the same command after an interruption to finish the rest.\n"
            "Further segmenter parameters can be added as --name value (e.g. --center_distance_threshold 0.5)."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    images = commands.add_parser("images", help="Segment many images, one label image each.")
    images.add_argument("-i", "--input_path", required=True, nargs="+",
                        help="Image files, folders or glob patterns (quote them: 'plate/*.tif').")
    images.add_argument("-o", "--output_path", required=True, help="Output folder for <input name>.tif.")
    images.add_argument("--pattern", default=None, help="Glob pattern for the files in input folders.")
    _common(images)
    blockwise = commands.add_parser("blockwise", help="Segment one large image or volume in blocks.")
    blockwise.add_argument("-i", "--input_path", required=True,
                           help="zarr / OME-Zarr / n5 container, tif or hdf5 file.")
    blockwise.add_argument("-o", "--output_path", required=True, help="Output zarr group.")
    blockwise.add_argument("--output_key", default="segmentation", help="Label array in the output group.")
    blockwise.add_argument("--block_shape", nargs="+", type=int, default=None,
                           help="Block shape (Y X or Z Y X); default 1024 1024 / 32 512 512.")
    blockwise.add_argument("--block_halo", nargs="+", type=int, default=None,
                           help="Overlap each block sees of its neighbours; default 128 128 / 4 64 64.")
    blockwise.add_argument("--iou_threshold", type=float, default=0.5,
                           help="Objects of neighbouring blocks are joined above this overlap (default 0.5).")
    blockwise.add_argument("--keep_intermediates", action="store_true",
                           help="Keep the work arrays (per-block labels and markers) after completion.")
    _common(blockwise)
    return parser


def _split_extra(unknown: List[str]):
    from ..automatic_segmentation import _parameters, _parse_extra, _segmenter_classes

    extra = _parse_extra(unknown)
    init_names = set()
    for mode in ("ais", "apg", "amg"):
        for tiled in (False, True):
            init_names |= set(_parameters(_segmenter_classes(mode, tiled).__init__))
    segmenter_kwargs = {k: v for k, v in extra.items() if k in init_names}
    generate_kwargs = {k: v for k, v in extra.items() if k not in init_names}
    return segmenter_kwargs, generate_kwargs


def _import_factory(name: Optional[str]):
    import importlib

    if name is None:
        return None
    module, _, function = name.partition(":")
    if not module or not function:
        raise _UsageError(f"--segmenter_factory must be MODULE:FUNCTION, got {name!r}.")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as error:
        raise _UsageError(f"Cannot import the segmenter factory {name!r}: {error}") from None


def _run(argv: Optional[List[str]]) -> int:
    from .batch import segment_images
    from .blockwise import segment_blockwise

    args, unknown = _build_parser().parse_known_args(argv)
    try:
        segmenter_kwargs, generate_kwargs = _split_extra(unknown)
    except ValueError as error:
        raise _UsageError(str(error)) from None
    common = dict(
        model_type=args.model_type, checkpoint=args.checkpoint, segmentation_mode=args.mode, key=args.key,
        ndim=args.ndim, tile_shape=args.tile_shape, halo=args.halo, scheduler=args.scheduler,
        n_workers=args.n_workers, device=args.device, retries=args.retries, overwrite=args.overwrite,
        verbose=not args.quiet, segmenter_kwargs=segmenter_kwargs,
        segmenter_factory=_import_factory(args.segmenter_factory), **generate_kwargs,
    )
    if args.command == "images":
        outputs = segment_images(args.input_path, args.output_path, pattern=args.pattern, **common)
        if not args.quiet:
            print(f"{len(outputs)} label image(s) in {os.path.abspath(args.output_path)!r}.")
        return 0
    segment_blockwise(args.input_path, args.output_path, output_key=args.output_key, block_shape=args.block_shape,
                      block_halo=args.block_halo, iou_threshold=args.iou_threshold,
                      keep_intermediates=args.keep_intermediates, **common)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point ``micro_sam.distributed_segmentation``; returns the exit code."""
    try:
        return _run(argv)
    except _UsageError as error:
        print(f"{_PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted; finished work is kept, rerun the same command to do the rest.",
              file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as error:
        message = " ".join(str(error).split())
        print(f"{_PROG}: error: {message}", file=sys.stderr)
        return 2 if isinstance(error, ValueError) else 1


if __name__ == "__main__":
    sys.exit(main())
