"""Driving the tools as a user does: key presses on the canvas, waiting for background work."""
import numpy as np


def press(viewer, key: str, shift: bool = False) -> None:
    """Press a key on the napari canvas (goes through napari's key bindings like a real key press)."""
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QApplication

    modifier = Qt.KeyboardModifier.ShiftModifier if shift else Qt.KeyboardModifier.NoModifier
    QTest.keyClick(viewer.window._qt_viewer.canvas.native, getattr(Qt.Key, f"Key_{key.upper()}"), modifier)
    QApplication.processEvents()


def wait_for(tool, timeout_s: float = 300) -> None:
    """Wait until the tool's background work has finished (and its results are in the layers)."""
    assert tool.tasks.wait(int(timeout_s * 1000)), "the background work did not finish in time"


def object_center(labels: np.ndarray, object_id: int):
    """The pixel of the object farthest from its boundary, (y, x) or (z, y, x)."""
    from micro_sam.util import get_centers_and_bounding_boxes

    centers, _ = get_centers_and_bounding_boxes(labels == object_id)
    return np.array(centers[1], dtype="float64")


def largest_objects(labels: np.ndarray, n: int):
    """The ids of the n largest objects that touch no other object and not the image border (clear targets)."""
    from scipy import ndimage

    ids, counts = np.unique(labels[labels != 0], return_counts=True)
    chosen = []
    in_plane = np.zeros((3,) * labels.ndim, bool)  # volumes: dilate in y / x only
    in_plane[(1,) * (labels.ndim - 2) + (slice(None), slice(None))] = ndimage.generate_binary_structure(2, 1)
    for object_id in ids[np.argsort(counts)[::-1]]:
        mask = labels == object_id
        ring = ndimage.binary_dilation(mask, in_plane, iterations=3) & ~mask
        border = np.ones(mask.shape, bool)
        border[(slice(1, -1),) * mask.ndim] = False
        if not (labels[ring] != 0).any() and not (mask & border).any():
            chosen.append(int(object_id))
        if len(chosen) == n:
            break
    return chosen
