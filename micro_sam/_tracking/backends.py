"""The choice of linker: trackastra (pretrained name or local model folder) or the weight-free overlap linker.

``resolve_linker`` is called before any expensive work: it checks the model argument, loads the trackastra
model (downloading a pretrained one on first use, as trackastra does), and falls back to the overlap linker with
a warning when trackastra is not installed or a pretrained model can neither be found in trackastra's cache nor
downloaded. A name that trackastra does not know, a folder that is not a trackastra model, or a broken cache are
errors, never a silent fallback.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import numpy as np

from .graph import TrackingGraph, frame_objects, graph_nodes
from .linker import OverlapLinker

#: The name that selects the weight-free overlap linker.
OVERLAP_MODEL = "overlap"
#: The pretrained models of trackastra 0.5 (used to check names when trackastra is not installed).
TRACKASTRA_MODELS = ("general_2d", "ctc", "general_2d_w_SAM2_features")
#: The linking modes of micro_sam / trackastra.
TRACKING_MODES = ("greedy_nodiv", "greedy", "ilp")
_FOLDER_FILES = ("config.yaml", "train_config.yaml", "model.pt")

Linker = Callable[[np.ndarray, np.ndarray, Callable, bool], TrackingGraph]


def trackastra_installed() -> bool:
    """Whether the optional package trackastra can be imported (without importing it)."""
    if "trackastra" in sys.modules:  # imported already, or blocked (None)
        return sys.modules["trackastra"] is not None
    return importlib.util.find_spec("trackastra") is not None


def _known_names() -> Tuple[str, ...]:
    if trackastra_installed():
        from trackastra.model.pretrained import _MODELS

        return tuple(_MODELS)
    return TRACKASTRA_MODELS


def _trackastra_cache(name: str) -> Path:
    """The folder in which trackastra keeps a downloaded pretrained model."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("trackastra")) / "models" / name


def _load_trackastra(folder: Path):
    import torch
    from trackastra.model import Trackastra

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return Trackastra.from_folder(folder, device=device)
    except Exception as error:  # broken files: name the folder so that it can be deleted or fixed
        raise RuntimeError(f"Could not load the trackastra model from {str(folder)!r} ({type(error).__name__}: "
                           f"{error}); delete the folder to download it again or pass another model.") from error


def _download_trackastra(name: str) -> Optional[Path]:
    """Download a pretrained trackastra model into trackastra's cache; None if it cannot be downloaded."""
    from trackastra.model.pretrained import download_pretrained

    try:
        import requests

        network_errors = (OSError, zipfile.BadZipFile, requests.exceptions.RequestException)
    except ImportError:  # pragma: no cover - requests is a dependency of trackastra
        network_errors = (OSError, zipfile.BadZipFile)
    try:
        return Path(download_pretrained(name))
    except network_errors as error:
        warnings.warn(f"The trackastra model {name!r} is not cached and could not be downloaded "
                      f"({type(error).__name__}: {error}).", stacklevel=4)
        return None


def _validate_mode(mode) -> str:
    if mode not in TRACKING_MODES:
        raise ValueError(f"Invalid mode {mode!r}; choose one of {TRACKING_MODES}.")
    return mode


def _overlap(linker: OverlapLinker, mode: str) -> Linker:
    def link(timeseries, segmentation, pbar_update, verbose):
        return linker.link(segmentation, divisions=mode != "greedy_nodiv", pbar_update=pbar_update)
    return link


def _trackastra_linker(model, mode: str) -> Linker:
    def link(timeseries, segmentation, pbar_update, verbose):
        return trackastra_graph(model, timeseries, segmentation, mode, pbar_update, verbose)
    return link


def resolve_linker(tracking_model: Union[str, os.PathLike, OverlapLinker], mode: str) -> Tuple[str, Linker]:
    """Check the tracking model; return ``link(timeseries, segmentation, pbar_update, verbose) -> TrackingGraph``.

    Args:
        tracking_model: A trackastra pretrained model name, a local trackastra model folder, ``"overlap"`` or an
            :class:`OverlapLinker`.
        mode: The linking mode, one of :data:`TRACKING_MODES`.

    Returns:
        A description of the linker ("overlap" or "trackastra <name or folder>") and the linking function.

    Raises:
        ValueError: For an invalid mode, an unknown model name or a folder without a trackastra model.
        RuntimeError: If a model folder is given but trackastra is not installed, or a model cannot be loaded.
    """
    mode = _validate_mode(mode)
    if isinstance(tracking_model, OverlapLinker):
        return "overlap", _overlap(tracking_model, mode)
    if not isinstance(tracking_model, (str, os.PathLike)):
        raise ValueError(f"tracking_model must be a trackastra model name, a model folder, {OVERLAP_MODEL!r} or an "
                         f"OverlapLinker, got {type(tracking_model).__name__}.")
    if tracking_model == OVERLAP_MODEL:
        return "overlap", _overlap(OverlapLinker(), mode)

    path = Path(tracking_model)
    if path.is_dir():
        missing = [name for name in _FOLDER_FILES if not (path / name).is_file()]
        if missing:
            raise ValueError(f"The folder {str(path)!r} is not a trackastra model: it lacks {missing}.")
        if not trackastra_installed():
            raise RuntimeError(f"Loading the trackastra model folder {str(path)!r} needs trackastra; install it with "
                               "'pip install trackastra' (or use tracking_model='overlap').")
        return f"trackastra {str(path)!r}", _trackastra_linker(_load_trackastra(path), mode)

    name = str(tracking_model)
    known = _known_names()
    if name not in known:
        raise ValueError(f"Unknown tracking model {name!r}: it is neither a trackastra pretrained model "
                         f"{list(known)} nor an existing model folder; use one of these, or {OVERLAP_MODEL!r} for "
                         "micro_sam's overlap linker that needs no weights.")
    if not trackastra_installed():
        warnings.warn(f"trackastra is not installed, so the tracking model {name!r} is not available; the objects "
                      "are linked with micro_sam's overlap linker instead (tracking_model='overlap'). Install "
                      "trackastra ('pip install trackastra') to use its pretrained models.", stacklevel=3)
        return "overlap", _overlap(OverlapLinker(), mode)
    folder = _trackastra_cache(name)
    if not folder.is_dir():
        folder = _download_trackastra(name)
        if folder is None:
            warnings.warn(f"Linking with micro_sam's overlap linker instead of the trackastra model {name!r} "
                          "(tracking_model='overlap'); run once with network access to cache the trackastra model.",
                          stacklevel=3)
            return "overlap", _overlap(OverlapLinker(), mode)
    return f"trackastra {name!r}", _trackastra_linker(_load_trackastra(folder), mode)


def trackastra_graph(
    model, timeseries: np.ndarray, segmentation: np.ndarray, mode: str, pbar_update: Callable, verbose: bool = True,
) -> TrackingGraph:
    """Link the objects with a loaded trackastra model; objects trackastra leaves out stay unlinked nodes."""
    tables = [frame_objects(frame) for frame in segmentation]
    offsets, labels = graph_nodes([table.labels for table in tables])
    # Per frame consecutive labels 1..n: trackastra's node labels then index the node table directly.
    compact = np.stack([table.index for table in tables]).astype("int32")
    images = np.asarray(timeseries, dtype="float32")
    if images.ndim == 4:  # (T, Y, X, C): trackastra takes one channel
        images = images.mean(axis=-1)
    edges = np.zeros((0, 2), dtype="int64")
    if compact.any():
        kwargs = {}
        if not verbose and "progbar_class" in inspect.signature(model.track).parameters:
            from functools import partial

            from tqdm import tqdm

            kwargs["progbar_class"] = partial(tqdm, disable=True)
        result = model.track(images, compact, mode=mode, **kwargs)
        graph = result[0] if isinstance(result, tuple) else result  # trackastra >= 0.3 also returns masks
        node_id = {}
        for node, data in graph.nodes(data=True):
            t, k = int(data["time"]), int(data["label"])
            if not 0 <= t < len(tables) or not 1 <= k <= len(tables[t].labels):
                raise RuntimeError(f"trackastra returned the object {k} in frame {t}, which is not in the "
                                   "segmentation.")
            node_id[node] = int(offsets[t]) + k - 1
        edges = np.array([(node_id[u], node_id[v]) for u, v in graph.edges], dtype="int64").reshape(-1, 2)
    pbar_update(1)
    return TrackingGraph(offsets=offsets, labels=labels, edges=edges)
