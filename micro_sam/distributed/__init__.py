"""Automatic segmentation on a dask cluster: many images, or one image / volume larger than memory.

- :func:`segment_images`: a list, folder or glob of images, one label image per input, spread over the workers.
- :func:`segment_blockwise`: one large image or volume (zarr, OME-Zarr, n5, tif, hdf5) in blocks with a halo,
  written blockwise into a zarr array and stitched into one label image.

Both run on a ``LocalCluster`` on this machine by default, or on an existing dask scheduler (``scheduler=
"tcp://host:8786"``, e.g. a SLURM cluster started with dask-jobqueue). Each worker loads the model once and
keeps it; finished work is recorded on disk, so an interrupted run resumes where it stopped. The command line
is ``micro_sam.distributed_segmentation`` (see ``--help``). Needs the ``distributed`` extra
(``pip install micro_sam[distributed]``): this package is the only part of micro_sam that imports
``dask.distributed``.
"""
from ._stitching import iterate_blocks, stitch_blocks
from .batch import segment_images
from .blockwise import segment_blockwise

__all__ = ["segment_images", "segment_blockwise", "stitch_blocks", "iterate_blocks"]
