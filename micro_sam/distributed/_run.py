"""Shared pieces of the dask runs: the model spec from user arguments, argument checks, and running a list of
tasks with retries and a progress bar."""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence

from ._worker import ModelSpec

_MODES = (None, "auto", "ais", "apg", "amg")


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def make_spec(model_type: str, checkpoint, device, segmentation_mode, tile_shape, halo,
              segmenter_kwargs: Optional[Dict[str, Any]], segmenter_factory: Optional[Callable]) -> ModelSpec:
    """The :class:`ModelSpec` for the workers, with the arguments checked here (not on the cluster).

    Raises:
        ValueError: Unknown mode, a checkpoint that does not exist, tile arguments that do not go together, or a
            factory that is not callable.
    """
    mode = None if segmentation_mode is None else str(segmentation_mode).lower()
    if mode not in _MODES:
        raise ValueError(f"Invalid segmentation_mode {segmentation_mode!r}; choose 'ais', 'apg', 'amg' or None.")
    if (tile_shape is None) != (halo is None):
        raise ValueError("tile_shape and halo must be given together (or neither).")
    if checkpoint is not None:
        checkpoint = os.path.abspath(os.fspath(checkpoint))
        if not os.path.isfile(checkpoint):
            raise ValueError(f"The checkpoint {checkpoint!r} does not exist (workers read it from this path).")
    if segmenter_factory is not None and not callable(segmenter_factory):
        raise ValueError(f"segmenter_factory must be callable, got {type(segmenter_factory).__name__}.")
    if segmenter_factory is None and checkpoint is None:
        from .. import util

        if model_type not in util.get_model_names():
            raise ValueError(f"Unknown model {model_type!r}; use one of {', '.join(util.get_model_names())} or "
                             "pass a checkpoint.")
    mode = None if mode == "auto" else mode
    if mode is None and segmenter_factory is None and checkpoint is None:
        from .. import _registry
        from ..instance_segmentation import DEFAULT_SEGMENTATION_MODE_WITH_DECODER

        entry = _registry.get_entry(model_type)  # bundled models come with their decoder
        has_decoder = _registry.decoder_entry(model_type) is not None or entry.bundled_file is not None
        mode = DEFAULT_SEGMENTATION_MODE_WITH_DECODER if has_decoder else "amg"
    return ModelSpec(model_type=model_type, checkpoint=checkpoint, device=device, segmentation_mode=mode,
                     is_tiled=tile_shape is not None, segmenter_kwargs=_hashable(dict(segmenter_kwargs or {})),
                     factory=segmenter_factory)


def validate_generate_kwargs(spec: ModelSpec, generate_kwargs: Dict[str, Any], ndim: int) -> None:
    """Reject keyword arguments that no segmenter of the requested mode accepts (before any work is sent).

    Raises:
        ValueError: Unknown argument names.
    """
    if spec.factory is not None:
        return
    from ..automatic_segmentation import _parameters, _segmenter_classes

    modes = [spec.segmentation_mode] if spec.segmentation_mode else ["ais", "amg"]
    known = {"gap_closing", "min_z_extent", "with_background"} if ndim == 3 else set()
    for mode in modes:
        known |= set(_parameters(_segmenter_classes(mode, spec.is_tiled).generate))
    known -= {"output_mode", "segmentation", "tile_shape", "halo"}  # set by the run itself
    unknown = sorted(set(generate_kwargs) - known)
    if unknown:
        raise ValueError(f"Unknown segmentation argument(s) {unknown}; valid: {sorted(known)}.")
    for name in spec.segmenter_kwargs:
        init = set()
        for mode in modes:
            init |= set(_parameters(_segmenter_classes(mode, spec.is_tiled).__init__))
        if name[0] not in init:
            raise ValueError(f"Unknown segmenter argument {name[0]!r}; valid: {sorted(init)}.")


def run_tasks(client, function: Callable, arguments: Sequence[tuple], description: str, retries: int,
              verbose: bool) -> List[Any]:
    """Run ``function(*args)`` for each entry of ``arguments`` on the cluster; results in input order.

    A task that raises is retried ``retries`` times; one whose worker dies is rerun by the scheduler. On an
    interrupt (Ctrl-C) the tasks are cancelled. Tasks that finished before write their results (the callers'
    markers), so that a later call only runs what is missing.

    Raises:
        RuntimeError: Tasks that still failed, with the first error.
        KeyboardInterrupt: Interrupted; the tasks were cancelled.
    """
    from distributed import as_completed
    from tqdm import tqdm

    if not arguments:
        return []
    futures = [client.submit(function, *args, retries=retries, pure=False) for args in arguments]
    index = {future.key: i for i, future in enumerate(futures)}
    results: List[Any] = [None] * len(futures)
    errors = []
    try:
        with tqdm(total=len(futures), desc=description, disable=not verbose) as progress:
            for future in as_completed(futures):
                if future.status == "error":
                    errors.append((index[future.key], future.exception()))
                else:
                    results[index[future.key]] = future.result()
                progress.update(1)
    except KeyboardInterrupt:
        client.cancel(futures)
        raise
    if errors:
        errors.sort(key=lambda e: e[0])
        raise RuntimeError(f"{len(errors)} of {len(futures)} task(s) of '{description}' failed; finished tasks are "
                           f"kept, run again to retry the rest. First error (task {errors[0][0]}): "
                           f"{type(errors[0][1]).__name__}: {errors[0][1]}") from errors[0][1]
    return results
