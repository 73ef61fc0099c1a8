"""Tracking results in the Cell Tracking Challenge (CTC) format, written the way trackastra writes them.

A CTC result folder holds one label image per frame, ``man_track0000.tif``, ``man_track0001.tif``, ... (one id
per track), and the text file ``man_track.txt`` with one line ``L B E P`` per track: its id, first and last frame
and the id of its parent track (0 for none). A CTC track is present in every frame from B to E, so a track of
micro_sam that is missing in some frames (a closed gap) is split at the gap: the part after the gap gets a new id
whose parent is the part before it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np

from .graph import parents_from_lineages

_PREFIX = "man_track"


def ctc_tracks(tracking_result: np.ndarray, lineages) -> Tuple[np.ndarray, List[Tuple[int, int, int, int]]]:
    """The CTC label movie and track table of a tracking result.

    Args:
        tracking_result: The label movie (T, Y, X), labels = track ids.
        lineages: The lineages, ``{track: [daughters]}`` or a list of such dicts.

    Returns:
        The relabelled movie (tracks split at gaps, the first part keeps its id; later parts get ids above the
            largest track id) and the rows (L, B, E, P), sorted by L.
    """
    parents = parents_from_lineages(lineages)
    frames_of: Dict[int, List[int]] = {}
    for t, frame in enumerate(tracking_result):
        for track in np.unique(frame).tolist():
            if track:
                frames_of.setdefault(int(track), []).append(t)
    next_id = max(frames_of, default=0) + 1
    rows, last_part, relabel = [], {}, []  # relabel: (first frame, last frame, old id, new id)
    for track in sorted(frames_of):
        frames = np.array(frames_of[track])
        pieces = np.split(frames, np.flatnonzero(np.diff(frames) > 1) + 1)
        part_ids = [track] + list(range(next_id, next_id + len(pieces) - 1))
        next_id += len(pieces) - 1
        for k, (piece, part) in enumerate(zip(pieces, part_ids)):
            rows.append([part, int(piece[0]), int(piece[-1]), part_ids[k - 1] if k else 0])
            if part != track:
                relabel.append((int(piece[0]), int(piece[-1]), track, part))
        last_part[track] = part_ids[-1]
    for row in rows:  # the first part of a daughter: its parent is the last part of its mother
        if row[0] in parents and parents[row[0]] in last_part:
            row[3] = last_part[parents[row[0]]]
    dtype = "uint16" if next_id <= np.iinfo("uint16").max else "uint32"
    movie = np.asarray(tracking_result).astype(dtype)
    for first, last, old, new in relabel:
        part = movie[first:last + 1]
        part[part == old] = new
    return movie, sorted(tuple(row) for row in rows)


def write_ctc(folder: Union[str, os.PathLike], tracking_result: np.ndarray, lineages) -> Path:
    """Write a tracking result into ``folder`` in the CTC format (see the module documentation).

    The files are written into a temporary folder next to ``folder`` first. A new ``folder`` is then created by
    renaming; in an existing folder, the CTC files of an earlier result are replaced (other files are kept). On an
    error nothing is left behind.

    Returns:
        The folder.
    """
    import tifffile

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"The output folder {str(folder)!r} exists and is not a folder.")
    movie, rows = ctc_tracks(tracking_result, lineages)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", suffix=".partial", dir=folder.parent))
    try:
        with open(tmp / f"{_PREFIX}.txt", "w") as f:
            f.writelines(f"{label} {first} {last} {parent}\n" for label, first, last, parent in rows)
        for t, frame in enumerate(movie):
            tifffile.imwrite(tmp / f"{_PREFIX}{t:04d}.tif", frame, compression="zlib")
        os.chmod(tmp, 0o777 & ~_umask())
        if not folder.exists():
            os.rename(tmp, folder)
            return folder
        for old in folder.glob(f"{_PREFIX}*"):
            if old.name == f"{_PREFIX}.txt" or (old.suffix == ".tif" and old.stem[len(_PREFIX):].isdigit()):
                old.unlink()
        for new in sorted(tmp.iterdir()):
            os.replace(new, folder / new.name)
        tmp.rmdir()
        return folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
