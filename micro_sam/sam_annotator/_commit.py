"""Committing objects: merging a segmentation into the committed objects, and the commit file on disk.

Pure array functions and zarr I/O, no napari: the commit widget calls them and puts the result in the layers.

The commit file (``commit_path``) is a zarr group in micro_sam's layout: the array ``committed_objects``
(the label image of all committed objects), the attributes ``data_signature`` (of the image, as in the
embedding cache), ``model_type`` / ``model_name``, ``tile_shape`` / ``halo`` and ``commit_history`` (one entry
per commit with the layer and the settings), and a group ``prompts/<object id>`` with the prompts that
segmented an interactively committed object (``point_prompts``, ``point_labels``, ``prompts``).
Each commit writes the changed region of ``committed_objects`` first and the history last.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

PRESERVE_MODES = ("objects", "pixels", "none")
COMMIT_ARRAY = "committed_objects"


def _bounding_box(mask: np.ndarray) -> Tuple[slice, ...]:
    """The smallest box (tuple of slices) around the True pixels of ``mask`` (empty mask: all empty slices)."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1) if len(hits) else slice(0, 0))
    return tuple(box)


def merge_into_committed(
    committed: np.ndarray,
    segmentation: np.ndarray,
    preserve_mode: str = "objects",
    preservation_threshold: float = 0.75,
) -> Tuple[np.ndarray, np.ndarray, Dict[int, int]]:
    """Add the objects of ``segmentation`` to the committed objects, with new ids after the largest one.

    Preserve modes (micro_sam's):
    - "objects": a new object that covers at least ``preservation_threshold`` of a committed object is that
      object again: it is not added and the committed object stays; other new objects are added (also over
      committed pixels);
    - "pixels": new objects never overwrite committed pixels;
    - "none": new objects overwrite committed pixels.

    Args:
        committed: The committed label image; not modified.
        segmentation: The label image to commit (same shape; 0 = nothing).
        preserve_mode: "objects", "pixels" or "none".
        preservation_threshold: The overlap (fraction of the committed object's pixels) in [0, 1] above which
            a new object counts as the same object ("objects" mode).

    Returns:
        The new committed label image, the boolean mask of the pixels written, and the mapping
        {id in ``segmentation``: new committed id} of the objects added.

    Raises:
        ValueError: Shapes differ, an unknown mode or a threshold outside [0, 1].
    """
    committed, segmentation = np.asarray(committed), np.asarray(segmentation)
    if committed.shape != segmentation.shape:
        raise ValueError(f"The segmentation (shape {segmentation.shape}) must have the shape of the committed "
                         f"objects {committed.shape}.")
    if preserve_mode not in PRESERVE_MODES:
        raise ValueError(f"Unknown preserve_mode {preserve_mode!r}; choose one of {PRESERVE_MODES}.")
    if not 0 <= float(preservation_threshold) <= 1:
        raise ValueError(f"preservation_threshold must lie in [0, 1], got {preservation_threshold}.")
    write = segmentation != 0
    if preserve_mode == "pixels":
        write &= committed == 0
    elif preserve_mode == "objects" and committed.any() and write.any():
        skip = _matched_new_objects(committed, segmentation, float(preservation_threshold))
        if len(skip):
            write &= ~np.isin(segmentation, skip)
    new_ids = np.unique(segmentation[write])
    offset = int(committed.max()) if committed.size else 0
    mapping = {int(old): offset + k for k, old in enumerate(new_ids.tolist(), start=1)}
    merged = committed.astype("uint32", copy=True)
    if len(new_ids):
        lut = np.zeros(int(new_ids[-1]) + 1, dtype="uint32")
        lut[new_ids] = np.arange(offset + 1, offset + 1 + len(new_ids), dtype="uint32")
        merged[write] = lut[segmentation[write]]
    return merged, write, mapping


def _matched_new_objects(committed: np.ndarray, segmentation: np.ndarray, threshold: float) -> np.ndarray:
    """Ids of new objects that cover at least ``threshold`` of some committed object."""
    both = (committed != 0) & (segmentation != 0)
    pairs, counts = np.unique(np.stack([committed[both], segmentation[both]]), axis=1, return_counts=True)
    if pairs.size == 0:
        return np.zeros(0, dtype=segmentation.dtype)
    sizes = np.bincount(committed.ravel().astype("int64"))
    fraction = counts / sizes[pairs[0].astype("int64")]
    return np.unique(pairs[1][fraction >= threshold])


# --- the commit file ---------------------------------------------------------------------------------------
def check_commit_path(path, data_signature: str, shape: Sequence[int]) -> None:
    """Check that the commit file can be written for this image, before anything is changed.

    Raises:
        ValueError: The path is a file, not writable, or holds annotations of another image or shape.
    """
    import zarr

    path = os.fspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"commit_path {path!r} is a file; choose a folder (a zarr group) for the commits.")
        if not os.access(path, os.W_OK):
            raise ValueError(f"commit_path {path!r} is not writable; choose another folder.")
        if os.listdir(path):
            try:
                group = zarr.open_group(path, mode="r")
            except Exception:  # noqa: BLE001 - any unreadable folder is the same problem for the user
                raise ValueError(f"commit_path {path!r} exists and is not a zarr group of commits; choose a new "
                                 "or empty folder.") from None
            saved = group.attrs.get("data_signature")
            if saved is not None and saved != data_signature:
                raise ValueError(f"commit_path {path!r} holds the annotations of another image (data signature "
                                 f"{saved} != {data_signature}); choose another folder. Nothing was written.")
            if COMMIT_ARRAY in group and tuple(group[COMMIT_ARRAY].shape) != tuple(shape):
                raise ValueError(f"commit_path {path!r} holds annotations of shape {group[COMMIT_ARRAY].shape}, "
                                 f"the image has shape {tuple(shape)}; choose another folder.")
    else:
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ValueError(f"commit_path {path!r} cannot be created: {parent!r} is a file, not a folder.")
        if not os.access(parent, os.W_OK):
            raise ValueError(f"commit_path {path!r} cannot be created: {parent!r} is not writable.")


def load_committed(path, data_signature: str) -> Optional[np.ndarray]:
    """The committed objects stored at ``path`` for the image with ``data_signature`` (None if there are none).

    Raises:
        ValueError: The file belongs to another image.
    """
    import zarr

    path = os.fspath(path)
    if not os.path.isdir(path) or not os.listdir(path):
        return None
    group = zarr.open_group(path, mode="r")
    saved = group.attrs.get("data_signature")
    if saved is not None and saved != data_signature:
        raise ValueError(f"commit_path {path!r} holds the annotations of another image; choose another folder.")
    if COMMIT_ARRAY not in group:
        return None
    return group[COMMIT_ARRAY][...]


def write_commit(
    path,
    committed: np.ndarray,
    written: np.ndarray,
    attrs: Dict[str, Any],
    history_entry: Dict[str, Any],
    prompts: Optional[Dict[int, Dict[str, np.ndarray]]] = None,
) -> None:
    """Write one commit to the commit file: the changed region, the prompts, then the history entry.

    Args:
        path: The commit folder (zarr group; created if needed).
        committed: The full committed label image after the commit.
        written: The boolean mask of the pixels this commit changed.
        attrs: Attributes describing the image and model (``data_signature``, ``model_type``, ...).
        history_entry: Appended to the ``commit_history`` attribute.
        prompts: {object id: {"point_prompts", "point_labels", "prompts"}} for interactively committed objects.
    """
    import zarr

    from ..util import get_block_shape

    group = zarr.open_group(os.fspath(path), mode="a")
    if COMMIT_ARRAY not in group:
        chunks = get_block_shape(committed.shape) if committed.ndim in (2, 3) else committed.shape
        group.create_array(COMMIT_ARRAY, shape=committed.shape, chunks=chunks, dtype="uint32", fill_value=0)
        region = tuple(slice(None) for _ in committed.shape)
        group[COMMIT_ARRAY][region] = committed
    else:
        region = _bounding_box(written)
        group[COMMIT_ARRAY][region] = committed[region]
    for object_id, arrays in (prompts or {}).items():
        object_group = group.require_group(f"prompts/{int(object_id)}")
        for name, value in arrays.items():
            value = np.asarray(value)
            if value.size:
                object_group.create_array(name, shape=value.shape, dtype=value.dtype, overwrite=True)[...] = value
    history = list(group.attrs.get("commit_history", []))
    history.append(history_entry)
    group.attrs.update({**attrs, "commit_history": history})
