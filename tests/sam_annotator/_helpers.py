"""Setting up and driving the tools as a user does: a viewer with a tool docked, key presses on the canvas,
waiting for background work."""
from contextlib import contextmanager

import numpy as np


def demo_state(demo_model, ndim: int, image=None, embedding_path=None):
    """An ``AnnotatorState`` with the bundled vit_t_demo (the ``demo_model`` fixture: predictor, decoder).

    The state's model is what the embedding widget asks for with vit_t_demo on the CPU (the widget does not reload
    it). With ``image``, the image's embeddings are computed (and cached in ``embedding_path``, e.g. a zarr folder
    under a tmp path).
    """
    from micro_sam.sam_annotator._state import AnnotatorState

    predictor, decoder = demo_model
    state = AnnotatorState(ndim=ndim)
    state.set_model(predictor, decoder)
    state.model_key = ("vit_t_demo", None, "cpu", True, None)
    if image is not None:
        state.compute_embeddings(image, embedding_path, verbose=False)
    return state


@contextmanager
def docked_tool(tool_class, image, state, image_name: str = "image"):
    """A viewer (not shown) with ``image`` and the tool ``tool_class`` on ``state`` docked; closed at the end.

    Yields:
        (viewer, tool).
    """
    import napari

    viewer = napari.Viewer(show=False)
    try:
        viewer.add_image(image, name=image_name)
        tool = tool_class(viewer, state=state)
        viewer.window.add_dock_widget(tool)
        yield viewer, tool
    finally:
        viewer.close()


def fresh(session):
    """The (viewer, tool) of a module's shared session with empty layers and no prompts, for the next test."""
    viewer, tool = session
    tool.image_changed()
    return viewer, tool


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
