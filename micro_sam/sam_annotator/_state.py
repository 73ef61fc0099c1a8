"""The state of one annotation tool: model, image, embeddings and the automatic segmentation.

Every annotator (2D, 3D, image series; later tracking and the object classifier) owns one
:class:`AnnotatorState`. It holds what the widgets share and does the model work through the public library
(``micro_sam.util``, ``micro_sam.instance_segmentation``, ``micro_sam.precompute_state``,
``micro_sam.multi_dimensional_segmentation``). It knows nothing about napari or Qt, so it can run in a worker
thread and be tested without a viewer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from .. import util

ProgressInit = Optional[Callable[[int, str], None]]
ProgressUpdate = Optional[Callable[[int], None]]

#: Automatic segmentation modes offered in the tools: "auto" = AIS when the model has a decoder, else AMG.
SEGMENTATION_MODES = ("auto", "amg", "ais")


def spatial_shape(shape: Tuple[int, ...], ndim: int, rgb: Optional[bool] = None) -> Tuple[int, ...]:
    """The spatial shape of an image for a 2D or 3D annotator, or a ValueError that says what fits.

    Args:
        shape: The array shape: (Y, X) or (Y, X, C) for 2D; (Z, Y, X) or (Z, Y, X, C) for 3D.
        ndim: 2 for the 2D annotator, 3 for the 3D annotator.
        rgb: Whether the last axis holds channels (napari's ``layer.rgb``); None: a last axis of at most 4
            entries is taken as channels when the array has ``ndim + 1`` axes.

    Returns:
        (Y, X) or (Z, Y, X).

    Raises:
        ValueError: The shape does not fit the annotator.
    """
    shape = tuple(int(s) for s in shape)
    if rgb is None:
        rgb = len(shape) == ndim + 1 and shape[-1] <= 4
    spatial = shape[:-1] if rgb else shape
    if len(spatial) == ndim and min(spatial) > 0:
        return spatial
    if ndim == 2:
        hint = " Use the 3D annotator (micro_sam.annotator_3d) for volumes." if len(spatial) == 3 else ""
        raise ValueError(f"The 2D annotator needs an image of shape (Y, X) or (Y, X, C) with at most 4 channels; "
                         f"got shape {shape}.{hint}")
    hint = " Use the 2D annotator (micro_sam.annotator_2d) for 2D images." if len(spatial) == 2 else ""
    raise ValueError(f"The 3D annotator needs a volume of shape (Z, Y, X) or (Z, Y, X, C); got shape {shape}.{hint}")


@dataclass
class AnnotatorState:
    """What an annotation tool knows: the model, the current image and its embeddings, the segmenter.

    Attributes:
        ndim: Spatial dimensionality of the tool (2 or 3).
        predictor: The ``SamPredictor`` (None before a model is loaded).
        decoder: The AIS decoder of the model, if it has one and it is used.
        model_key: (model_type, checkpoint_path, device, prefer_decoder) of the loaded model.
        image: The current image (array as shown in napari).
        image_shape: Its spatial shape, (Y, X) or (Z, Y, X).
        image_scale: The napari scale of the image layer (applied to the annotation layers).
        image_name: The name of the image layer.
        image_embeddings: The embeddings of the current image.
        embedding_path: Where they are cached (a zarr folder) or None.
        data_signature: The signature of the image data (sha1, as in the embedding cache).
        tile_shape: Tile shape of tiled embeddings, or None.
        halo: Their halo, or None.
        segmentation_mode: "auto", "amg" or "ais".
        z_range: (z_min, z_max) of the last volumetric segmentation (3D commit only writes these slices).
        widgets: The tool's widgets by name ("embeddings", "segment", "commit", ...).
    """

    ndim: int = 2
    predictor: Any = None
    decoder: Any = None
    model_key: Optional[tuple] = None
    image: Any = None
    image_shape: Optional[Tuple[int, ...]] = None
    image_scale: Optional[Tuple[float, ...]] = None
    image_name: Optional[str] = None
    image_embeddings: Optional[Dict[str, Any]] = None
    embedding_path: Optional[str] = None
    data_signature: Optional[str] = None
    tile_shape: Optional[Tuple[int, int]] = None
    halo: Optional[Tuple[int, int]] = None
    segmentation_mode: str = "auto"
    z_range: Optional[Tuple[int, int]] = None
    widgets: Dict[str, Any] = field(default_factory=dict)
    _segmenter: Any = None
    _segmenter_states: Dict[Optional[int], Any] = field(default_factory=dict)

    # --- model -------------------------------------------------------------------------------------------
    def load_model(
        self,
        model_type: str = util._DEFAULT_MODEL,
        checkpoint_path: Optional[str] = None,
        device: Optional[str] = None,
        prefer_decoder: bool = True,
        decoder_path: Optional[str] = None,
    ) -> None:
        """Load a model (unless the same one is loaded already) with its AIS decoder when it has one.

        Args:
            model_type: A registered model name, or with ``checkpoint_path`` its architecture.
            checkpoint_path: A local checkpoint file (e.g. exported by the training UI).
            device: "cpu", "cuda", "mps" or None / "auto" for the best available one.
            prefer_decoder: Use the model's AIS decoder for automatic segmentation when it has one.
            decoder_path: A separate decoder checkpoint.

        Raises:
            ValueError, RuntimeError: From ``micro_sam.util.get_sam_model`` for unknown models, unreadable
                checkpoints or unavailable devices.
        """
        device = None if device in (None, "auto") else str(device)
        key = (model_type, None if checkpoint_path is None else os.fspath(checkpoint_path), device,
               bool(prefer_decoder), decoder_path)
        if self.predictor is not None and key == self.model_key:
            return
        predictor, checkpoint_state = util.get_sam_model(
            model_type=model_type, checkpoint_path=checkpoint_path, device=util.get_device(device),
            return_state=True, decoder_path=decoder_path,
        )
        decoder = None
        if prefer_decoder and isinstance(checkpoint_state, dict) and checkpoint_state.get("decoder_state"):
            from ..instance_segmentation import get_decoder

            decoder = get_decoder(predictor.model.image_encoder, checkpoint_state["decoder_state"],
                                  device=predictor.device)
        self.set_model(predictor, decoder)
        self.model_key = key

    def set_model(self, predictor, decoder=None) -> None:
        """Use an already loaded predictor (and decoder); forgets the image embeddings."""
        self.predictor, self.decoder, self.model_key = predictor, decoder, None
        self.image_embeddings = None
        self._reset_segmenter()

    @property
    def model_name(self) -> Optional[str]:
        """The name of the loaded model (e.g. "vit_t_demo"), or its architecture for a custom checkpoint."""
        if self.predictor is None:
            return None
        return getattr(self.predictor, "model_name", None) or getattr(self.predictor, "model_type", None)

    # --- image and embeddings ----------------------------------------------------------------------------
    def compute_embeddings(
        self,
        image,
        embedding_path: Optional[str] = None,
        tile_shape: Optional[Tuple[int, int]] = None,
        halo: Optional[Tuple[int, int]] = None,
        rgb: Optional[bool] = None,
        verbose: bool = True,
        pbar_init: ProgressInit = None,
        pbar_update: ProgressUpdate = None,
    ) -> None:
        """Make ``image`` the current image: compute (or load from ``embedding_path``) its embeddings.

        Args:
            image: The image, (Y, X[, C]) for 2D or (Z, Y, X[, C]) for 3D.
            embedding_path: A zarr folder to cache the embeddings in (reused when it holds them).
            tile_shape: (y, x) tile shape for tiled embeddings of large images.
            halo: (y, x) overlap of the tiles.
            rgb: Whether the last axis holds channels (see :func:`spatial_shape`).
            verbose: Show progress (tqdm, or the given callbacks).
            pbar_init: Progress callback ``pbar_init(total, description)``.
            pbar_update: Progress callback ``pbar_update(n)``.

        Raises:
            ValueError: A shape that does not fit the tool, or invalid tiling.
            RuntimeError: No model loaded, or cached embeddings of another image / model / tiling.
        """
        if self.predictor is None:
            raise RuntimeError("No model is loaded; call load_model first.")
        shape = spatial_shape(image.shape, self.ndim, rgb)
        if (tile_shape is None) != (halo is None):
            raise ValueError(f"tile_shape and halo must be given together, got tile_shape={tile_shape}, "
                             f"halo={halo}.")
        embedding_path = None if embedding_path in (None, "") else os.fspath(embedding_path)
        embeddings = util.precompute_image_embeddings(
            self.predictor, image, save_path=embedding_path, ndim=self.ndim, tile_shape=tile_shape, halo=halo,
            verbose=verbose, pbar_init=pbar_init, pbar_update=pbar_update,
        )
        self._set_image(image, shape, embeddings, embedding_path, tile_shape, halo)

    def set_embeddings(self, image, image_embeddings: Dict[str, Any], rgb: Optional[bool] = None) -> None:
        """Make ``image`` the current image with embeddings computed before (``precompute_image_embeddings``).

        Raises:
            ValueError: The embeddings do not have the image's shape or dimensionality.
        """
        shape = spatial_shape(image.shape, self.ndim, rgb)
        features = image_embeddings.get("features") if isinstance(image_embeddings, dict) else None
        if features is None:
            raise ValueError("image_embeddings must be the dict returned by precompute_image_embeddings.")
        original = image_embeddings.get("original_size")
        if original is not None and tuple(original) != shape[-2:]:
            raise ValueError(f"The embeddings were computed for an image of shape {tuple(original)}, "
                             f"the image has shape {shape[-2:]}.")
        if hasattr(features, "shape") and len(features.shape) != self.ndim + 2:
            raise ValueError(f"The embeddings are {len(features.shape) - 2}D; this tool needs {self.ndim}D ones.")
        self._set_image(image, shape, image_embeddings, None, None, None)

    def _set_image(self, image, shape, embeddings, embedding_path, tile_shape, halo) -> None:
        self.image, self.image_shape, self.image_embeddings = image, shape, embeddings
        self.embedding_path, self.tile_shape, self.halo = embedding_path, tile_shape, halo
        self.data_signature = _data_signature(image, embedding_path)
        self.z_range = None
        self._reset_segmenter()

    def initialized_for_interactive_segmentation(self) -> bool:
        """Whether a model and the embeddings of the current image are there."""
        return self.predictor is not None and self.image_embeddings is not None and self.image_shape is not None

    @property
    def is_tiled(self) -> bool:
        """Whether the current embeddings are tiled."""
        return self.image_embeddings is not None and self.image_embeddings.get("input_size") is None

    def reset(self) -> None:
        """Forget the image and its embeddings (the model stays loaded)."""
        self.image = self.image_shape = self.image_embeddings = self.embedding_path = None
        self.data_signature = self.tile_shape = self.halo = self.z_range = None
        self._reset_segmenter()

    # --- automatic segmentation --------------------------------------------------------------------------
    @property
    def with_decoder(self) -> bool:
        """Whether automatic segmentation runs AIS (the model's decoder) rather than AMG."""
        return self.decoder is not None and self.segmentation_mode != "amg"

    def set_segmentation_mode(self, mode: str) -> None:
        """Choose "auto" (AIS with a decoder, else AMG), "amg" or "ais".

        Raises:
            ValueError: Unknown mode, or "ais" for a model without decoder.
        """
        if mode not in SEGMENTATION_MODES:
            raise ValueError(f"Unknown segmentation mode {mode!r}; choose one of {SEGMENTATION_MODES}.")
        if mode == "ais" and self.predictor is not None and self.decoder is None:
            raise ValueError(f"The model {self.model_name!r} has no decoder for AIS; choose 'amg' or 'auto'.")
        if mode != self.segmentation_mode:
            self.segmentation_mode = mode
            self._reset_segmenter()

    def _reset_segmenter(self) -> None:
        self._segmenter, self._segmenter_states = None, {}

    def _initialized_segmenter(self, i: Optional[int], pbar_init: ProgressInit, pbar_update: ProgressUpdate):
        """The AMG / AIS segmenter, initialized for the 2D image or slice ``i`` (state reused / cached)."""
        from .. import instance_segmentation, precompute_state

        if not self.initialized_for_interactive_segmentation():
            raise RuntimeError("Compute the image embeddings first.")
        if (i is None) != (self.ndim == 2):
            raise ValueError(f"The slice index i must be {'None' if self.ndim == 2 else 'given'} for {self.ndim}D.")
        decoder = self.decoder if self.with_decoder else None
        if self._segmenter is None:
            self._segmenter = instance_segmentation.get_instance_segmentation_generator(
                self.predictor, is_tiled=self.is_tiled, decoder=decoder,
                segmentation_mode="ais" if decoder is not None else "amg",
            )
        segmenter = self._segmenter
        if i in self._segmenter_states:
            segmenter.set_state(self._segmenter_states[i])
            return segmenter
        verbose = pbar_init is not None
        if self.embedding_path is not None:  # load the state cached in the embeddings, or compute and cache it
            progress = dict(verbose=False, i=i, pbar_init=pbar_init, pbar_update=pbar_update)
            if decoder is None:
                cached = precompute_state.cache_amg_state(self.predictor, self.image, self.image_embeddings,
                                                          self.embedding_path, **progress)
            else:
                cached = precompute_state.cache_is_state(self.predictor, decoder, self.image, self.image_embeddings,
                                                         self.embedding_path, **progress)
            state = cached.get_state()
        else:
            segmenter.initialize(self.image, image_embeddings=self.image_embeddings, i=i, verbose=verbose,
                                 pbar_init=pbar_init, pbar_update=pbar_update)
            state = segmenter.get_state()
        self._segmenter_states[i] = state
        segmenter.set_state(state)
        return segmenter

    def precompute_segmentation_state(self, i: Optional[int] = None, pbar_init: ProgressInit = None,
                                      pbar_update: ProgressUpdate = None) -> None:
        """Compute (or load from the embedding cache) the automatic segmentation state of the image / slice ``i``.

        With an ``embedding_path`` the state is stored there (``micro_sam.precompute_state``'s layout).
        """
        self._initialized_segmenter(i, pbar_init, pbar_update)

    def segment_automatically(
        self,
        i: Optional[int] = None,
        min_object_size: int = 100,
        pbar_init: ProgressInit = None,
        pbar_update: ProgressUpdate = None,
        **generate_kwargs,
    ) -> np.ndarray:
        """Automatic instance segmentation of the 2D image or of slice ``i`` of the volume.

        Args:
            i: The slice (3D tools) or None (2D).
            min_object_size: Objects with fewer pixels are removed.
            pbar_init: Progress callback ``pbar_init(total, description)``.
            pbar_update: Progress callback ``pbar_update(n)``.
            generate_kwargs: Arguments of the segmenter's ``generate``: ``center_distance_threshold``,
                ``boundary_distance_threshold`` for AIS; ``pred_iou_thresh``, ``stability_score_thresh``,
                ``box_nms_thresh`` for AMG.

        Returns:
            The uint32 label image (Y, X).
        """
        segmenter = self._initialized_segmenter(i, pbar_init, pbar_update)
        shape = tuple(self.image_shape[-2:])
        if self.with_decoder:
            segmentation = segmenter.generate(min_size=min_object_size, **generate_kwargs)
        else:
            masks = segmenter.generate(output_mode="binary_mask", **generate_kwargs)
            segmentation = util.mask_data_to_segmentation(masks, shape=shape, with_background=True,
                                                          min_object_size=min_object_size)
        return np.asarray(segmentation).astype("uint32", copy=False)

    def segment_volume_automatically(
        self,
        min_object_size: int = 100,
        gap_closing: Optional[int] = 2,
        min_extent: Optional[int] = 2,
        pbar_init: ProgressInit = None,
        pbar_update: ProgressUpdate = None,
        **generate_kwargs,
    ) -> np.ndarray:
        """Automatic instance segmentation of the whole volume: every slice, then merged into 3D objects.

        Args:
            min_object_size: Objects (per slice) with fewer pixels are removed.
            gap_closing: Close gaps of up to this many slices along z (0 / None: no closing).
            min_extent: Remove objects spanning fewer slices (0 / None: keep all).
            pbar_init: Progress callback ``pbar_init(total, description)``.
            pbar_update: Progress callback ``pbar_update(n)``.
            generate_kwargs: Arguments of the segmenter's ``generate`` (see :meth:`segment_automatically`).

        Returns:
            The uint32 label volume (Z, Y, X).
        """
        from ..multi_dimensional_segmentation import merge_instance_segmentation_3d

        if self.ndim != 3:
            raise ValueError("segment_volume_automatically needs a 3D tool.")
        n_slices = self.image_shape[0]
        if pbar_init is not None:
            pbar_init(n_slices, "Segment slices")
        slices = np.zeros(self.image_shape, dtype="uint32")
        for z in range(n_slices):  # object ids only need to be unique per slice for the merge
            slices[z] = self.segment_automatically(z, min_object_size, **generate_kwargs)
            if pbar_update is not None:
                pbar_update(1)
        merged = merge_instance_segmentation_3d(
            slices, beta=0.5, gap_closing=gap_closing or None, min_z_extent=min_extent or None,
            verbose=pbar_init is not None, pbar_init=pbar_init, pbar_update=pbar_update,
        )
        return merged.astype("uint32")


def _data_signature(image, embedding_path: Optional[str]) -> str:
    """The image's data signature: read from the embedding cache when there is one, else computed."""
    if embedding_path is not None:
        import zarr

        signature = zarr.open_group(embedding_path, mode="r").attrs.get("data_signature")
        if signature:
            return str(signature)
    from .._image import data_signature

    return data_signature(image)
