r"""Sample microscopy data: bundled and synthetic images that work offline, and downloadable examples.

Offline data (no network needed):

* :func:`sample_image_path` / :func:`sample_labels_path`: a small bundled 2D nuclei image (512 x 512, uint8)
  and its instance labels, e.g. for ``micro_sam.automatic_segmentation -i "$(python -c 'from
  micro_sam.sample_data import sample_image_path; print(sample_image_path())')" ...``.
* :func:`synthetic_nuclei_2d`, :func:`synthetic_cells_2d`, :func:`synthetic_nuclei_3d`: realistic synthetic
  fluorescence images with instance labels, deterministic for a given seed.
* :func:`synthetic_data`: the generic ``(image, labels)`` generator with the signature of micro_sam 1.8.

Downloadable example data (``fetch_*_example_data``): every function downloads one entry of the bundled
registry ``micro_sam/_data/sample_data_registry.tsv`` with pooch, verifies its SHA256 hash and returns the
path of the file, or of the folder for zip archives (which are unpacked next to the archive, into
``<archive name>.unzip``). Downloads go to a temporary file first and only replace the target once the hash
matches, so a failed or corrupted download never leaves a file behind.

The ``sample_data_*`` functions download into ``<cache directory>/sample_data`` and return napari layer data,
a list of ``(array, {"name": ...})`` tuples; napari itself is not needed. The cache directory is
``$MICROSAM_CACHEDIR`` if set, otherwise the platform's user cache folder for ``micro_sam``:

* Mac: ``~/Library/Caches/micro_sam``
* Unix: ``~/.cache/micro_sam`` (or ``$XDG_CACHE_HOME/micro_sam``)
* Windows: ``C:\Users\<user>\AppData\Local\micro_sam\micro_sam\Cache``
"""
from __future__ import annotations

import csv
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _synthetic

PathLike = Union[str, os.PathLike]
Seed = Union[int, np.random.Generator, None]

_REGISTRY_FILE = "sample_data_registry.tsv"
_SAMPLE_IMAGE = "sample_nuclei_2d.tif"
_SAMPLE_LABELS = "sample_nuclei_2d_labels.tif"
# Parameters used to create the bundled sample (see `_write_bundled_sample`).
_SAMPLE_KWARGS = dict(shape=(512, 512), n_objects=None, seed=0)


#
# Bundled sample image
#

def _data_file(name: str) -> str:
    path = resources.files("micro_sam").joinpath("_data", name)
    return str(path)


def sample_image_path() -> str:
    """Path of the bundled 2D nuclei sample image.

    The image is a 512 x 512 uint8 TIFF created by :func:`synthetic_nuclei_2d` with ``seed=0``.
    It is part of the installed package, so it is available offline.

    Returns:
        The absolute path of ``micro_sam/_data/sample_nuclei_2d.tif``.
    """
    return _data_file(_SAMPLE_IMAGE)


def sample_labels_path() -> str:
    """Path of the instance labels of the bundled sample image (512 x 512 uint32 TIFF, 0 = background).

    Returns:
        The absolute path of ``micro_sam/_data/sample_nuclei_2d_labels.tif``.
    """
    return _data_file(_SAMPLE_LABELS)


def sample_data_nuclei_2d() -> List[tuple]:
    """Provide the bundled 2D nuclei sample as napari layer data.

    Returns:
        ``[(image, {"name": "nuclei_2d"}), (labels, {"name": "nuclei_2d_labels"}, "labels")]`` with the
        uint8 image of shape (512, 512) and its uint32 instance labels of the same shape.
    """
    import tifffile

    image = tifffile.imread(sample_image_path())
    labels = tifffile.imread(sample_labels_path())
    return [(image, {"name": "nuclei_2d"}), (labels, {"name": "nuclei_2d_labels"}, "labels")]


def _write_bundled_sample(directory: Optional[PathLike] = None) -> Tuple[str, str]:
    """Regenerate the bundled sample image and labels (maintainer helper, not public API)."""
    import tifffile

    directory = Path(directory) if directory is not None else Path(sample_image_path()).parent
    image, labels = synthetic_nuclei_2d(**_SAMPLE_KWARGS)
    image_path, labels_path = directory / _SAMPLE_IMAGE, directory / _SAMPLE_LABELS
    tifffile.imwrite(image_path, image, compression="zlib", compressionargs={"level": 9}, predictor=True)
    tifffile.imwrite(labels_path, labels, compression="zlib", compressionargs={"level": 9})
    return str(image_path), str(labels_path)


#
# Synthetic data
#

def synthetic_nuclei_2d(
    shape: Tuple[int, int] = (512, 512),
    n_objects: Optional[int] = None,
    seed: Seed = 0,
    radius_range: Tuple[float, float] = _synthetic.NUCLEUS_RADIUS_RANGE,
    dtype: str = "uint8",
) -> Tuple[np.ndarray, np.ndarray]:
    """Create a synthetic 2D fluorescence image of nuclei with instance labels.

    Nuclei are irregular ellipses with varying size, shape, brightness and a granular texture. They touch
    and partially overlap (the fluorescence adds up where they overlap); the image further has an uneven
    background, illumination falloff, blur and Poisson + Gaussian noise. In the labels, overlaps are
    resolved by depth order: the front object owns the shared pixels; every object stays connected and
    keeps at least 75 % of its area.

    Args:
        shape: The image shape (height, width); both at least 16.
        n_objects: The number of nuclei. Default: about 25 % of the area covered.
        seed: Seed for ``numpy.random.default_rng``; the same seed gives identical arrays.
            ``None`` gives a different result every call.
        radius_range: Range of the semi-major axis in pixels.
        dtype: ``"uint8"`` (1 photon = 1 grey value) or ``"uint16"`` (16 grey values per photon).

    Returns:
        The image of shape ``shape`` and dtype ``dtype``.
        The instance labels of shape ``shape``, uint32, background 0 and ids 1..n_objects.

    Raises:
        ValueError: For an invalid shape, radius range, dtype or a number of objects that does not fit.
    """
    shape = _synthetic.check_shape(shape, 2)
    radius_range = _synthetic.check_radius_range(radius_range)
    n_objects = _synthetic.check_n_objects(n_objects, _synthetic.default_n_objects(shape, radius_range, 0.25))
    _check_dtype(dtype)
    rng = np.random.default_rng(seed)
    return _synthetic.render_nuclei(rng, shape, n_objects, radius_range, dtype)


def synthetic_cells_2d(
    shape: Tuple[int, int] = (512, 512),
    n_objects: Optional[int] = None,
    seed: Seed = 0,
    radius_range: Tuple[float, float] = _synthetic.CELL_RADIUS_RANGE,
    dtype: str = "uint8",
) -> Tuple[np.ndarray, np.ndarray]:
    """Create a synthetic 2D fluorescence image of densely packed cells with instance labels.

    Cells have a cytoplasm-like granular texture that is brightest around a dim (unstained) nucleus and
    fades towards the cell edge. Neighbouring cells touch along irregular boundaries that are slightly dimmer.
    Background, illumination, blur and noise are modelled as in :func:`synthetic_nuclei_2d`.

    Args:
        shape: The image shape (height, width); both at least 16.
        n_objects: The number of cells. Default: chosen for roughly half of the area being covered.
        seed: Seed for ``numpy.random.default_rng``; the same seed gives identical arrays.
        radius_range: Range of the cell radius in pixels.
        dtype: ``"uint8"`` or ``"uint16"``.

    Returns:
        The image of shape ``shape`` and dtype ``dtype``.
        The instance labels of shape ``shape``, uint32, background 0 and ids 1..n_objects.

    Raises:
        ValueError: For an invalid shape, radius range, dtype or a number of objects that does not fit.
    """
    shape = _synthetic.check_shape(shape, 2)
    radius_range = _synthetic.check_radius_range(radius_range)
    n_objects = _synthetic.check_n_objects(n_objects, _synthetic.default_n_objects(shape, radius_range, 0.6))
    _check_dtype(dtype)
    rng = np.random.default_rng(seed)
    return _synthetic.render_cells(rng, shape, n_objects, radius_range, dtype)


def synthetic_nuclei_3d(
    shape: Tuple[int, int, int] = (16, 256, 256),
    n_objects: Optional[int] = None,
    seed: Seed = 0,
    radius_range: Tuple[float, float] = (6.0, 16.0),
    z_radius_range: Tuple[float, float] = (2.5, 5.0),
    dtype: str = "uint8",
) -> Tuple[np.ndarray, np.ndarray]:
    """Create a synthetic 3D fluorescence stack of nuclei with instance labels.

    Nuclei are flat, irregular ellipsoids (anisotropic: fewer slices in z than pixels in y / x), rendered as
    in :func:`synthetic_nuclei_2d` with an anisotropic blur.

    Args:
        shape: The volume shape (z, y, x); y and x at least 16.
        n_objects: The number of nuclei. Default: about 20 % of the volume covered.
        seed: Seed for ``numpy.random.default_rng``; the same seed gives identical arrays.
        radius_range: Range of the in-plane semi-major axis in pixels.
        z_radius_range: Range of the semi-axis along z in slices.
        dtype: ``"uint8"`` or ``"uint16"``.

    Returns:
        The image of shape ``shape`` (z, y, x) and dtype ``dtype``.
        The instance labels of shape ``shape``, uint32, background 0 and ids 1..n_objects.

    Raises:
        ValueError: For an invalid shape, radius range, dtype or a number of objects that does not fit.
    """
    shape = _synthetic.check_shape(shape, 3)
    radius_range = _synthetic.check_radius_range(radius_range)
    try:
        z_lo, z_hi = (float(r) for r in z_radius_range)
    except (TypeError, ValueError):
        raise ValueError(f"z_radius_range must be a pair (min, max), got {z_radius_range!r}") from None
    if not 0.5 <= z_lo <= z_hi:
        raise ValueError(f"z_radius_range must satisfy 0.5 <= min <= max, got {z_radius_range!r}")
    default = _synthetic.default_n_objects(shape, radius_range, 0.2, (z_lo, z_hi))
    n_objects = _synthetic.check_n_objects(n_objects, default)
    _check_dtype(dtype)
    rng = np.random.default_rng(seed)
    return _synthetic.render_nuclei(rng, shape, n_objects, radius_range, dtype, z_radius_range=(z_lo, z_hi))


def synthetic_data(shape: Tuple[int, ...], seed: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Create a synthetic image with instance segmentation, e.g. for tests and training.

    A 2D shape gives fluorescent nuclei (see :func:`synthetic_nuclei_2d`), a 3D shape a stack of nuclei
    (see :func:`synthetic_nuclei_3d`). Object sizes scale with the image: the largest radius is about 8 % of
    the shorter in-plane side (between 4 and 25 pixels).

    Args:
        shape: The shape, (height, width) or (z, height, width); height and width at least 16.
        seed: Seed for the random generator; ``None`` gives a different result every call.

    Returns:
        The image, uint8, of shape ``shape``.
        The instance labels, uint64, of shape ``shape``, background 0 and consecutive ids from 1.
    """
    try:
        ndim = len(shape)
    except TypeError:
        raise ValueError(f"shape must be a 2D or 3D shape tuple, got {shape!r}") from None
    if ndim not in (2, 3):
        raise ValueError(f"shape must have 2 or 3 entries, got {shape!r}")
    shape = _synthetic.check_shape(shape, ndim)
    r_max = float(np.clip(0.08 * min(shape[-2:]), 4.0, 25.0))
    radius_range = (max(3.0, 0.35 * r_max), r_max)
    if ndim == 2:
        image, labels = synthetic_nuclei_2d(shape, seed=seed, radius_range=radius_range)
    else:
        nz = shape[0]
        z_range = (float(np.clip(0.2 * nz, 1.0, 2.5)), float(np.clip(0.4 * nz, 1.5, 5.0)))
        image, labels = synthetic_nuclei_3d(shape, seed=seed, radius_range=radius_range, z_radius_range=z_range)
    return image, labels.astype("uint64")


def _check_dtype(dtype) -> None:
    try:
        ok = np.dtype(dtype) in (np.dtype("uint8"), np.dtype("uint16"))
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"dtype must be 'uint8' or 'uint16', got {dtype!r}")


#
# Downloadable example data
#

def _load_registry() -> Dict[str, Tuple[str, str]]:
    """Read the sample data registry: ``{function name: (url, sha256)}``.

    Read at call time from ``micro_sam/_data/sample_data_registry.tsv``; tests monkeypatch this accessor.
    """
    text = resources.files("micro_sam").joinpath("_data", _REGISTRY_FILE).read_text(encoding="utf-8")
    rows = csv.DictReader(text.splitlines(), delimiter="\t")
    return {row["function"]: (row["url"], row["sha256"]) for row in rows}


def _registry_entry(name: str) -> Tuple[str, str]:
    registry = _load_registry()
    if name not in registry:
        raise ValueError(f"Unknown sample data {name!r}; available: {sorted(registry)}")
    return registry[name]


def _cache_directory() -> Path:
    """``$MICROSAM_CACHEDIR`` or the user cache directory of micro_sam (the rule of ``micro_sam.util``)."""
    from ._registry import get_cache_directory

    return Path(get_cache_directory())


def _sample_data_directory() -> Path:
    return _cache_directory() / "sample_data"


def _prepare_directory(save_directory: PathLike) -> Path:
    """Create ``save_directory`` if needed and check that files can be written into it."""
    try:
        save_directory = Path(save_directory)
    except TypeError:
        raise ValueError(f"save_directory must be a path, got {save_directory!r}") from None
    if save_directory.exists() and not save_directory.is_dir():
        raise ValueError(f"save_directory {str(save_directory)!r} exists and is not a directory")
    try:
        save_directory.mkdir(parents=True, exist_ok=True)
        # An actual write is the only reliable test (os.access is always True for root, ACLs, ...).
        with tempfile.TemporaryFile(dir=save_directory):
            pass
    except OSError as e:
        raise ValueError(
            f"save_directory {str(save_directory)!r} cannot be created or is not writable ({e}); "
            "pass a writable directory."
        ) from e
    return save_directory


def _retrieve(
    name: str,
    save_directory: PathLike,
    fname: str,
    members: Optional[Sequence[str]] = None,
    result: Sequence[str] = (),
) -> str:
    """Download a registry entry into ``save_directory / fname`` and return the result path.

    For archives (``members`` given), the members are unpacked into ``save_directory / (fname + ".unzip")``
    and the returned path is that folder joined with ``result``. Otherwise the downloaded file is returned.
    """
    import pooch

    url, known_hash = _registry_entry(name)
    save_directory = _prepare_directory(save_directory)
    processor = None if members is None else pooch.Unzip(members=list(members))
    try:
        pooch.retrieve(
            url=url, known_hash=known_hash, fname=fname, path=save_directory, progressbar=True,
            processor=processor,
        )
    except ValueError as e:
        # pooch raises ValueError for a hash mismatch; the temporary download has been removed already.
        raise ValueError(f"Download of {name} from {url} failed verification: {e}") from e
    if members is None:
        return os.path.join(save_directory, fname)
    out = os.path.join(save_directory, f"{fname}.unzip", *result)
    if not os.path.exists(out):
        raise RuntimeError(f"The archive downloaded by {name} from {url} does not contain {os.path.join(*result)}")
    return out


def fetch_image_series_example_data(save_directory: PathLike) -> str:
    """Download three example images for the image series annotator.

    Args:
        save_directory: Folder to save the downloaded data in; created if it does not exist.

    Returns:
        The folder ``<save_directory>/image-series.zip.unzip/series`` with ``im0.tif``, ``im1.tif``, ``im2.tif``.
    """
    members = [os.path.join("series", f"im{i}.tif") for i in range(3)]
    return _retrieve("fetch_image_series_example_data", save_directory, "image-series.zip", members, ("series",))


def fetch_wholeslide_example_data(save_directory: PathLike) -> str:
    """Download part of a whole-slide image (NeurIPS 2022 cell segmentation challenge) for the 2d annotator.

    Args:
        save_directory: Folder to save the downloaded data in; created if it does not exist.

    Returns:
        The path of the downloaded image ``<save_directory>/whole-slide-example-image.tif``.
    """
    return _retrieve("fetch_wholeslide_example_data", save_directory, "whole-slide-example-image.tif")


def fetch_livecell_example_data(save_directory: PathLike) -> str:
    """Download one phase-contrast image of the LIVECell dataset (doi:10.1038/s41592-021-01249-6).

    Args:
        save_directory: Folder to save the downloaded data in; created if it does not exist.

    Returns:
        The path of the downloaded image ``<save_directory>/livecell-2d-image.png``.
    """
    return _retrieve("fetch_livecell_example_data", save_directory, "livecell-2d-image.png")


def fetch_hela_2d_example_data(save_directory: PathLike) -> str:
    """Download one HeLa image of the cell tracking challenge for the 2d annotator.

    Args:
        save_directory: Folder to save the downloaded data in; created if it does not exist.

    Returns:
        The path of the downloaded image ``<save_directory>/hela-2d-image.png``.
    """
    return _retrieve("fetch_hela_2d_example_data", save_directory, "hela-2d-image.png")


def fetch_3d_example_data(save_directory: PathLike) -> str:
    """Download the Lucchi++ electron microscopy volume (mitochondria) for the 3d annotator.

    Args:
        save_directory: Folder to save the downloaded data in; created if it does not exist.

    Returns:
        The folder ``<save_directory>/lucchi_pp.zip.unzip/Lucchi++/Test_In`` with the 165 slices
        ``mask0000.png`` ... ``mask0164.png``.
    """
    members = [os.path.join("Lucchi++", "Test_In", f"mask{i:04d}.png") for i in range(165)]
    return _retrieve("fetch_3d_example_data", save_directory, "lucchi_pp.zip", members, ("Lucchi++", "Test_In"))


def fetch_tracking_example_data(save_directory: PathLike) -> str:
    """Download the DIC-C2DH-HeLa training sequence 01 of the cell tracking challenge (about 37 MB).

    Args:
        save_directory: Folder to save the downloaded data in; created if it does not exist.

    Returns:
        The folder ``<save_directory>/DIC-C2DH-HeLa.zip.unzip/DIC-C2DH-HeLa/01`` with the 84 frames
        ``t000.tif`` ... ``t083.tif``.
    """
    members = [os.path.join("DIC-C2DH-HeLa", "01", f"t{i:03d}.tif") for i in range(84)]
    return _retrieve(
        "fetch_tracking_example_data", save_directory, "DIC-C2DH-HeLa.zip", members, ("DIC-C2DH-HeLa", "01")
    )


def fetch_tracking_segmentation_data(save_directory: PathLike) -> str:
    """Download the ground-truth segmentation for :func:`fetch_tracking_example_data`.

    Args:
        save_directory: Folder to save the downloaded data in; created if it does not exist.

    Returns:
        The folder ``<save_directory>/hela-ctc-01-gt.zip.unzip/masks`` with the 84 masks
        ``mask_0000.tif`` ... ``mask_0083.tif``.
    """
    members = [os.path.join("masks", f"mask_{i:04d}.tif") for i in range(84)]
    return _retrieve("fetch_tracking_segmentation_data", save_directory, "hela-ctc-01-gt.zip", members, ("masks",))


def fetch_nucleus_3d_example_data(save_directory: PathLike) -> str:
    """Download a small 3D nucleus volume (doi:10.1186/s12859-022-04737-4) for 3d segmentation.

    Args:
        save_directory: Folder to save the downloaded data in; created if it does not exist.

    Returns:
        The path of the downloaded volume ``<save_directory>/3d-nucleus-data.tif``.
    """
    return _retrieve("fetch_nucleus_3d_example_data", save_directory, "3d-nucleus-data.tif")


def fetch_wholeslide_histopathology_example_data(save_directory: PathLike) -> str:
    """Download a whole-slide histopathology image (OpenSlide test data CMU-1.svs, CC0 1.0).

    Args:
        save_directory: Folder to save the downloaded data in; created if it does not exist.

    Returns:
        The path of the downloaded image ``<save_directory>/whole-slide-histopathology-example-image.svs``.
    """
    return _retrieve(
        "fetch_wholeslide_histopathology_example_data", save_directory,
        "whole-slide-histopathology-example-image.svs",
    )


#
# napari-style sample data providers (napari is not required)
#

def _read_image(path: str) -> np.ndarray:
    import imageio.v3 as imageio

    return imageio.imread(path)


def _read_folder(folder: str) -> List[np.ndarray]:
    names = sorted(os.listdir(folder))
    return [_read_image(os.path.join(folder, name)) for name in names]


def sample_data_image_series() -> List[Tuple[np.ndarray, dict]]:
    """Provide the image series example as napari layer data: one layer per image, named ``img-<i>``.

    Returns:
        ``[(image0, {"name": "img-0"}), (image1, {"name": "img-1"}), ...]``; the images differ in shape.
    """
    folder = fetch_image_series_example_data(_sample_data_directory())
    return [(image, {"name": f"img-{i}"}) for i, image in enumerate(_read_folder(folder))]


def sample_data_wholeslide() -> List[Tuple[np.ndarray, dict]]:
    """Provide the whole-slide example image as napari layer data ``[(image, {"name": "wholeslide"})]``."""
    return [(_read_image(fetch_wholeslide_example_data(_sample_data_directory())), {"name": "wholeslide"})]


def sample_data_livecell() -> List[Tuple[np.ndarray, dict]]:
    """Provide the LIVECell example image as napari layer data ``[(image, {"name": "livecell"})]``."""
    return [(_read_image(fetch_livecell_example_data(_sample_data_directory())), {"name": "livecell"})]


def sample_data_hela_2d() -> List[Tuple[np.ndarray, dict]]:
    """Provide the HeLa 2d example image as napari layer data ``[(image, {"name": "hela_2d"})]``."""
    return [(_read_image(fetch_hela_2d_example_data(_sample_data_directory())), {"name": "hela_2d"})]


def sample_data_3d() -> List[Tuple[np.ndarray, dict]]:
    """Provide the Lucchi++ volume as napari layer data ``[(volume, {"name": "lucchi++"})]``, volume (z, y, x)."""
    volume = np.stack(_read_folder(fetch_3d_example_data(_sample_data_directory())))
    return [(volume, {"name": "lucchi++"})]


def sample_data_tracking() -> List[Tuple[np.ndarray, dict]]:
    """Provide the tracking example as napari layer data ``[(frames, {"name": "tracking"})]``, frames (t, y, x)."""
    frames = np.stack(_read_folder(fetch_tracking_example_data(_sample_data_directory())))
    return [(frames, {"name": "tracking"})]


def sample_data_segmentation() -> List[Tuple[np.ndarray, dict]]:
    """Provide the tracking ground truth as napari layer data ``[(masks, {"name": "segmentation"})]``, (t, y, x)."""
    masks = np.stack(_read_folder(fetch_tracking_segmentation_data(_sample_data_directory())))
    return [(masks, {"name": "segmentation"})]


# The samples that ``python -m micro_sam.sample_data NAME`` writes: name -> (function returning (image, labels)
# for a seed, description). Adding a generator here is all the command line needs.
SYNTHETIC_SAMPLES = {
    "nuclei_2d": (synthetic_nuclei_2d, "2D fluorescent nuclei, 512 x 512 (seed 0: the bundled sample image)"),
    "cells_2d": (synthetic_cells_2d, "2D fluorescent cells, 512 x 512"),
    "nuclei_3d": (synthetic_nuclei_3d, "3D fluorescent nuclei, 16 x 256 x 256 (z, y, x)"),
}


def write_sample(name: str, directory: Optional[PathLike] = None, seed: int = 0) -> Tuple[str, str]:
    """Write a synthetic sample and its instance labels as tif files.

    Args:
        name: A key of :data:`SYNTHETIC_SAMPLES` ("nuclei_2d", "cells_2d", "nuclei_3d", ...).
        directory: The folder to write into (created if needed); default ``<cache directory>/sample_data``.
        seed: The seed of the generator (the same seed gives the same files).

    Returns:
        The paths of the image (``<name>.tif``, or ``<name>_seed<seed>.tif``) and of its labels
        (``..._labels.tif``).

    Raises:
        ValueError: Unknown name, or a directory that cannot be written.
    """
    import tifffile

    if name not in SYNTHETIC_SAMPLES:
        raise ValueError(f"Unknown sample {name!r}; available: {', '.join(SYNTHETIC_SAMPLES)}.")
    directory = _prepare_directory(_sample_data_directory() if directory is None else directory)
    image, labels = SYNTHETIC_SAMPLES[name][0](seed=seed)
    stem = name if seed == 0 else f"{name}_seed{seed}"
    paths = []
    for suffix, data in (("", image), ("_labels", labels)):
        path = directory / f"{stem}{suffix}.tif"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tif", dir=directory)
        os.close(fd)
        try:
            tifffile.imwrite(tmp, data, compression="zlib")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        paths.append(str(path))
    return paths[0], paths[1]


def _main(argv: Optional[List[str]] = None) -> int:
    from . import _cli

    parser = _cli.ArgumentParser(
        prog="python -m micro_sam.sample_data",
        description="Print the path of a sample image (offline), e.g. for micro_sam.automatic_segmentation -i "
        "\"$(python -m micro_sam.sample_data)\" ... Without a name: the bundled 512 x 512 nuclei image. With a "
        "name: a synthetic sample written as <name>.tif and <name>_labels.tif into --output_folder (default: "
        "<cache directory>/sample_data).",
        epilog="samples: " + "; ".join(f"{name}: {text}" for name, (_, text) in SYNTHETIC_SAMPLES.items()),
    )
    parser.add_argument("name", nargs="?", default=None, choices=list(SYNTHETIC_SAMPLES),
                        help="The synthetic sample to write (see below).")
    parser.add_argument("--labels", action="store_true", help="Print the path of its instance labels instead.")
    parser.add_argument("-o", "--output_folder", default=None, help="Where to write a named sample.")
    parser.add_argument("--seed", type=int, default=0, help="The seed of the generator (default: 0).")
    args = parser.parse_args(argv)
    if args.name is None:
        if args.output_folder is not None or args.seed != 0:
            raise _cli.UsageError("--output_folder and --seed need a sample name, e.g. nuclei_2d")
        print(sample_labels_path() if args.labels else sample_image_path())
        return 0
    image_path, labels_path = write_sample(args.name, args.output_folder, args.seed)
    print(labels_path if args.labels else image_path)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m micro_sam.sample_data [NAME] [--labels] [-o FOLDER] [--seed N]``: print a sample's path.

    Without a name the bundled sample image (or its labels); with a name of :data:`SYNTHETIC_SAMPLES` the
    synthetic sample is written first (see :func:`write_sample`).

    Args:
        argv: The arguments; None reads ``sys.argv``.

    Returns:
        The exit code (0; 2 with one line on stderr for invalid arguments).
    """
    from . import _cli

    return _cli.run_main(_main, argv, prog="python -m micro_sam.sample_data")


if __name__ == "__main__":
    raise SystemExit(main())
