"""Downloads of evaluation data sets: a registry of URLs and SHA256 hashes, fetched with pooch.

The registry (``micro_sam/_data/evaluation_datasets.tsv``) lists per data set its URL and hash, whether it is
a zip archive or a single file, the glob patterns of the images and labels inside the unpacked archive, and the
dataset keys inside container files (hdf5 / zarr / n5). A download goes to a temporary file and is moved in
place only when its hash matches; an archive is unpacked next to it (``<name>.zip.unzip``). Entries without a
recorded hash (LIVECell publishes none) are downloaded unverified, with a warning.
"""
from __future__ import annotations

import csv
import os
import re
import warnings
from dataclasses import dataclass
from glob import glob
from importlib import resources
from typing import Dict, List, Optional, Tuple

_REGISTRY_FILE = "evaluation_datasets.tsv"


@dataclass(frozen=True)
class DatasetEntry:
    """One downloadable file of the evaluation data registry."""

    name: str
    ndim: int
    url: str
    sha256: str
    archive: str  # "zip" or "file"
    images: str = ""
    labels: str = ""
    image_key: str = ""
    label_key: str = ""


def load_registry() -> Dict[str, DatasetEntry]:
    """The evaluation data registry, name -> :class:`DatasetEntry` (read at call time; tests replace it)."""
    text = resources.files("micro_sam").joinpath("_data", _REGISTRY_FILE).read_text(encoding="utf-8")
    entries = {}
    for row in csv.DictReader(text.splitlines(), delimiter="\t"):
        row = {key: (value or "") for key, value in row.items()}
        entries[row["name"]] = DatasetEntry(**{**row, "ndim": int(row["ndim"])})
    return entries


def natural_key(path: str):
    """Sort key that puts ``image2`` before ``image10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def fetch(name: str, folder: str, verbose: bool = True) -> str:
    """Download a registry entry into ``folder`` (once) and return the file, or the unpacked archive's folder.

    Raises:
        ValueError: Unknown name, or a download whose hash does not match.
    """
    import pooch

    registry = load_registry()
    if name not in registry:
        raise ValueError(f"Unknown evaluation data {name!r}; the registry has {sorted(registry)}.")
    entry = registry[name]
    os.makedirs(folder, exist_ok=True)
    known_hash = f"sha256:{entry.sha256}" if entry.sha256 else None
    if known_hash is None:
        warnings.warn(f"No hash is recorded for {name!r}: its download from {entry.url} cannot be verified.")
    fname = f"{name}.zip" if entry.archive == "zip" else f"{name}{os.path.splitext(entry.url.split('?')[0])[1]}"
    processor = pooch.Unzip(extract_dir=f"{fname}.unzip") if entry.archive == "zip" else None
    try:
        pooch.retrieve(url=entry.url, known_hash=known_hash, fname=fname, path=folder, progressbar=verbose,
                       processor=processor)
    except ValueError as error:  # hash mismatch; pooch has removed the download
        raise ValueError(f"The download of {name!r} from {entry.url} failed verification: {error}") from None
    return os.path.join(folder, f"{fname}.unzip") if entry.archive == "zip" else os.path.join(folder, fname)


def dataset_paths(name: str, root: str) -> Tuple[List[str], List[str]]:
    """The image and label files of a registry data set unpacked at ``root``, matched in natural sort order.

    Raises:
        RuntimeError: If no images are found or their number differs from the labels'.
    """
    entry = load_registry()[name]
    images = sorted(glob(os.path.join(root, entry.images)), key=natural_key)
    labels = sorted(glob(os.path.join(root, entry.labels)), key=natural_key)
    if not images or len(images) != len(labels):
        raise RuntimeError(f"The data of {name!r} at {root!r} is incomplete: {len(images)} images "
                           f"({entry.images}) and {len(labels)} labels ({entry.labels}).")
    return images, labels


def keys(name: str) -> Tuple[Optional[str], Optional[str]]:
    """The dataset keys of images and labels inside container files (None for image files)."""
    entry = load_registry()[name]
    return entry.image_key or None, entry.label_key or None
