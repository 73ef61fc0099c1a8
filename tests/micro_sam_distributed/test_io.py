"""Lazy readers of large inputs: each format gives back the array that was written, region by region."""
import gzip
import json
import os

import numpy as np
import pytest

from micro_sam.distributed._io import N5Array, open_input

REGION = (slice(3, 70), slice(20, 111))


@pytest.fixture
def data():
    return np.random.default_rng(0).integers(0, 60000, (90, 130)).astype("uint16")


def write_n5(path, data, chunks, compression="gzip"):
    """An n5 dataset as the n5 specification describes it: dimensions fastest first, one file per chunk at
    <x>/<y>/..., each with a big-endian header (mode, number of dimensions, chunk size) and big-endian data."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "attributes.json"), "w") as f:
        json.dump({"dimensions": list(data.shape[::-1]), "blockSize": list(chunks[::-1]),
                   "dataType": str(data.dtype), "compression": {"type": compression}}, f)
    for position in np.ndindex(*[int(np.ceil(s / c)) for s, c in zip(data.shape, chunks)]):
        block = data[tuple(slice(p * c, (p + 1) * c) for p, c in zip(position, chunks))]
        header = np.array([0, block.ndim], ">u2").tobytes() + np.array(block.shape[::-1], ">u4").tobytes()
        payload = block.astype(block.dtype.newbyteorder(">")).tobytes()
        payload = gzip.compress(payload) if compression == "gzip" else payload
        chunk_path = os.path.join(path, *[str(p) for p in position[::-1]])
        os.makedirs(os.path.dirname(chunk_path), exist_ok=True)
        with open(chunk_path, "wb") as f:
            f.write(header + payload)


def test_n5(data, tmp_path):
    for compression in ("gzip", "raw"):
        path = str(tmp_path / f"{compression}.n5")
        write_n5(os.path.join(path, "raw"), data, (32, 48), compression)
        array = open_input(path, "raw")
        assert isinstance(array, N5Array) and array.shape == data.shape and array.dtype == np.uint16
        np.testing.assert_array_equal(array[REGION], data[REGION])
        np.testing.assert_array_equal(array[:, :], data)
    os.remove(os.path.join(str(tmp_path / "raw.n5"), "raw", "0", "1"))      # a chunk never written reads as 0
    np.testing.assert_array_equal(N5Array(str(tmp_path / "raw.n5" / "raw"))[32:64, :48], 0)
    with pytest.raises(ValueError, match="n5 group, not a dataset"):
        os.makedirs(tmp_path / "group.n5" / "raw")
        (tmp_path / "group.n5" / "attributes.json").write_text('{"n5": "2.0.0"}')
        open_input(str(tmp_path / "group.n5"))


def test_zarr_ome_zarr_tif_hdf5(data, tmp_path):
    import h5py
    import tifffile
    import zarr

    zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=data.shape, chunks=(32, 32), dtype=data.dtype)[...] = data
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("raw", shape=data.shape, chunks=(40, 40), dtype=data.dtype)[...] = data
    ome = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w")
    ome.create_array("0", shape=(1, 1) + data.shape, chunks=(1, 1, 32, 32), dtype=data.dtype)[...] = data[None, None]
    ome.create_array("1", shape=(1, 1, 45, 65), dtype=data.dtype)
    ome.attrs["multiscales"] = [{"axes": [{"name": "t"}, {"name": "c"}, {"name": "y"}, {"name": "x"}],
                                 "datasets": [{"path": "0"}, {"path": "1"}]}]
    tifffile.imwrite(tmp_path / "tiled.tif", data, tile=(32, 32), compression="zlib")
    tifffile.imwrite(tmp_path / "plain.tif", data)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("raw", data=data, chunks=(32, 32))
    for path, key in [("a.zarr", None), ("g.zarr", "raw"), ("ome.zarr", None), ("tiled.tif", None),
                      ("plain.tif", None), ("d.h5", "raw")]:
        array = open_input(str(tmp_path / path), key)
        assert tuple(array.shape) == data.shape, path
        np.testing.assert_array_equal(np.asarray(array[REGION]), data[REGION], err_msg=path)
    with pytest.raises(ValueError, match="group, not an array"):
        open_input(str(tmp_path / "g.zarr"))
    with pytest.raises(ValueError, match="no array 'nope'"):
        open_input(str(tmp_path / "g.zarr"), "nope")
    with pytest.raises(ValueError, match="needs a key"):
        open_input(str(tmp_path / "d.h5"))
    multi = zarr.open_group(str(tmp_path / "multi.zarr"), mode="w")
    multi.create_array("0", shape=(2,) + data.shape, dtype=data.dtype)
    multi.attrs["multiscales"] = [{"axes": ["c", "y", "x"], "datasets": [{"path": "0"}]}]
    with pytest.raises(ValueError, match="non-spatial axes"):
        open_input(str(tmp_path / "multi.zarr"))
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="Cannot read"):
        open_input(str(tmp_path / "x.png"))
