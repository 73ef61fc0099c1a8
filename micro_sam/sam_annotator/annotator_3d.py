"""The 3D annotation tool: segment objects in a volume slice by slice and propagate them through it."""
from __future__ import annotations

import sys
from typing import List, Optional, Tuple, Union

import numpy as np

from .. import util
from . import _embedding_widget, _widgets
from ._annotator import _AnnotatorBase, show_or_return
from ._state import AnnotatorState
from .annotator_2d import _prepare_state, _run_cli, _start_tool


class Annotator3d(_AnnotatorBase):
    """The 3D annotator as a napari dock widget (also available from napari's plugin menu).

    Widgets: embeddings, prompt label, segment slice [S], segment all slices [Shift-S], automatic segmentation
    (slice or volume), commit [C], clear [Shift-C].

    Args:
        viewer: The napari viewer.
        reset_state: Kept for micro_sam compatibility (every tool has its own state).
        state: The state (with model and embeddings) to use, e.g. from :func:`annotator_3d`.
    """

    def __init__(self, viewer, reset_state: bool = True, state: Optional[AnnotatorState] = None) -> None:
        super().__init__(viewer, ndim=3, state=state)

    def _get_widgets(self):
        return {
            "embeddings": _embedding_widget.embedding_widget(self),
            "prompts": _widgets.prompt_menu(self),
            "segment": _widgets.segment_slice_widget(self),
            "segment_nd": _widgets.segment_nd_widget(self),
            "autosegment": _embedding_widget.AutoSegmentWidget(self, volumetric=True),
            "commit": _widgets.commit_widget(self),
            "clear": _widgets.clear_volume_widget(self),
        }


def annotator_3d(
    image: np.ndarray,
    embedding_path: Optional[Union[str, util.ImageEmbeddings]] = None,
    segmentation_result: Optional[np.ndarray] = None,
    model_type: str = util._DEFAULT_MODEL,
    tile_shape: Optional[Tuple[int, int]] = None,
    halo: Optional[Tuple[int, int]] = None,
    return_viewer: bool = False,
    viewer=None,
    precompute_amg_state: bool = False,
    checkpoint_path: Optional[str] = None,
    decoder_path: Optional[str] = None,
    device: Optional[str] = None,
    prefer_decoder: bool = True,
    commit_path: Optional[str] = None,
):
    """Start the 3D annotation tool for a volume.

    The model is loaded and the embeddings of all slices are computed (or loaded from ``embedding_path``)
    before the viewer opens.

    Args:
        image: The volume, (Z, Y, X) or (Z, Y, X, C).
        embedding_path: A zarr folder to cache the embeddings in (reused next time; an interrupted computation
            resumes), or embeddings computed with ``micro_sam.util.precompute_image_embeddings(..., ndim=3)``.
        segmentation_result: A label volume to load into ``committed_objects``.
        model_type: The model (``vit_t_demo`` works offline), or with ``checkpoint_path`` its architecture.
        tile_shape: (y, x) tile shape for tiled embeddings of large slices.
        halo: (y, x) overlap of the tiles.
        return_viewer: Return the viewer instead of starting napari's event loop.
        viewer: A viewer to add the tool to (a new one by default).
        precompute_amg_state: Also compute the automatic segmentation state of every slice now.
        checkpoint_path: A model file (e.g. exported by the training UI).
        decoder_path: A separate AIS decoder checkpoint.
        device: "cpu", "cuda", "mps"; None for the best available one.
        prefer_decoder: Use AIS when the model has a decoder (else AMG).
        commit_path: A zarr folder where commits are saved; commits of this volume found there are loaded.

    Returns:
        The napari viewer if ``return_viewer`` is True, else None (after the viewer was closed).

    Raises:
        ValueError: An image that is not 3D, invalid tiling, or an unknown model.
        RuntimeError: Cached embeddings of another image / model / tiling.
    """
    state = _prepare_state(image, 3, embedding_path, model_type, tile_shape, halo, precompute_amg_state,
                           checkpoint_path, decoder_path, device, prefer_decoder)
    viewer, _ = _start_tool(Annotator3d, image, state, viewer, segmentation_result, commit_path, model_type,
                            embedding_path, checkpoint_path, device, tile_shape, halo)
    return show_or_return(viewer, return_viewer)


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point ``micro_sam.annotator_3d``."""
    return _run_cli("Annotate a volume interactively with Segment Anything (3D annotator).", annotator_3d, argv)


if __name__ == "__main__":
    sys.exit(main())
