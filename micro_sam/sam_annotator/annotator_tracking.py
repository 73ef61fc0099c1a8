"""The tracking annotation tool: follow cells through a time-lapse movie (T, Y, X), with divisions and lineages.

Workflow: go to the first frame of a cell, add a positive point (or a box) on it and press Shift-S (track
object): SAM follows the cell forward frame by frame. Where the cell has divided, go to the first frame in which
the two daughters are seen, choose ``track_state`` "division" and add a point on the cell: tracking stops before
that frame, and the lineage gets two daughter tracks (new ids, the first one selected). Annotate each daughter
(point in that frame with its ``track_id``, Shift-S). Commit [C] adds the tracks with their lineage to
``committed_objects`` and shows them in napari's ``tracks`` layer; a new lineage starts with track 1.
Automatic tracking (segment every frame, link the objects) writes to ``auto_segmentation`` and is committed the
same way.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from .. import util
from . import _embedding_widget, _tracking_widgets, _widgets
from ._annotator import _AnnotatorBase, show_or_return
from ._state import AnnotatorState
from ._tracking_widgets import create_tracking_menu
from .annotator_2d import _prepare_state, _start_tool


class AnnotatorTracking(_AnnotatorBase):
    """The tracking annotator as a napari dock widget (also available from napari's plugin menu).

    Widgets: embeddings, prompt label, tracking menu (``track_state``, ``track_id``), segment frame [S], track
    object [Shift-S], automatic tracking, commit [C], clear [Shift-C].

    Attributes:
        current_track_id: The track that new prompts belong to.
        lineage: The lineage being annotated, ``{track id: [daughter track ids]}`` (starts as ``{1: []}``).
        committed_lineages: The lineages of the committed tracks (in the ids of ``committed_objects``).
        auto_lineages: The lineages of the tracks in ``auto_segmentation`` (after automatic tracking), or None.

    Args:
        viewer: The napari viewer.
        reset_state: Kept for micro_sam compatibility (every tool has its own state).
        state: The state (with model and embeddings of the movie) to use, e.g. from :func:`annotator_tracking`.
    """

    def __init__(self, viewer, reset_state: bool = True, state: Optional[AnnotatorState] = None) -> None:
        self.current_track_id = 1
        self.lineage: Dict[int, List[int]] = {1: []}
        self.committed_lineages: List[Dict[int, List[int]]] = []
        self.auto_lineages: Optional[List[Dict[int, List[int]]]] = None
        self._tracking_menu = None
        super().__init__(viewer, ndim=3, state=state)

    def _extra_prompt_properties(self) -> Optional[dict]:
        return {"state": list(_tracking_widgets.TRACK_STATES), "track_id": ["1"]}

    def _set_current_track_id(self, track_id: int) -> None:
        self.current_track_id = int(track_id)

    def require_layers(self) -> None:
        """Add the tool's layers that are missing; prompt layers get the track properties and the menu."""
        super().require_layers()
        _tracking_widgets.prepare_prompt_layers(self)

    def _get_widgets(self):
        return {
            "embeddings": _embedding_widget.embedding_widget(self),
            "prompts": _widgets.prompt_menu(self),
            "tracking": self._tracking_menu,
            "segment": _segment_frame_widget(self),
            "segment_nd": _tracking_widgets.track_object_widget(self),
            "autosegment": _tracking_widgets.auto_track_widget(self),
            "commit": _tracking_widgets.commit_tracks_widget(self),
            "clear": _tracking_widgets.clear_tracks_widget(self),
        }

    def image_changed(self, segmentation_result: Optional[np.ndarray] = None) -> None:
        """A new movie was set in the state: empty layers, a new lineage, no committed tracks; show frame 0."""
        self.committed_lineages, self.auto_lineages = [], None
        if _tracking_widgets.TRACKS_LAYER in self.viewer.layers:
            self.viewer.layers.remove(_tracking_widgets.TRACKS_LAYER)
        super().image_changed(segmentation_result=segmentation_result)
        _tracking_widgets.reset_lineage(self)
        if self.viewer.dims.ndim >= 3:
            self.viewer.dims.set_point(0, 0)


def _segment_frame_widget(tool):
    from magicgui import magicgui

    @magicgui(call_button="Segment Frame [S]")
    def segment() -> None:
        _tracking_widgets.segment_frame(tool)

    return segment


def annotator_tracking(
    image: np.ndarray,
    embedding_path: Optional[Union[str, util.ImageEmbeddings]] = None,
    model_type: str = util._DEFAULT_MODEL,
    tile_shape: Optional[Tuple[int, int]] = None,
    halo: Optional[Tuple[int, int]] = None,
    return_viewer: bool = False,
    viewer=None,
    precompute_amg_state: bool = False,
    checkpoint_path: Optional[str] = None,
    decoder_path: Optional[str] = None,
    device: Optional[str] = None,
    commit_path: Optional[str] = None,
):
    """Start the tracking annotation tool for a time-lapse movie.

    The model is loaded and the embeddings of all frames are computed (or loaded from ``embedding_path``, one
    zarr file for the movie) before the viewer opens.

    Args:
        image: The movie, (T, Y, X) or (T, Y, X, C).
        embedding_path: A zarr folder to cache the embeddings in (reused next time), or embeddings computed with
            ``micro_sam.util.precompute_image_embeddings(..., ndim=3)``.
        model_type: The model (``vit_t_demo`` works offline), or with ``checkpoint_path`` its architecture.
        tile_shape: (y, x) tile shape for tiled embeddings of large frames.
        halo: (y, x) overlap of the tiles.
        return_viewer: Return the viewer instead of starting napari's event loop.
        viewer: A viewer to add the tool to (a new one by default).
        precompute_amg_state: Also compute the automatic segmentation state of every frame now.
        checkpoint_path: A model file (e.g. exported by the training UI).
        decoder_path: A separate AIS decoder checkpoint.
        device: "cpu", "cuda", "mps"; None for the best available one.
        commit_path: A zarr folder where commits (tracks and lineages) are saved; tracks of this movie found there
            are loaded.

    Returns:
        The napari viewer if ``return_viewer`` is True, else None (after the viewer was closed).

    Raises:
        ValueError: A movie that is not (T, Y, X[, C]), invalid tiling, or an unknown model.
        RuntimeError: Cached embeddings of another movie / model / tiling.
    """
    state = _prepare_state(image, 3, embedding_path, model_type, tile_shape, halo, precompute_amg_state,
                           checkpoint_path, decoder_path, device, True)
    viewer, _ = _start_tool(AnnotatorTracking, image, state, viewer, None, commit_path, model_type,
                            embedding_path, checkpoint_path, device, tile_shape, halo)
    return show_or_return(viewer, return_viewer)


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point ``micro_sam.annotator_tracking``: bad input gives one line on stderr and exit
    code 1 (``micro_sam._cli.run_main``)."""
    from .. import _cli
    from .util import _initialize_parser

    prog = "micro_sam.annotator_tracking"

    def run(argv):
        parser = _initialize_parser(description="Track cells in a time-lapse movie interactively with Segment "
                                                "Anything (tracking annotator).", with_segmentation_result=False)
        parser.prog = prog
        args = parser.parse_args(argv)
        if (args.tile_shape is None) != (args.halo is None):
            parser.error("--tile_shape and --halo must be given together.")
        image = util.load_image_data(args.input, key=args.key)
        annotator_tracking(
            image, embedding_path=args.embedding_path, model_type=args.model_type, tile_shape=args.tile_shape,
            halo=args.halo, precompute_amg_state=args.precompute_amg_state, checkpoint_path=args.checkpoint,
            decoder_path=args.decoder_path, device=args.device, commit_path=args.commit_path,
        )
        return 0

    return _cli.run_main(run, argv, prog=prog)


__all__ = ["AnnotatorTracking", "annotator_tracking", "create_tracking_menu"]

if __name__ == "__main__":
    sys.exit(main())
