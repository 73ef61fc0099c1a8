"""The 2D annotation tool: segment objects in an image with point and box prompts, or automatically."""
from __future__ import annotations

import sys
from typing import List, Optional, Tuple, Union

import numpy as np

from .. import util
from . import _embedding_widget, _widgets
from ._annotator import _AnnotatorBase, show_or_return
from ._state import AnnotatorState


class Annotator2d(_AnnotatorBase):
    """The 2D annotator as a napari dock widget (also available from napari's plugin menu).

    Widgets: embeddings, prompt label, segment [S], automatic segmentation, commit [C], clear [Shift-C].

    Args:
        viewer: The napari viewer.
        reset_state: Kept for micro_sam compatibility: every tool has its own state, which starts empty unless
            ``state`` is given.
        state: The state (with model and embeddings) to use, e.g. from :func:`annotator_2d`.
    """

    def __init__(self, viewer, reset_state: bool = True, state: Optional[AnnotatorState] = None) -> None:
        super().__init__(viewer, ndim=2, state=state)

    def _get_widgets(self):
        return {
            "embeddings": _embedding_widget.embedding_widget(self),
            "prompts": _widgets.prompt_menu(self),
            "segment": _widgets.segment_widget(self),
            "autosegment": _embedding_widget.AutoSegmentWidget(self, volumetric=False),
            "commit": _widgets.commit_widget(self),
            "clear": _widgets.clear_widget(self),
        }


def _prepare_state(
    image: np.ndarray, ndim: int, embedding_path, model_type: str, tile_shape, halo, precompute_amg_state: bool,
    checkpoint_path, decoder_path, device, prefer_decoder: bool, predictor=None, decoder=None,
) -> AnnotatorState:
    """A state with the model and the image's embeddings (computed or loaded), before a viewer exists."""
    from ._state import spatial_shape

    spatial_shape(image.shape, ndim)  # a wrong image is reported before the model is loaded
    state = AnnotatorState(ndim=ndim)
    if predictor is not None:
        state.set_model(predictor, decoder)
    else:
        state.load_model(model_type, checkpoint_path, device, prefer_decoder, decoder_path)
    if not prefer_decoder:
        state.set_segmentation_mode("amg")
    if isinstance(embedding_path, dict):
        state.set_embeddings(image, embedding_path)
    else:
        state.compute_embeddings(image, embedding_path, None if tile_shape is None else tuple(tile_shape),
                                 None if halo is None else tuple(halo))
    if precompute_amg_state:
        from tqdm import tqdm

        for i in tqdm([None] if ndim == 2 else range(state.image_shape[0]), desc="Precompute the segmentation state"):
            state.precompute_segmentation_state(i)
    return state


def _start_tool(tool_class, image, state: AnnotatorState, viewer, segmentation_result, commit_path,
                model_type, embedding_path, checkpoint_path, device, tile_shape, halo):
    """Open ``image`` in a viewer with the tool (state prepared) and its settings shown in the widgets."""
    import napari

    if viewer is None:
        viewer = napari.Viewer()
    layer = viewer.add_image(image, name="image")
    state.image_name = layer.name
    state.image_scale = tuple(layer.scale)[-len(state.image_shape):]
    tool = tool_class(viewer, reset_state=False, state=state)
    tool.image_changed(segmentation_result=segmentation_result)
    viewer.window.add_dock_widget(tool, name=tool_class.__name__)
    _embedding_widget.sync_embedding_widget(
        tool.widgets["embeddings"], model_type=model_type if checkpoint_path is None else state.predictor.model_type,
        save_path=embedding_path, checkpoint_path=checkpoint_path, device=device, tile_shape=tile_shape, halo=halo,
        image_layer=layer,
    )
    if commit_path is not None:
        tool.widgets["commit"].commit_path.value = str(commit_path)  # loads the commits of this image, if any
    return viewer, tool


def annotator_2d(
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
    """Start the 2D annotation tool for an image.

    The model is loaded and the embeddings are computed (or loaded from ``embedding_path``) before the viewer
    opens.

    Args:
        image: The image, (Y, X) or (Y, X, C).
        embedding_path: A zarr folder to cache the embeddings in (reused next time), or embeddings computed with
            ``micro_sam.util.precompute_image_embeddings``.
        segmentation_result: A label image to load into ``committed_objects`` (to correct it or to continue).
        model_type: The model (``vit_t_demo`` works offline), or with ``checkpoint_path`` its architecture.
        tile_shape: (y, x) tile shape for tiled embeddings of large images.
        halo: (y, x) overlap of the tiles.
        return_viewer: Return the viewer instead of starting napari's event loop.
        viewer: A viewer to add the tool to (a new one by default).
        precompute_amg_state: Also compute the automatic segmentation state now (cached with the embeddings).
        checkpoint_path: A model file (e.g. exported by the training UI).
        decoder_path: A separate AIS decoder checkpoint.
        device: "cpu", "cuda", "mps"; None for the best available one.
        prefer_decoder: Use AIS when the model has a decoder (else AMG).
        commit_path: A zarr folder where commits are saved; commits of this image found there are loaded.

    Returns:
        The napari viewer if ``return_viewer`` is True, else None (after the viewer was closed).

    Raises:
        ValueError: An image that is not 2D, invalid tiling, or an unknown model.
        RuntimeError: Cached embeddings of another image / model / tiling.
    """
    state = _prepare_state(image, 2, embedding_path, model_type, tile_shape, halo, precompute_amg_state,
                           checkpoint_path, decoder_path, device, prefer_decoder)
    viewer, _ = _start_tool(Annotator2d, image, state, viewer, segmentation_result, commit_path, model_type,
                            embedding_path, checkpoint_path, device, tile_shape, halo)
    return show_or_return(viewer, return_viewer)


def _run_cli(description: str, start, argv: Optional[List[str]]) -> int:
    """Parse the annotator options and start the tool; bad input gives one line on stderr and exit code 1
    (``micro_sam._cli.run_main``)."""
    from .. import _cli
    from .util import _initialize_parser

    prog = f"micro_sam.{start.__name__}"

    def run(argv):
        parser = _initialize_parser(description=description)
        parser.prog = prog
        args = parser.parse_args(argv)
        if (args.tile_shape is None) != (args.halo is None):
            parser.error("--tile_shape and --halo must be given together.")
        image = util.load_image_data(args.input, key=args.key)
        segmentation = None
        if args.segmentation_result is not None:
            segmentation = util.load_image_data(args.segmentation_result, key=args.segmentation_key)
        start(
            image, embedding_path=args.embedding_path, segmentation_result=segmentation,
            model_type=args.model_type, tile_shape=args.tile_shape, halo=args.halo,
            precompute_amg_state=args.precompute_amg_state, checkpoint_path=args.checkpoint,
            decoder_path=args.decoder_path, device=args.device, prefer_decoder=args.prefer_decoder,
            commit_path=args.commit_path,
        )
        return 0

    return _cli.run_main(run, argv, prog=prog)


def main(argv: Optional[List[str]] = None) -> int:
    """Command line entry point ``micro_sam.annotator_2d``."""
    return _run_cli("Annotate an image interactively with Segment Anything (2D annotator).", annotator_2d, argv)


if __name__ == "__main__":
    sys.exit(main())
