"""The model registry: names, download URLs and xxh128 hashes, the cache directory and verified downloads.

The registry is a table shipped with the package (``_data/model_registry.tsv``). Models that are shipped
inside the package (the demo model) are listed in ``_data/bundled_models.tsv`` and never downloaded.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, Optional

_ARCHITECTURES = ("vit_t", "vit_b", "vit_l", "vit_h")


@dataclass(frozen=True)
class ModelEntry:
    """One file of the registry: a SAM checkpoint or the instance segmentation decoder of a model."""

    name: str
    architecture: str
    url: Optional[str]
    xxh128: str
    bundled_file: Optional[str] = None  # name of a file in micro_sam/_data, for models shipped in the package

    @property
    def known_hash(self) -> str:
        return f"xxh128:{self.xxh128}"


def _read_tsv(name: str):
    data = resources.files("micro_sam").joinpath("_data", name)
    if not data.is_file():
        return []
    with data.open("r", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@lru_cache(maxsize=1)
def registry() -> Dict[str, ModelEntry]:
    """The registry: file name (e.g. ``vit_b_lm`` or ``vit_b_lm_decoder``) -> :class:`ModelEntry`."""
    entries = {}
    for row in _read_tsv("model_registry.tsv"):
        entries[row["name"]] = ModelEntry(row["name"], row["architecture"], row["url"], row["xxh128"])
    for row in _read_tsv("bundled_models.tsv"):
        entries[row["name"]] = ModelEntry(
            row["name"], row["architecture"], None, row["xxh128"], bundled_file=row["file"]
        )
    return entries


def get_model_names() -> list:
    """The names of all models that can be passed as ``model_type`` (decoder files excluded)."""
    return [name for name in registry() if not name.endswith("_decoder")]


_FAMILIES = {"": "Segment Anything", "lm": "light microscopy", "em_organelles": "electron microscopy",
             "histopathology": "histopathology", "medical_imaging": "medical imaging", "demo": "bundled, offline"}


def describe_model_names() -> str:
    """The registered model names grouped by family, on one line (for error messages)."""
    groups: Dict[str, list] = {}
    for name in get_model_names():
        suffix = name[6:] if len(name) > 5 else ""
        groups.setdefault(_FAMILIES.get(suffix, suffix.replace("_", " ")), []).append(name)
    return "; ".join(f"{family}: {', '.join(sorted(names))}" for family, names in groups.items())


def get_entry(model_type: str) -> ModelEntry:
    """Look up a model by name; an unknown name is a ValueError listing the valid ones by family."""
    entries = registry()
    if model_type not in entries or model_type.endswith("_decoder"):
        from difflib import get_close_matches

        close = get_close_matches(str(model_type), get_model_names(), n=1)
        hint = f"Did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"Unknown model_type {model_type!r}. {hint}Registered models ({describe_model_names()}); the list is "
            "micro_sam.util.get_model_names(). For your own weights pass checkpoint_path (-c) with the "
            "architecture (vit_t, vit_b, vit_l or vit_h)."
        )
    return entries[model_type]


def decoder_entry(model_type: str) -> Optional[ModelEntry]:
    """The registry entry of the instance segmentation decoder that belongs to a model, if it has one."""
    return registry().get(f"{model_type}_decoder")


def get_cache_directory() -> str:
    """The directory for downloaded models and data: ``$MICROSAM_CACHEDIR`` or the OS cache dir."""
    env = os.environ.get("MICROSAM_CACHEDIR")
    if env:
        return os.path.expanduser(env)
    import pooch

    return str(pooch.os_cache("micro_sam"))


def models():
    """A :class:`pooch.Pooch` over all downloadable registry files, stored in ``<cache>/models``."""
    import pooch

    downloadable = {name: entry for name, entry in registry().items() if entry.url}
    return pooch.create(
        path=os.path.join(get_cache_directory(), "models"),
        base_url="",
        registry={name: entry.known_hash for name, entry in downloadable.items()},
        urls={name: entry.url for name, entry in downloadable.items()},
    )


def bundled_path(entry: ModelEntry) -> Path:
    """The path of a model file shipped inside the package."""
    path = Path(str(resources.files("micro_sam").joinpath("_data", entry.bundled_file)))
    if not path.is_file():
        raise RuntimeError(f"The bundled model file {path} is missing; the installation is incomplete.")
    return path


def fetch(name: str, progress_bar: bool = True, progress_bar_factory: Optional[Callable] = None) -> Path:
    """Return the local path of a registry file, downloading it if needed.

    Downloads are verified against the registry's xxh128 hash and written atomically: pooch writes to a
    temporary file in the target folder and moves it in place only after the hash matched, so an interrupted
    or corrupted download leaves no file behind.
    """
    entry = registry()[name]
    if entry.bundled_file is not None:
        return bundled_path(entry)
    import pooch

    progressbar = progress_bar_factory() if progress_bar_factory is not None else progress_bar
    downloader = pooch.HTTPDownloader(progressbar=progressbar, timeout=60)
    return Path(models().fetch(name, downloader=downloader))
