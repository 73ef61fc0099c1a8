"""Environment information (``micro_sam.info``): versions, devices, the cache directory and the models.

The command prints what a bug report needs and what a user wants to know before starting: which version runs,
on which devices, where models are cached, which models exist and which of them are already on this machine.
``--download`` fetches models into the cache (hash-checked, see :mod:`micro_sam._registry`).
"""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Dict, List, Optional, Sequence, TextIO

from . import _registry
from .__version__ import __version__

# Distribution names whose versions are reported, in this order; "-" marks packages that are not installed.
_PACKAGES = (
    "torch", "torchvision", "segment-anything", "torch-em", "numpy", "scipy", "scikit-image", "zarr",
    "napari", "scikit-learn", "onnx", "onnxruntime", "bioimageio.core",
)

# Model families in display order: (title, predicate on the model name).
_FAMILIES = (
    ("Bundled with the package (no download)", lambda name, entry: entry.bundled_file is not None),
    ("Segment Anything (original weights)", lambda name, entry: name in ("vit_t", "vit_b", "vit_l", "vit_h")),
    ("Light microscopy", lambda name, entry: name.endswith("_lm")),
    ("Electron microscopy (organelles)", lambda name, entry: name.endswith("_em_organelles")),
    ("Histopathology", lambda name, entry: name.endswith("_histopathology")),
    ("Medical imaging", lambda name, entry: name.endswith("_medical_imaging")),
)


def _package_versions() -> Dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    return versions


def _memory_gb() -> Optional[float]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
    except (ValueError, OSError, AttributeError):  # not available on every OS
        return None


def _devices() -> List[str]:
    """One line per accelerator torch can use, and the device micro_sam picks by default."""
    import torch

    from ._sam_loading import get_device

    lines = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            lines.append(f"cuda:{index}: {properties.name}, {properties.total_memory / 1024 ** 3:.1f} GB")
    if torch.backends.mps.is_available() and torch.backends.mps.is_built():
        lines.append("mps: Apple Metal (MPS) available")
    if not lines:
        lines.append("no GPU found: computations run on the CPU")
    lines.append(f"default device: {get_device()}")
    return lines


def _has_decoder(name: str, entry) -> bool:
    """Whether a model comes with an instance segmentation decoder (registry file or, bundled, in its file)."""
    if _registry.decoder_entry(name) is not None:
        return True
    if entry.bundled_file is None:
        return False
    from ._checkpoints import safe_load

    state = safe_load(_registry.bundled_path(entry))
    return isinstance(state, dict) and state.get("decoder_state") is not None


def _model_groups(cache_dir: str) -> Dict[str, List[str]]:
    """Family title -> lines ``name (architecture) [with AIS decoder] [cached]``."""
    entries = _registry.registry()
    groups: Dict[str, List[str]] = {title: [] for title, _ in _FAMILIES}
    groups["Other"] = []
    for name in _registry.get_model_names():
        entry = entries[name]
        title = next((t for t, belongs in _FAMILIES if belongs(name, entry)), "Other")
        notes = [entry.architecture]
        if _has_decoder(name, entry):
            notes.append("with instance segmentation decoder")
        if entry.bundled_file is None and os.path.isfile(os.path.join(cache_dir, "models", name)):
            notes.append("downloaded")
        groups[title].append(f"{name} ({', '.join(notes)})")
    return {title: lines for title, lines in groups.items() if lines}


def collect_info() -> Dict[str, object]:
    """The information that ``micro_sam.info`` prints, as a dict (for bug reports or a GUI's about box).

    Returns:
        ``{"micro_sam", "python", "platform", "cpus", "memory_gb", "packages", "devices", "cache_directory",
        "models"}``; ``packages`` maps distribution names to versions ("-" when not installed), ``models`` maps
        family titles to model lines.
    """
    cache_dir = _registry.get_cache_directory()
    return {
        "micro_sam": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "packages": _package_versions(),
        "devices": _devices(),
        "cache_directory": cache_dir,
        "models": _model_groups(cache_dir),
    }


def print_info(info: Optional[Dict[str, object]] = None, file: Optional[TextIO] = None) -> None:
    """Print :func:`collect_info`'s result as plain text sections."""
    info = collect_info() if info is None else info
    out = file if file is not None else sys.stdout
    memory = info["memory_gb"]
    lines = [
        f"micro_sam {info['micro_sam']}",
        "",
        "System",
        f"  python {info['python']} on {info['platform']}",
        f"  {info['cpus']} CPUs" + ("" if memory is None else f", {memory:.1f} GB RAM"),
        "",
        "Devices",
        *(f"  {line}" for line in info["devices"]),
        "",
        "Packages",
        *(f"  {name}: {version}" for name, version in info["packages"].items()),
        "",
        "Cache directory",
        f"  {info['cache_directory']}"
        + ("" if os.environ.get("MICROSAM_CACHEDIR") is None else "  (set by MICROSAM_CACHEDIR)"),
        "",
        "Models (pass the name as model_type / -m)",
    ]
    for title, models in info["models"].items():
        lines.append(f"  {title}")
        lines.extend(f"    {model}" for model in models)
    print("\n".join(lines), file=out)


def _models_to_download(words: Sequence[str]) -> List[str]:
    """Parse ``--download models [NAME ...]``: no names means every downloadable model."""
    mode, *names = words
    if mode.lower() not in ("model", "models"):
        raise ValueError(f"--download expects 'models' followed by optional model names, got {mode!r}.")
    entries = _registry.registry()
    downloadable = [name for name in _registry.get_model_names() if entries[name].url]
    if not names:
        return downloadable
    unknown = [name for name in names if name not in downloadable]
    if unknown:
        raise ValueError(f"Unknown model(s) {', '.join(map(repr, unknown))}; downloadable models: "
                         f"{', '.join(downloadable)}.")
    return list(names)


def download_models(names: Sequence[str], verbose: bool = True) -> None:
    """Download models (and their instance segmentation decoders) into the cache, verified by their hash."""
    from tqdm import tqdm

    for name in tqdm(names, desc="Downloading models", disable=not verbose):
        _registry.fetch(name, progress_bar=verbose)
        decoder = _registry.decoder_entry(name)
        if decoder is not None:
            _registry.fetch(decoder.name, progress_bar=verbose)


def _main(argv: Optional[List[str]] = None) -> int:
    from . import _cli

    parser = _cli.ArgumentParser(
        prog="micro_sam.info",
        description="Show the micro_sam version, the devices, the cache directory and the available models.",
    )
    parser.add_argument(
        "--download", nargs="+", metavar="WORD",
        help="'--download models' downloads every model into the cache; '--download models NAME [NAME ...]' "
             "the named ones.",
    )
    parser.add_argument("--quiet", action="store_true", help="Do not show download progress.")
    args = parser.parse_args(argv)
    try:
        to_download = _models_to_download(args.download) if args.download else []
    except ValueError as error:
        raise _cli.UsageError(str(error)) from None
    print_info()
    if to_download:
        try:
            download_models(to_download, verbose=not args.quiet)
        except (OSError, ValueError) as error:  # network errors (requests' are OSErrors), hash mismatches
            raise _cli.CommandError(f"the download failed: {error}") from None
        print(f"Downloaded {len(to_download)} model(s) into {_registry.get_cache_directory()}.")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point ``micro_sam.info``: one line on stderr and exit code 2 for invalid arguments, 1
    for a failed download."""
    from . import _cli

    return _cli.run_main(_main, argv, prog="micro_sam.info")


if __name__ == "__main__":
    sys.exit(main())
