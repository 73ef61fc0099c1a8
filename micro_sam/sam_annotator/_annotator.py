"""The base of the annotation tools: one dock widget with the tool's widgets, its state and its key bindings.

A tool (2D, 3D, later tracking / object classification) subclasses :class:`_AnnotatorBase` and implements
``_get_widgets`` (a dict of name -> widget, built by the factories in ``_widgets`` etc.). The base provides what
the widgets need: ``viewer``, ``state`` (an :class:`~micro_sam.sam_annotator._state.AnnotatorState`),
``tasks`` (a :class:`~micro_sam.sam_annotator._background.TaskRunner` for long work),
:meth:`_AnnotatorBase.ready` (the check before a widget starts work: not busy, embeddings there) and
:meth:`_AnnotatorBase.image_changed` (called when a new image with embeddings is set).
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional

import numpy as np
from qtpy import QtWidgets

from . import _layers
from ._background import TaskRunner, show_error, show_warning
from ._state import AnnotatorState


class _AnnotatorBase(QtWidgets.QScrollArea):
    """Dock widget of an annotation tool.

    Args:
        viewer: The napari viewer.
        ndim: Spatial dimensionality of the tool (2 or 3).
        state: The state to use (a new one by default).
    """

    state_class = AnnotatorState
    #: Key bindings: key -> name of the widget that is called (widgets missing in a tool are skipped).
    key_bindings = {"s": "segment", "Shift-S": "segment_nd", "c": "commit", "Shift-C": "clear"}

    def __init__(self, viewer, ndim: int, state: Optional[AnnotatorState] = None) -> None:
        super().__init__()
        self.viewer = viewer
        self.state = state if state is not None else self.state_class(ndim=ndim)
        self.tasks = TaskRunner(on_busy_changed=self._set_busy)
        self._ndim = ndim
        # Running work is stopped when the tool goes away (the viewer is closed).
        tasks = self.tasks
        self.destroyed.connect(lambda *args: tasks.close())

        self._bound_targets = weakref.WeakSet()  # the prompt layers whose keys are bound
        self._viewer_keys_bound = False
        self.require_layers()

        self.widgets: Dict[str, object] = {}
        self.widgets.update(self._get_widgets())
        self.state.widgets = self.widgets
        content = QtWidgets.QWidget()
        content.setLayout(QtWidgets.QVBoxLayout())
        for widget in self.widgets.values():
            frame = QtWidgets.QGroupBox()
            frame.setLayout(QtWidgets.QVBoxLayout())
            frame.layout().addWidget(getattr(widget, "native", widget))
            content.layout().addWidget(frame)
        content.layout().addStretch()
        self.setWidgetResizable(True)
        self.setWidget(content)
        self.setMinimumWidth(300)
        self._bind_keys()

    # --- to be implemented / extended by the tools ---------------------------------------------------------
    def _get_widgets(self) -> Dict[str, object]:
        raise NotImplementedError("An annotation tool implements _get_widgets.")

    def _extra_prompt_properties(self) -> Optional[dict]:
        return None

    def _initial_shape(self):
        from napari.layers import Image

        for layer in self.viewer.layers:
            if isinstance(layer, Image) and layer.data.ndim - int(layer.rgb) == self._ndim:
                return tuple(layer.data.shape[:self._ndim])
        return (256, 256) if self._ndim == 2 else (8, 256, 256)

    # --- shared behaviour --------------------------------------------------------------------------------
    def require_layers(self) -> None:
        """Add the tool's layers that are missing (e.g. deleted by the user), for the current image."""
        shape = self.state.image_shape or self._initial_shape()
        _layers.add_label_layers(self.viewer, shape, self.state.image_scale)
        _layers.add_prompt_layers(self.viewer, self._ndim, self._extra_prompt_properties())
        if hasattr(self, "widgets"):  # re-created prompt layers get the key bindings
            self._bind_keys()

    def _bind_keys(self) -> None:
        """Bind the keys on the viewer and on the prompt layers (napari gives layer bindings precedence)."""
        from .util import toggle_label

        def call(name):
            def handler(*args):
                widget = self.widgets.get(name)
                if widget is not None:
                    widget()
            return handler

        def toggle(*args):
            toggle_label(self.viewer.layers[_layers.POINT_LAYER])

        layers = [self.viewer.layers[name] for name in (_layers.POINT_LAYER, _layers.SHAPE_LAYER)]
        targets = [layer for layer in layers if layer not in self._bound_targets]
        targets += [] if self._viewer_keys_bound else [self.viewer]
        for target in targets:
            for key, name in self.key_bindings.items():
                if name in self.widgets:
                    target.bind_key(key, call(name), overwrite=True)
            target.bind_key("t", toggle, overwrite=True)
        self._bound_targets.update(layers)
        self._viewer_keys_bound = True

    def _set_busy(self, busy: bool) -> None:
        """Widgets that start long work are disabled while it runs (no second run on the same state)."""
        for widget in self.widgets.values():
            if getattr(widget, "_long_running", False):
                widget.enabled = not busy

    def image_changed(self, segmentation_result: Optional[np.ndarray] = None) -> None:
        """A new image (with embeddings) was set in the state: reset the layers and the widgets for it.

        Args:
            segmentation_result: Objects to load into ``committed_objects`` (same shape as the image).
        """
        state = self.state
        _layers.reset_layers(self.viewer, state.image_shape, state.image_scale, committed=segmentation_result)
        for widget in self.widgets.values():
            update = getattr(widget, "_on_image_changed", None)
            if update is not None:
                update()

    def ready(self, need_embeddings: bool = True, restore_layers: bool = False) -> bool:
        """Whether new work can start now; when not, the reason is shown as a napari notification.

        Args:
            need_embeddings: The work needs the image embeddings (else only an idle tool is required).
            restore_layers: When ready, add the tool's layers that the user deleted (:meth:`require_layers`).

        Returns:
            False while background work runs, or with ``need_embeddings`` while there are no embeddings.
        """
        if self.tasks.busy:
            show_warning("Please wait: the tool is still computing (see the progress bar).")
            return False
        if need_embeddings and not self.state.initialized_for_interactive_segmentation():
            show_error("The image embeddings are not computed yet: press 'Compute Embeddings' first.")
            return False
        if restore_layers:
            self.require_layers()
        return True

    def run_checked(self, action, *args, **kwargs):
        """Run ``action``; a ValueError / RuntimeError is shown as an error message instead of raised."""
        try:
            return action(*args, **kwargs)
        except (ValueError, RuntimeError) as error:
            show_error(str(error))
            return None


def show_or_return(viewer, return_viewer: bool):
    """The end of every annotator function: return the viewer, or run napari until the viewer is closed.

    Args:
        viewer: The napari viewer with the tool.
        return_viewer: Return the viewer at once (for scripts and tests that drive it).

    Returns:
        The viewer with ``return_viewer``; else None, after the viewer was closed.
    """
    if return_viewer:
        return viewer
    import napari

    napari.run()
    return None
