"""Lazy reading of large inputs (zarr, OME-Zarr, n5, tif, hdf5) for blockwise processing.

Workers open the input themselves from its path (:func:`open_input`, cached per process) and read one block at
a time, so no worker ever holds more than a block. Supported:

- zarr (v2 or v3) arrays, a group with ``key``, or an OME-Zarr image (the full resolution level; leading axes
  of length 1, e.g. time and channel, are dropped);
- n5 datasets (read here directly; compression raw, gzip, zlib, bzip2, xz, zstd or blosc);
- tif files, read tile by tile (or strip by strip) through tifffile's zarr store;
- hdf5 datasets (``key``).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["N5Array", "open_input"]

_TIF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff")
_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


class _Squeezed:
    """A view of an array without some leading axes of length 1 (read-only, lazy)."""

    def __init__(self, array, n_leading: int):
        self._array, self._n = array, n_leading
        self.shape = tuple(array.shape[n_leading:])
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        return np.asarray(self._array[(0,) * self._n + index])


class N5Array:
    """A read-only n5 dataset (the n5 format: ``attributes.json`` and one file per chunk).

    n5 lists dimensions fastest-first (x, y, z); this class presents them in numpy order (z, y, x). Chunks that
    were never written read as zeros.

    Args:
        path: The dataset folder (the one holding ``attributes.json`` with ``dimensions``).

    Raises:
        ValueError: Not an n5 dataset, or a data type / compression this reader does not support.
    """

    _COMPRESSIONS = ("raw", "gzip", "bzip2", "xz", "zstd", "blosc")

    def __init__(self, path: str):
        attributes_path = os.path.join(path, "attributes.json")
        try:
            with open(attributes_path) as f:
                attributes = json.load(f)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path!r} is not an n5 dataset (no readable attributes.json: {error}).") from None
        if "dimensions" not in attributes:
            groups = sorted(name for name in os.listdir(path) if os.path.isdir(os.path.join(path, name)))
            raise ValueError(f"{path!r} is an n5 group, not a dataset; pass the dataset as key (one of {groups}).")
        self._path = path
        self.shape = tuple(int(d) for d in reversed(attributes["dimensions"]))
        self.chunks = tuple(int(b) for b in reversed(attributes["blockSize"]))
        self.dtype = np.dtype(attributes["dataType"])
        self._stored_dtype = self.dtype.newbyteorder(">")
        self.ndim = len(self.shape)
        compression = attributes.get("compression", {"type": attributes.get("compressionType", "raw")})
        self._compression = compression
        if compression.get("type") not in self._COMPRESSIONS:
            raise ValueError(f"The n5 compression {compression.get('type')!r} of {path!r} is not supported; "
                             f"supported: {', '.join(self._COMPRESSIONS)}.")

    def _decompress(self, data: bytes) -> bytes:
        kind = self._compression["type"]
        if kind == "raw":
            return data
        if kind == "gzip":
            import zlib

            return zlib.decompress(data, 15 + 32)  # gzip or zlib header
        if kind == "bzip2":
            import bz2

            return bz2.decompress(data)
        if kind == "xz":
            import lzma

            return lzma.decompress(data)
        import numcodecs

        codec = numcodecs.Zstd() if kind == "zstd" else numcodecs.Blosc()
        return bytes(codec.decode(data))

    def _read_chunk(self, position: Tuple[int, ...]) -> Optional[np.ndarray]:
        path = os.path.join(self._path, *(str(p) for p in reversed(position)))
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            raw = f.read()
        mode, ndim = np.frombuffer(raw[:4], dtype=">u2")
        if mode != 0:
            raise ValueError(f"The n5 chunk {path!r} has mode {mode}; only default chunks (mode 0) are supported.")
        dims = np.frombuffer(raw[4:4 + 4 * ndim], dtype=">u4")
        data = self._decompress(raw[4 + 4 * ndim:])
        values = np.frombuffer(data, dtype=self._stored_dtype)[:int(np.prod(dims))]
        return values.reshape(tuple(int(d) for d in dims[::-1]))

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (self.ndim - len(index))
        if len(index) != self.ndim or not all(isinstance(i, slice) and i.step in (None, 1) for i in index):
            raise ValueError("N5Array supports indexing with contiguous slices only.")
        bounds = [i.indices(s)[:2] for i, s in zip(index, self.shape)]
        out = np.zeros(tuple(max(b - a, 0) for a, b in bounds), dtype=self.dtype)
        ranges = [range(a // c, (b - 1) // c + 1) if b > a else range(0) for (a, b), c in zip(bounds, self.chunks)]
        for position in np.ndindex(*[len(r) for r in ranges]):
            chunk_position = tuple(r[p] for r, p in zip(ranges, position))
            chunk = self._read_chunk(chunk_position)
            if chunk is None:
                continue
            src, dst = [], []
            for (a, b), c, p, size in zip(bounds, self.chunks, chunk_position, chunk.shape):
                lo, hi = max(a, p * c), min(b, p * c + size)
                src.append(slice(lo - p * c, hi - p * c))
                dst.append(slice(lo - a, hi - a))
            out[tuple(dst)] = chunk[tuple(src)]
        return out


def _is_n5(path: str) -> bool:
    return path.rstrip("/").endswith(".n5") or os.path.exists(os.path.join(path, "attributes.json"))


def _open_zarr(path: str, key: Optional[str]):
    import zarr

    try:
        node = zarr.open(path, mode="r")
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"Could not open {path!r} as zarr: {error}") from None
    if key is not None:
        try:
            node = node[key]
        except (KeyError, TypeError):
            raise ValueError(f"{path!r} has no array {key!r}.") from None
    if hasattr(node, "shape"):
        return node
    multiscales = node.attrs.get("multiscales") or node.attrs.get("ome", {}).get("multiscales")
    if multiscales:
        return _ome_full_resolution(node, multiscales[0], path)
    arrays = sorted(name for name, _ in node.arrays())
    raise ValueError(f"{path!r}{'' if key is None else f' / {key!r}'} is a zarr group, not an array; pass the "
                     f"array's name as key (one of {arrays}).")


def _ome_full_resolution(group, multiscale, path):
    array = group[multiscale["datasets"][0]["path"]]
    axes = [a["name"] if isinstance(a, dict) else a for a in multiscale.get("axes", [])]
    n_leading = 0
    while n_leading < array.ndim - 2 and array.shape[n_leading] == 1:
        n_leading += 1
    spatial = [a for a in axes[n_leading:] if a in ("z", "y", "x")]
    if axes and len(spatial) != len(axes) - n_leading:
        raise ValueError(f"The OME-Zarr image {path!r} has axes {axes} of shape {tuple(array.shape)}; only images "
                         "whose non-spatial axes (time, channel) have length 1 are supported. Select a channel / "
                         "time point into its own array first.")
    return _Squeezed(array, n_leading) if n_leading else array


def _open_tif(path: str):
    import tifffile
    import zarr

    try:
        store = tifffile.imread(path, aszarr=True)
        node = zarr.open(store, mode="r")
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"Could not read the tif {path!r}: {error}") from None
    if not hasattr(node, "shape"):  # a pyramid: level 0 is the full resolution
        node = node["0"]
    return node


@functools.lru_cache(maxsize=8)
def open_input(path: str, key: Optional[str] = None):
    """Open an image or volume lazily; slicing the result reads only the requested region.

    Args:
        path: A zarr / OME-Zarr / n5 container, a tif file or an hdf5 file.
        key: The array inside a container (optional for a zarr array, an OME-Zarr image or a tif).

    Returns:
        An array-like with ``shape``, ``dtype`` and numpy slicing (cached per process: workers open each input
        once).

    Raises:
        ValueError: The path does not exist, cannot be read, or names a group instead of an array.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"The input {path!r} does not exist.")
    lowered = path.lower().rstrip("/")
    if lowered.endswith(_TIF_SUFFIXES):
        if key is not None:
            raise ValueError(f"key {key!r} was given for the tif file {path!r}; tif files have no keys.")
        return _open_tif(path)
    if lowered.endswith(_HDF5_SUFFIXES):
        import h5py

        if key is None:
            raise ValueError(f"The hdf5 file {path!r} needs a key (the dataset to read).")
        f = h5py.File(path, "r")
        if key not in f:
            raise ValueError(f"{path!r} has no dataset {key!r}.")
        return f[key]
    if os.path.isdir(path) and _is_n5(path):
        return N5Array(path if key is None else os.path.join(path, key))
    if os.path.isdir(path):
        return _open_zarr(path, key)
    raise ValueError(f"Cannot read {path!r} blockwise: supported are zarr / OME-Zarr / n5 containers, tif files "
                     "and hdf5 files. Convert other formats to tif or zarr first.")


def read_region(array, region: Sequence[slice]) -> np.ndarray:
    """Read a region (one slice per leading axis; trailing channel axes whole) as a numpy array."""
    return np.asarray(array[tuple(region)])
