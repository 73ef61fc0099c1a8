"""What runs on the workers: the model, loaded once per worker process, and the small task functions.

The model never travels through the task graph: tasks carry a :class:`ModelSpec` (names and paths) and call
:func:`load_model`, which loads the model the first time a worker needs it and keeps it for all later tasks.
The task functions are plain functions of their arguments; they only use numpy, zarr and the library.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from .. import _tiling
from . import _stitching
from ._io import open_input

__all__ = ["ModelSpec", "load_model", "model_load_count"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything a worker needs to load the model and build the segmenter (small and picklable).

    Attributes:
        model_type: A registered model name or, with ``checkpoint``, its architecture.
        checkpoint: A checkpoint file the workers can read (shared file system), or None for the registered
            weights (found in ``MICROSAM_CACHEDIR`` or downloaded by each worker).
        device: The workers' device (None: the best available on each worker).
        segmentation_mode: "ais", "apg", "amg" or None (AIS if the model has a decoder, else AMG).
        is_tiled: Whether the segmenter works on tiled embeddings.
        segmenter_kwargs: Arguments of the segmenter class, as sorted (name, value) pairs.
        factory: Instead of the above, a picklable callable ``factory(is_tiled) -> (predictor, segmenter)``
            for a model of your own (called once per worker).
    """

    model_type: str
    checkpoint: Optional[str] = None
    device: Optional[str] = None
    segmentation_mode: Optional[str] = None
    is_tiled: bool = False
    segmenter_kwargs: Tuple[Tuple[str, Any], ...] = ()
    factory: Optional[Callable] = field(default=None, compare=True)

    def describe(self) -> Dict[str, Any]:
        """A JSON-able description (recorded with blockwise outputs to recognise a run)."""
        factory = None if self.factory is None else \
            f"{getattr(self.factory, '__module__', '')}.{getattr(self.factory, '__qualname__', repr(self.factory))}"
        return {"model_type": self.model_type, "checkpoint": None if self.checkpoint is None else
                os.path.abspath(self.checkpoint), "segmentation_mode": self.segmentation_mode,
                "is_tiled": self.is_tiled, "segmenter_kwargs": {k: v for k, v in self.segmenter_kwargs},
                "factory": factory}


@dataclass
class _Loaded:
    predictor: Any
    segmenter: Any
    lock: threading.Lock


_MODELS: Dict[ModelSpec, _Loaded] = {}
_LOADS: Dict[ModelSpec, int] = {}
_MODELS_LOCK = threading.Lock()


def load_model(spec: ModelSpec) -> _Loaded:
    """The predictor and segmenter of ``spec``, loaded on the first call in this process and kept.

    Returns:
        An object with ``predictor``, ``segmenter`` and ``lock`` (hold it while using them: worker threads
        share the model, and a predictor holds the state of one image at a time).
    """
    with _MODELS_LOCK:
        loaded = _MODELS.get(spec)
        if loaded is None:
            if spec.factory is not None:
                predictor, segmenter = spec.factory(spec.is_tiled)
            else:
                from ..automatic_segmentation import get_predictor_and_segmenter

                predictor, segmenter = get_predictor_and_segmenter(
                    model_type=spec.model_type, checkpoint=spec.checkpoint, device=spec.device,
                    segmentation_mode=spec.segmentation_mode, is_tiled=spec.is_tiled, **dict(spec.segmenter_kwargs),
                )
            loaded = _MODELS[spec] = _Loaded(predictor, segmenter, threading.Lock())
            _LOADS[spec] = _LOADS.get(spec, 0) + 1
    return loaded


def model_load_count(spec: Optional[ModelSpec] = None) -> int:
    """How often this process has loaded the model of ``spec`` (or any model): once per worker and model."""
    return int(_LOADS.get(spec, 0) if spec is not None else sum(_LOADS.values()))


def _set_threads() -> None:
    threads = os.environ.get("OMP_NUM_THREADS")  # set per worker by the local cluster: the cores it may use
    if threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))


def _segment(spec: ModelSpec, image, ndim: int, tile_shape, halo, generate_kwargs) -> np.ndarray:
    from ..automatic_segmentation import automatic_instance_segmentation

    loaded = load_model(spec)
    _set_threads()
    with loaded.lock:
        labels = automatic_instance_segmentation(
            loaded.predictor, loaded.segmenter, image, ndim=ndim, tile_shape=tile_shape, halo=halo, verbose=False,
            **dict(generate_kwargs),
        )
    return np.asarray(labels)


# --- many images ---------------------------------------------------------------------------------------------
def segment_file(spec: ModelSpec, input_path: str, key: Optional[str], output_path: str, ndim: Optional[int],
                 tile_shape, halo, generate_kwargs) -> Tuple[str, int]:
    """Segment one image file and write its label image (a temporary file, renamed when complete).

    Returns:
        The output path and the number of objects.
    """
    from pathlib import Path

    from .. import util
    from .._image import infer_ndim
    from ..automatic_segmentation import _write_labels

    image = util.load_image_data(input_path, key)
    labels = _segment(spec, image, infer_ndim(image, ndim), tile_shape, halo, generate_kwargs)
    _write_labels(Path(output_path), labels)
    return output_path, int(labels.max())


# --- one large image -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Blocking:
    """The block layout of a blockwise run (see ``micro_sam._tiling``; one value per spatial axis)."""

    shape: Tuple[int, ...]
    block_shape: Tuple[int, ...]
    halo: Tuple[int, ...]

    @property
    def n_blocks(self) -> int:
        """Number of blocks."""
        return _tiling.n_tiles(self.shape, self.block_shape)

    @property
    def grid(self) -> Tuple[int, ...]:
        """Blocks along each axis."""
        return _tiling.grid_shape(self.shape, self.block_shape)

    def block(self, block_id: int) -> _tiling.Tile:
        """The geometry of block ``block_id`` (C order)."""
        return _tiling.get_tile(block_id, self.shape, self.block_shape, self.halo)

    def position(self, block_id: int) -> Tuple[int, ...]:
        """The block's position in the block grid."""
        return tuple(int(p) for p in np.unravel_index(block_id, self.grid))

    def skirt_region(self, block_id: int, axis: int, side: int) -> Tuple[slice, ...]:
        """Where the skirt of the face (``block_id``'s ``side`` along ``axis``) is stored in the skirt arrays.

        Skirt arrays have the image shape except along ``axis``: ``halo[axis]`` entries per face, face ``i``
        being the one between blocks ``i`` and ``i + 1`` along the axis.
        """
        block = self.block(block_id)
        region = _stitching.face_regions(block, axis, side, self.shape, self.halo)
        face = self.position(block_id)[axis] - (1 if side < 0 else 0)
        length = region[axis].stop - region[axis].start
        region = list(region)
        region[axis] = slice(face * self.halo[axis], face * self.halo[axis] + length)
        return tuple(region)

    def skirt_shape(self, axis: int) -> Tuple[int, ...]:
        """Shape of the skirt arrays along ``axis``."""
        shape = list(self.shape)
        shape[axis] = max(self.grid[axis] - 1, 1) * self.halo[axis]
        return tuple(shape)

    def skirt_chunks(self, axis: int) -> Tuple[int, ...]:
        """Chunks of the skirt arrays along ``axis``: one face per chunk along it, the block shape across."""
        chunks = list(self.block_shape)
        chunks[axis] = max(self.halo[axis], 1)
        return tuple(chunks)


def _open(path: str, name: str, mode: str = "r+"):
    import zarr

    return zarr.open_array(os.path.join(path, name), mode=mode)


def uses_decoder_maps(spec: ModelSpec) -> bool:
    """Whether the model's segmenter is decoder-based (AIS), so that tiled blocks can be segmented from decoder
    maps on the whole image's tile grid (2D, or per slice of a volume)."""
    from ..instance_segmentation import InstanceSegmentationWithDecoder

    return isinstance(load_model(spec).segmenter, InstanceSegmentationWithDecoder)


class _Slice:
    """A 2D view (``shape`` (Y, X[, C])) of slice ``z`` of a lazily read volume: reads only what is sliced."""

    def __init__(self, data, z: int):
        self._data, self._z = data, z
        self.shape = tuple(data.shape[1:])

    def __getitem__(self, index):
        return np.asarray(self._data[(self._z,) + tuple(index)])


def compute_block_maps(spec: ModelSpec, input_path: str, key: Optional[str], blocking: Blocking,
                       output_path: str, work: str, block_id: int, tile_shape, halo) -> int:
    """Tiled AIS: compute the decoder maps of a block's inner region on the whole image's tile grid.

    Every tile of the image's grid (``tile_shape``, ``halo``, as a single-process tiled run lays them out) that
    overlaps the block's inner region is encoded and decoded (in every slice of the block, for a volume), and
    its maps are written where it overlaps the block: the map array then equals the single-process run's maps,
    whatever the block shape. Blocks are then segmented from these maps over their outer regions
    (:func:`segment_block`), so that two neighbouring blocks see the same maps in their overlap and cut objects
    the same way. Marks the block in ``maps_done``.

    Only for decoder-based segmenters (:func:`uses_decoder_maps`).

    Returns:
        The block id.
    """
    from ..instance_segmentation.ais import background_maps
    from ..instance_segmentation.tiled import decoder_maps_of_tile

    ndim = len(blocking.shape)
    block = blocking.block(block_id)
    data = open_input(input_path, key)  # read lazily, tile by tile
    loaded = load_model(spec)
    _set_threads()
    slices = [(None, data)] if ndim == 2 else \
        [(z, _Slice(data, z)) for z in range(block.inner[0].start, block.inner[0].stop)]
    inner = block.inner[-2:]
    # The block's maps are gathered in memory (3 float32 values per pixel of the block) and written at once.
    block_maps = np.empty((3,) + tuple(s.stop - s.start for s in block.inner), dtype="float32")
    for tile in _tiling.iterate_tiles(blocking.shape[-2:], tile_shape, halo):
        overlap = tuple(slice(max(t.start, b.start), min(t.stop, b.stop)) for t, b in zip(tile.inner, inner))
        if any(o.start >= o.stop for o in overlap):
            continue
        in_tile = tuple(slice(o.start - t.start, o.stop - t.start) for o, t in zip(overlap, tile.inner))
        in_block = tuple(slice(o.start - b.start, o.stop - b.start) for o, b in zip(overlap, inner))
        for k, (z, image) in enumerate(slices):
            with loaded.lock:
                tile_maps = decoder_maps_of_tile(loaded.predictor, loaded.segmenter._decoder, image, tile)
            where = (slice(None),) + ((k,) if z is not None else ()) + in_block
            block_maps[where] = background_maps([o.stop - o.start for o in overlap]) \
                if tile_maps is None else tile_maps[(slice(None),) + in_tile]  # (no signal: background, as the library)
    _open(output_path, f"{work}/maps")[(slice(None),) + block.inner] = block_maps
    _open(output_path, f"{work}/maps_done")[blocking.position(block_id)] = 1
    return block_id


def _segment_from_maps(spec: ModelSpec, maps: np.ndarray, ndim: int, generate_kwargs) -> np.ndarray:
    """The watershed on (3, [Z,] Y, X) maps; a volume slice by slice (ids unique across slices), then merged
    in 3D as ``automatic_3d_segmentation`` does."""
    from ..instance_segmentation._volume import stack_slice_segmentations
    from ..multi_dimensional_segmentation import merge_instance_segmentation_3d

    kwargs = dict(generate_kwargs)
    merge = {name: kwargs.pop(name) for name in ("gap_closing", "min_z_extent", "with_background") if name in kwargs}
    loaded = load_model(spec)
    stack = maps[:, None] if ndim == 2 else maps
    segmenter = loaded.segmenter

    def segment_slice(z: int) -> np.ndarray:
        segmenter.set_state({"foreground": stack[0, z], "center_distances": stack[1, z],
                             "boundary_distances": stack[2, z]})
        return segmenter.generate(output_mode="instance_segmentation", **kwargs)

    with loaded.lock:
        try:
            labels = stack_slice_segmentations(segment_slice, stack.shape[1:])
        finally:
            segmenter.clear_state()
    if ndim == 2:
        return labels[0]
    return merge_instance_segmentation_3d(labels, beta=0.5, verbose=False, **merge)


def segment_block(spec: ModelSpec, input_path: str, key: Optional[str], ndim: int, blocking: Blocking,
                  output_path: str, work: str, block_id: int, tile_shape, halo, generate_kwargs,
                  from_maps: bool = False) -> int:
    """Segment one block (on its outer region) and write its inner labels, skirts and object count.

    With ``from_maps`` the block is segmented from the decoder maps written by :func:`compute_block_maps`
    (those of its outer region, i.e. also of its neighbours' overlap); otherwise the block's outer region is
    segmented as an image of its own (with tiles laid out within it).

    The count is written last: a block with a count is complete. Writing a block again gives the same data.

    Returns:
        The number of objects of the block.
    """
    block = blocking.block(block_id)
    if from_maps:
        maps = np.asarray(_open(output_path, f"{work}/maps", "r")[(slice(None),) + block.outer])
        labels = _segment_from_maps(spec, maps, ndim, generate_kwargs)
    else:
        image = np.asarray(open_input(input_path, key)[block.outer])
        labels = _segment(spec, image, ndim, tile_shape, halo, generate_kwargs)
    part = _stitching.crop_block(labels, block, blocking.shape, blocking.halo)
    _open(output_path, f"{work}/local")[block.inner] = part.inner
    for (axis, side), skirt in part.skirts.items():
        name = f"{work}/skirt_{axis}_{'below' if side < 0 else 'above'}"
        _open(output_path, name)[blocking.skirt_region(block_id, axis, side)] = skirt
    _open(output_path, f"{work}/n_objects")[blocking.position(block_id)] = part.n_objects
    return part.n_objects


def match_face(output_path: str, work: str, blocking: Blocking, lower: int, upper: int, axis: int,
               iou_threshold: float) -> Tuple[int, int, np.ndarray]:
    """Match the objects of two neighbouring blocks across their face (see ``_stitching.match_face``)."""
    local = _open(output_path, f"{work}/local", "r")
    lower_strip = _stitching.face_regions(blocking.block(upper), axis, -1, blocking.shape, blocking.halo)
    upper_strip = _stitching.face_regions(blocking.block(lower), axis, +1, blocking.shape, blocking.halo)
    pairs = _stitching.match_face(
        lower_inner=local[lower_strip],
        lower_skirt=_open(output_path, f"{work}/skirt_{axis}_above", "r")[blocking.skirt_region(lower, axis, +1)],
        upper_inner=local[upper_strip],
        upper_skirt=_open(output_path, f"{work}/skirt_{axis}_below", "r")[blocking.skirt_region(upper, axis, -1)],
        iou_threshold=iou_threshold,
    )
    return lower, upper, pairs


def relabel_block(output_path: str, work: str, key: str, blocking: Blocking, block_id: int,
                  lut: np.ndarray) -> int:
    """Write a block's final labels (its local labels through its lookup table) and mark it done."""
    block = blocking.block(block_id)
    local = _open(output_path, f"{work}/local", "r")[block.inner]
    _open(output_path, key)[block.inner] = np.asarray(lut, dtype="uint32")[local]
    _open(output_path, f"{work}/relabelled")[blocking.position(block_id)] = 1
    return block_id


def read_markers(output_path: str, work: str, name: str) -> np.ndarray:
    """A marker array of the work group (per block, C order), flattened."""
    return np.asarray(_open(output_path, f"{work}/{name}", "r")[...]).ravel()


def ensure_block_arrays(output_path: str, work: str, key: str, blocking: Blocking,
                        attributes: Dict[str, Any], with_maps: bool = False) -> None:
    """Create the output group, the label array ``key`` and the work arrays (local labels, skirts, markers;
    with ``with_maps`` the (3, ...) float32 decoder maps of tiled 2D AIS)."""
    import zarr

    root = zarr.open_group(output_path, mode="a")
    chunks = tuple(blocking.block_shape)
    if key not in root:
        root.create_array(key, shape=blocking.shape, chunks=chunks, dtype="uint32", fill_value=0)
    group = root.require_group(work)
    if with_maps and "maps" not in group:
        group.create_array("maps", shape=(3,) + blocking.shape, chunks=(3,) + chunks, dtype="float32",
                           fill_value=0)
    if "local" not in group:
        group.create_array("local", shape=blocking.shape, chunks=chunks, dtype="uint32", fill_value=0)
    for axis in range(len(blocking.shape)):
        for side in ("below", "above"):
            if f"skirt_{axis}_{side}" not in group:
                group.create_array(f"skirt_{axis}_{side}", shape=blocking.skirt_shape(axis),
                                   chunks=blocking.skirt_chunks(axis), dtype="uint32", fill_value=0)
    marker_chunks = (1,) * len(blocking.grid)
    if "n_objects" not in group:
        group.create_array("n_objects", shape=blocking.grid, chunks=marker_chunks, dtype="int64", fill_value=-1)
    if "maps_done" not in group:
        group.create_array("maps_done", shape=blocking.grid, chunks=marker_chunks, dtype="uint8", fill_value=0)
    if "relabelled" not in group:
        group.create_array("relabelled", shape=blocking.grid, chunks=marker_chunks, dtype="uint8", fill_value=0)
    root.attrs.update(attributes)

