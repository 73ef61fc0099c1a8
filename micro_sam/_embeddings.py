"""Image embeddings: computation (2D, 3D, tiled) and the zarr cache in micro_sam 1.8's layout.

Cache layout (a zarr group, compatible with micro_sam 1.8 in both directions; 64 x 64 is the embedding grid of
SAM's 1024 input, a vit_t model built for input size 512 has 32 x 32):

- untiled 2D: array ``features`` of shape (1, 256, 64, 64);
- untiled 3D: array ``features`` of shape (Z, 1, 256, 64, 64), one chunk per slice;
- tiled 2D: group ``features`` with one array per tile, named by the tile id, of shape (1, 256, 64, 64);
- tiled 3D: group ``features`` with one array per tile of shape (Z, 1, 256, 64, 64);
- tile arrays carry ``original_size`` / ``input_size`` attributes, the ``features`` group ``shape``,
  ``tile_shape``, ``halo`` (and ``tiles_in_mask`` when a mask restricted the computation);
- root attributes ``data_signature``, ``tile_shape``, ``halo``, ``model_type``, ``model_name``, ``model_hash``,
  ``micro_sam_version``, ``input_size``, ``original_size``. ``input_size`` is written last: a cache without it
  is incomplete and is resumed (slices or tiles already present are not computed again).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _tiling
from ._image import data_signature as _data_signature
from ._image import infer_ndim, to_image, validate_array

ImageEmbeddings = Dict[str, Any]
_SIGNATURE_KEYS = ("data_signature", "tile_shape", "halo", "model_type", "model_name", "model_hash")
_STRICT_KEYS = ("data_signature", "tile_shape", "halo", "model_type", "model_hash")


# --- progress bars ---------------------------------------------------------------------------------------
def handle_pbar(verbose: bool, pbar_init: Optional[Callable], pbar_update: Optional[Callable]):
    """Progress callbacks for a function that does long work.

    Returns ``(pbar, init, update, close)``: with ``verbose=False`` no-ops; with the caller's ``pbar_init`` and
    ``pbar_update`` those (``close`` a no-op); otherwise ``init(total, description)`` opens a named bar
    (:func:`micro_sam._progress.progress_bar`: tqdm on a terminal, plain lines in logs), ``update(n)`` advances
    it and ``close()`` closes it. No bar is shown before ``init`` is called; ``pbar`` is None (kept for
    micro_sam's signature).
    """

    def noop(*args, **kwargs):
        return None

    if not verbose:
        return None, noop, noop, noop
    if pbar_init is not None:
        if pbar_update is None:
            raise ValueError("pbar_init was given without pbar_update; pass both callbacks or neither.")
        return None, pbar_init, pbar_update, noop
    from ._progress import progress_bar

    bars = []

    def init(total, description):
        close()
        bars.append(progress_bar(total, description))

    def update(n=1):
        if bars:
            bars[-1].update(n)

    def close():
        while bars:
            bars.pop().close()

    return None, init, update, close


# --- the encoder -----------------------------------------------------------------------------------------
def encode_images(predictor, images: Sequence[np.ndarray]):
    """Run SAM's image encoder on a batch of uint8 (H, W, 3) images.

    Uses the predictor's own resize transform and preprocessing, so features equal ``SamPredictor.set_image``.
    The predictor is left set to the last image of the batch.

    Returns:
        features (B, 256, 64, 64) float32 torch tensor on the predictor's device, and the lists of original
        sizes (H, W) and input sizes (resized H, W).
    """
    import torch

    from ._segment_anything import resize_longest_side
    from .models.precision import encoder_precision

    sam = predictor.model
    tensors, original_sizes, input_sizes = [], [], []
    for image in images:
        resized = resize_longest_side(image, predictor.transform.target_length)  # = transform.apply_image
        tensor = torch.as_tensor(resized, device=predictor.device).permute(2, 0, 1).contiguous()[None]
        original_sizes.append(tuple(image.shape[:2]))
        input_sizes.append(tuple(tensor.shape[-2:]))
        tensors.append(sam.preprocess(tensor))
    batch = torch.cat(tensors)
    dtype = getattr(predictor, "_encoder_dtype", None)
    with torch.inference_mode(), encoder_precision(dtype, batch.device.type):
        features = sam.image_encoder(batch).float()
    predictor.reset_image()
    predictor.features = features[-1:].clone()
    predictor.original_size, predictor.input_size = original_sizes[-1], input_sizes[-1]
    predictor.is_image_set = True
    return features, original_sizes, input_sizes


# --- the zarr cache --------------------------------------------------------------------------------------
def _as_list(value):
    return None if value is None else [int(v) for v in value]


def _signature(predictor, signature: str, tile_shape, halo) -> Dict[str, Any]:
    from .__version__ import __version__

    return {
        "data_signature": signature,
        "tile_shape": _as_list(tile_shape),
        "halo": _as_list(halo),
        "model_type": getattr(predictor, "model_type", None),
        "model_name": getattr(predictor, "model_name", None),
        "model_hash": getattr(predictor, "_hash", None),
        "micro_sam_version": __version__,
    }


def _check_signature(f, expected: Dict[str, Any], save_path) -> None:
    """Raise if an existing cache belongs to another image, model or tiling. Nothing is written."""
    attrs = dict(f.attrs)
    if "data_signature" not in attrs:
        return  # new, or a partial cache written by micro_sam (which stores its signature at the end)
    for key in _STRICT_KEYS:
        saved, new = attrs.get(key), expected[key]
        if key in ("tile_shape", "halo"):
            saved = _as_list(saved)
        if key in ("model_hash", "model_type") and (saved is None or new is None):
            # Not recorded (yet): another process that writes the same cache at this moment may not have stored
            # its model attributes; an absent value proves no mismatch.
            continue
        if saved != new:
            what = {"data_signature": "image data"}.get(key, key)
            raise RuntimeError(
                f"The embeddings in {os.fspath(save_path)!r} were computed for another {what}: saved "
                f"{key}={saved!r}, requested {key}={new!r}. Use a new save_path or delete the old embeddings; "
                "nothing was overwritten."
            )


def _open_cache(save_path):
    import zarr

    if save_path is None:
        return zarr.group()
    save_path = os.fspath(save_path)
    if os.path.exists(save_path) and not os.path.isdir(save_path):
        raise ValueError(f"save_path {save_path!r} exists and is not a zarr directory.")
    try:
        return zarr.open_group(save_path, mode="a")
    except zarr.errors.ContainsGroupError:  # another process created the cache at the same moment
        return zarr.open_group(save_path, mode="r+")


def _create_array(group, name: str, shape, chunks):
    """A float32 array for embeddings; an existing one of the same layout is reused (and overwritten by the caller).

    Reusing instead of deleting and re-creating keeps two processes that write the same cache at once (two
    commands on one image) from removing each other's arrays: both write the same values.
    """
    import zarr

    def existing():
        array = group[name]
        return array if (tuple(array.shape), tuple(array.chunks)) == (tuple(shape), tuple(chunks)) else None

    if name in group:
        array = existing()
        if array is not None:
            return array
        del group[name]
    try:
        return group.create_array(name, shape=tuple(shape), chunks=tuple(chunks), dtype="float32", fill_value=0.0)
    except zarr.errors.ContainsArrayError:  # created by another writer in the meantime
        array = existing()
        if array is None:
            raise
        return array


def _is_computed(array, index=None) -> bool:
    """Whether a cached slice / tile holds embeddings (False also for a chunk that cannot be read)."""
    try:
        data = array[index] if index is not None else array[...]
    except Exception:  # noqa: BLE001 - a damaged chunk (zarr/numcodecs raise RuntimeError, ValueError, ...)
        return False
    return bool(np.any(data))


def _cache_location(array) -> str:
    """'<cache folder>' of a zarr array, for messages (the array's own path if the store has no root)."""
    root = getattr(getattr(array, "store", None), "root", None)
    return repr(os.fspath(root)) if root is not None else repr(getattr(array, "name", "the embeddings"))


def _damaged_cache_message(array, where: str, error) -> str:
    return (f"The embedding cache {_cache_location(array)} is damaged: {where} cannot be read ({error}); a full "
            "disk or an interrupted copy leaves caches like this. Delete the cache folder (or pass another "
            "embedding path) and run again to recompute it.")


def _read_complete(f, lazy_loading: bool):
    """The features of a complete 2D / 3D cache, or None (with a warning) if part of it is damaged or missing.

    A damaged chunk cannot be decompressed; a missing chunk reads as zeros, which an encoder never outputs.
    """
    import warnings

    features = f["features"]
    if lazy_loading:
        return features
    try:
        data = features[...]
        missing = [z for z in range(data.shape[0]) if not data[z].any()] if data.ndim == 5 else \
            ([0] if not data.any() else [])
        problem = f"the embeddings of slice(s) {missing} are missing" if missing else None
    except Exception as error:  # noqa: BLE001 - decompression / decoding errors of a damaged chunk
        data, problem = None, f"a chunk cannot be read ({error})"
    if problem is None:
        return data
    warnings.warn(f"The embedding cache {_cache_location(f)} is damaged ({problem}); the affected embeddings "
                  "are computed again and the cache is repaired.", stacklevel=4)
    return None


def _tiles_in_mask(mask, shape, tile_shape, halo, z=None) -> List[int]:
    tiles = []
    for tile in _tiling.iterate_tiles(shape, tile_shape, halo):
        region = mask[(z,) + tile.outer] if z is not None else mask[tile.outer]
        if np.any(region):
            tiles.append(tile.tile_id)
    return tiles


def _batches(items: Sequence, batch_size: int):
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def _compute_2d(predictor, input_, f, persistent, pbar_init, pbar_update):
    if persistent and "input_size" in f.attrs:
        features = _read_complete(f, lazy_loading=False)
        if features is not None:
            return {"features": features, "input_size": tuple(f.attrs["input_size"]),
                    "original_size": tuple(f.attrs["original_size"])}
    pbar_init(1, "Compute Image Embeddings 2D")
    features, original_sizes, input_sizes = encode_images(predictor, [to_image(input_)])
    features = features.cpu().numpy()
    pbar_update(1)
    if persistent:
        _create_array(f, "features", features.shape, features.shape)[...] = features
    return {"features": features, "input_size": input_sizes[0], "original_size": original_sizes[0]}


def _compute_3d(predictor, input_, f, persistent, lazy_loading, batch_size, pbar_init, pbar_update):
    n_slices = input_.shape[0]
    if persistent and "input_size" in f.attrs:
        features = _read_complete(f, lazy_loading)
        if features is not None:
            return {"features": features, "input_size": tuple(f.attrs["input_size"]),
                    "original_size": tuple(f.attrs["original_size"])}
    grid = int(predictor.model.image_encoder.img_size) // 16  # 64 for SAM's 1024 input
    shape, chunks = (n_slices, 1, 256, grid, grid), (1, 1, 256, grid, grid)
    if persistent:
        if "features" in f:
            features = f["features"]
            if tuple(features.shape) != shape:
                raise RuntimeError(
                    f"The partial embeddings have shape {tuple(features.shape)}, expected {shape}; "
                    "use a new save_path."
                )
            todo = [z for z in range(n_slices) if not _is_computed(features, z)]
        else:
            features = _create_array(f, "features", shape, chunks)
            todo = list(range(n_slices))
    else:
        features = np.zeros(shape, dtype="float32")
        todo = list(range(n_slices))

    pbar_init(n_slices, "Compute Image Embeddings 3D")
    pbar_update(n_slices - len(todo))
    sizes = None
    for batch in _batches(todo, batch_size):
        batch_features, original_sizes, input_sizes = encode_images(predictor, [to_image(input_[z]) for z in batch])
        batch_features = batch_features.cpu().numpy()
        for z, feats in zip(batch, batch_features):
            features[z] = feats[None]
        sizes = (input_sizes[-1], original_sizes[-1])
        pbar_update(len(batch))
    if sizes is None:  # everything was computed before, only the final attributes were missing
        original_size = tuple(input_.shape[1:3])
        sizes = (predictor.transform.get_preprocess_shape(*original_size, predictor.transform.target_length),
                 original_size)
    result = {"features": features, "input_size": tuple(sizes[0]), "original_size": tuple(sizes[1])}
    if persistent and not lazy_loading:
        result["features"] = features[...]
    return result


def _compute_tiled(predictor, input_, f, ndim, tile_shape, halo, batch_size, mask, pbar_init, pbar_update):
    shape = tuple(input_.shape[1:3]) if ndim == 3 else tuple(input_.shape[:2])
    if "input_size" in f.attrs:  # complete
        return {"features": f["features"], "input_size": None, "original_size": None}
    group = f.require_group("features")
    group.attrs.update({"shape": list(shape), "tile_shape": list(tile_shape), "halo": list(halo)})
    n_slices = input_.shape[0] if ndim == 3 else None

    # The work list: (z or None, tile_id) pairs in C order, restricted to the mask, without what is done.
    if ndim == 2:
        tile_ids = list(range(_tiling.n_tiles(shape, tile_shape))) if mask is None else \
            _tiles_in_mask(mask, shape, tile_shape, halo)
        work = [(None, t) for t in tile_ids]
        if mask is not None:
            group.attrs["tiles_in_mask"] = tile_ids
    else:
        per_slice = {z: (list(range(_tiling.n_tiles(shape, tile_shape))) if mask is None else
                         _tiles_in_mask(mask, shape, tile_shape, halo, z=z)) for z in range(n_slices)}
        work = [(z, t) for z in range(n_slices) for t in per_slice[z]]
        if mask is not None:
            group.attrs["tiles_in_mask"] = {str(z): tiles for z, tiles in per_slice.items()}
    total = len(work)

    def done(z, tile_id):
        name = str(tile_id)
        if name not in group:
            return False
        array = group[name]
        if z is None:
            return "input_size" in array.attrs
        return _is_computed(array, z)

    work = [(z, t) for z, t in work if not done(z, t)]
    pbar_init(total, f"Compute Image Embeddings {ndim}D tiled")
    pbar_update(total - len(work))
    for batch in _batches(work, batch_size):
        images = []
        for z, tile_id in batch:
            tile = _tiling.get_tile(tile_id, shape, tile_shape, halo)
            images.append(to_image(input_[(z,) + tile.outer] if z is not None else input_[tile.outer]))
        batch_features, original_sizes, input_sizes = encode_images(predictor, images)
        batch_features = batch_features.cpu().numpy()
        for (z, tile_id), feats, original_size, input_size in zip(batch, batch_features, original_sizes, input_sizes):
            name = str(tile_id)
            if z is None:
                array = _create_array(group, name, (1,) + feats.shape, (1,) + feats.shape)
                array[...] = feats[None]
            else:
                array = _create_array(group, name, (n_slices, 1) + feats.shape, (1, 1) + feats.shape)
                array[z] = feats[None]
            array.attrs.update({"original_size": list(original_size), "input_size": list(input_size)})
        pbar_update(len(batch))
    return {"features": group, "input_size": None, "original_size": None}


def precompute_image_embeddings(
    predictor,
    input_,
    save_path=None,
    lazy_loading: bool = False,
    ndim: Optional[int] = None,
    tile_shape: Optional[Tuple[int, int]] = None,
    halo: Optional[Tuple[int, int]] = None,
    verbose: bool = True,
    batch_size: int = 1,
    mask=None,
    pbar_init: Optional[Callable] = None,
    pbar_update: Optional[Callable] = None,
) -> ImageEmbeddings:
    """See :func:`micro_sam.util.precompute_image_embeddings`."""
    validate_array(input_)
    ndim = infer_ndim(input_, ndim)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    spatial = tuple(input_.shape[1:3]) if ndim == 3 else tuple(input_.shape[:2])
    tile_shape, halo = _tiling.validate_tiling(spatial, tile_shape, halo)
    if mask is not None:
        expected = tuple(input_.shape[:3]) if ndim == 3 else spatial
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask (shape {tuple(mask.shape)}) must have the image's shape {expected}.")

    f = _open_cache(save_path)
    persistent = save_path is not None
    signature = None
    if persistent:
        signature = _signature(predictor, _data_signature(input_), tile_shape, halo)
        _check_signature(f, signature, save_path)
        if "input_size" not in f.attrs:  # new or partial: record what it is for, so a resume can be checked
            f.attrs.update({k: v for k, v in signature.items() if k != "micro_sam_version"})

    pbar, init, update, close = handle_pbar(verbose, pbar_init, pbar_update)
    try:
        if tile_shape is not None:
            embeddings = _compute_tiled(predictor, input_, f, ndim, tile_shape, halo, batch_size, mask, init, update)
        elif ndim == 2:
            embeddings = _compute_2d(predictor, input_, f, persistent, init, update)
        else:
            embeddings = _compute_3d(predictor, input_, f, persistent, lazy_loading, batch_size, init, update)
    finally:
        close()

    if "input_size" not in f.attrs:  # written last: marks the cache as complete
        if signature is None:
            signature = _signature(predictor, None, tile_shape, halo)
        final = dict(signature)
        final["original_size"] = _as_list(embeddings["original_size"])
        final["input_size"] = _as_list(embeddings["input_size"])
        f.attrs.update(final)
    return embeddings


def _embedding_array(image_embeddings: ImageEmbeddings, tile_id: Optional[int]):
    features = image_embeddings["features"]
    if tile_id is None:
        if hasattr(features, "keys") and not hasattr(features, "shape"):
            raise ValueError("These embeddings are tiled; pass tile_id to select a tile.")
        return features, image_embeddings["input_size"], image_embeddings["original_size"]
    if not (hasattr(features, "keys") and not hasattr(features, "shape")):
        raise ValueError(f"tile_id={tile_id} was given, but the embeddings are not tiled.")
    if str(tile_id) not in features:
        computed = sorted(int(k) for k in features.keys())
        raise ValueError(f"No embeddings for tile {tile_id}; computed tiles: {computed}.")
    array = features[str(tile_id)]
    return array, tuple(array.attrs["input_size"]), tuple(array.attrs["original_size"])


def set_precomputed(predictor, image_embeddings: ImageEmbeddings, i: Optional[int] = None,
                    tile_id: Optional[int] = None):
    """See :func:`micro_sam.util.set_precomputed`."""
    import torch

    features, input_size, original_size = _embedding_array(image_embeddings, tile_id)
    ndim = len(features.shape)
    if ndim not in (4, 5):
        raise ValueError(f"Embedding features must be 4D (2D data) or 5D (3D data), got shape {tuple(features.shape)}.")
    if ndim == 5:
        if i is None:
            raise ValueError(f"The embeddings are 3D ({features.shape[0]} slices): pass the slice index i.")
        if not 0 <= int(i) < features.shape[0]:
            raise ValueError(f"Slice index i={i} is out of range for embeddings of {features.shape[0]} slices.")
    elif i is not None:
        raise ValueError(f"The embeddings are 2D; the slice index i={i} must be None.")
    if torch.is_tensor(features):
        data = features[int(i)] if ndim == 5 else features
    else:
        try:
            data = features[int(i)] if ndim == 5 else features[...]
        except Exception as error:  # noqa: BLE001 - a damaged chunk of a zarr cache (decompression error)
            where = ("the embeddings" + (f" of slice {i}" if ndim == 5 else "")
                     + ("" if tile_id is None else f" of tile {tile_id}"))
            raise RuntimeError(_damaged_cache_message(features, where, error)) from None
    data = data if torch.is_tensor(data) else torch.from_numpy(np.asarray(data))
    if ndim == 5 and not data.any():
        where = "" if tile_id is None else f", tile {tile_id}"
        raise ValueError(f"No embeddings were computed for slice {i}{where}.")
    predictor.features = data.to(device=predictor.device, dtype=torch.float32)
    predictor.input_size = tuple(int(s) for s in input_size)
    predictor.original_size = tuple(int(s) for s in original_size)
    predictor.is_image_set = True
    return predictor
