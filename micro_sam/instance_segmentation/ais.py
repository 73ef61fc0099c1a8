"""Automatic instance segmentation with a decoder (AIS).

A UNETR decoder on top of SAM's image encoder predicts, for every pixel, the foreground probability and the
per-object normalised distances to the object centre and to the object boundary. Objects are then found by
a seeded watershed (``postprocessing.watershed_from_center_and_boundary_distances``):
``initialize`` runs the decoder once, ``generate`` only the (fast, vectorised) post-processing, so that
thresholds can be tuned interactively.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .amg import _check_embeddings_shape, _select_image
from .postprocessing import gaussian_smoothing, segmentation_to_masks, watershed_from_center_and_boundary_distances

__all__ = ["InstanceSegmentationWithDecoder"]

_STATE_KEYS = ("foreground", "center_distances", "boundary_distances")


def _check_decoder(predictor, decoder) -> None:
    if decoder is None or not callable(decoder):
        raise ValueError("A decoder is required for instance segmentation with a decoder (AIS); got "
                         f"{type(decoder).__name__}. Use get_decoder / get_predictor_and_decoder to load one.")
    encoder = getattr(getattr(predictor, "model", None), "image_encoder", None)
    decoder_size = getattr(decoder, "encoder_img_size", None)
    encoder_size = getattr(encoder, "img_size", None)
    if decoder_size is not None and encoder_size is not None and int(decoder_size) != int(encoder_size):
        raise ValueError(
            f"The decoder was built for an image encoder with input size {decoder_size}, but the predictor's "
            f"encoder has input size {encoder_size}; load the decoder that belongs to this model."
        )


def background_maps(shape: Tuple[int, int]) -> np.ndarray:
    """The (3, H, W) decoder maps of an image without objects: foreground 0, both distances 1 (far from any)."""
    maps = np.ones((3,) + tuple(int(s) for s in shape), dtype="float32")
    maps[0] = 0.0
    return maps


def run_decoder(decoder, features, input_size, original_size) -> np.ndarray:
    """Apply the decoder to (1, C, h, w) embeddings; returns the (3, H, W) float32 maps.

    Raises:
        ValueError: The decoder does not fit the embeddings or does not return three maps.
    """
    import torch

    with torch.inference_mode():
        try:
            output = decoder(features, tuple(int(s) for s in input_size), tuple(int(s) for s in original_size))
        except RuntimeError as error:  # e.g. a convolution with a wrong number of input channels
            raise ValueError(
                f"The decoder could not be applied to image embeddings of shape {tuple(features.shape)}: {error}. "
                "Does the decoder belong to this SAM model?"
            ) from error
    output = output.detach().float().cpu().numpy()
    if output.ndim == 4:
        output = output[0]
    expected = (3,) + tuple(int(s) for s in original_size)
    if output.shape != expected:
        raise ValueError(f"The decoder returned maps of shape {output.shape}, expected {expected} "
                         "(foreground, centre distances, boundary distances).")
    return output


class InstanceSegmentationWithDecoder:
    """Instance segmentation with the AIS decoder; same interface as ``AutomaticMaskGenerator``.

    Usage::

        segmenter = InstanceSegmentationWithDecoder(predictor, decoder)
        segmenter.initialize(image)                                    # embeddings and decoder maps
        labels = segmenter.generate(center_distance_threshold=0.75)    # watershed, repeat to tune

    Args:
        predictor: The segment_anything ``SamPredictor``.
        decoder: The decoder (:func:`~micro_sam.instance_segmentation.get_decoder`), called as
            ``decoder(embeddings, input_size, original_size)`` and returning (1, 3, H, W) maps.
    """

    def __init__(self, predictor, decoder) -> None:
        _check_decoder(predictor, decoder)
        self._predictor = predictor
        self._decoder = decoder
        self._foreground = None
        self._center_distances = None
        self._boundary_distances = None
        self._i = None
        self._is_initialized = False

    @property
    def is_initialized(self) -> bool:
        """Whether ``initialize`` (or ``set_state``) has been called."""
        return self._is_initialized

    def _set_maps(self, maps: np.ndarray, i: Optional[int]) -> None:
        self._foreground, self._center_distances, self._boundary_distances = (np.asarray(m) for m in maps)
        self._i = i
        self._is_initialized = True

    def initialize(
        self,
        image: np.ndarray,
        image_embeddings: Optional[Dict[str, Any]] = None,
        i: Optional[int] = None,
        verbose: bool = False,
        pbar_init: Optional[callable] = None,
        pbar_update: Optional[callable] = None,
        ndim: int = 2,
    ) -> None:
        """Compute the image embeddings (unless given) and the decoder's maps.

        An image without objects to find, i.e. without contrast (every channel constant, e.g. all zeros) or
        pure noise (``micro_sam._structure.has_signal``), gets the maps of the background, without running the
        model: automatic segmentation returns no objects for it.

        Args:
            image: (Y, X) or (Y, X, C) image; or a volume / time series together with the slice index ``i``.
            image_embeddings: Precomputed embeddings of this image (see ``util.precompute_image_embeddings``).
            i: Slice index for 3D embeddings (and volumes).
            verbose: Show progress bars.
            pbar_init: External progress bar callback ``pbar_init(total, description)``.
            pbar_update: External progress bar callback ``pbar_update(n)``.
            ndim: Dimensionality of ``image`` when the embeddings are computed here (2; 3 with ``i``).

        Raises:
            ValueError: The embeddings belong to an image of another shape, the image is not 2D, or the decoder
                does not fit the embeddings.
        """
        from .._structure import has_signal
        from ..util import handle_pbar, precompute_image_embeddings, set_precomputed

        selected = _select_image(image, i) if ndim == 2 or i is not None else None
        if selected is not None and not has_signal(selected):
            if image_embeddings is not None:
                _check_embeddings_shape(image_embeddings, selected.shape[:2])
            self._set_maps(background_maps(selected.shape[:2]), i)
            return
        if image_embeddings is None:
            image_embeddings = precompute_image_embeddings(self._predictor, image, ndim=ndim, verbose=verbose)
        image = _select_image(image, i)
        _check_embeddings_shape(image_embeddings, image.shape[:2])

        _, init, update, close = handle_pbar(verbose, pbar_init, pbar_update)
        init(1, "Initialize instance segmentation with decoder")
        try:
            set_precomputed(self._predictor, image_embeddings, i=i)
            predictor = self._predictor
            maps = run_decoder(self._decoder, predictor.features, predictor.input_size, predictor.original_size)
            update(1)
        finally:
            close()
        self._set_maps(maps, i)

    def generate(
        self,
        center_distance_threshold: float = 0.5,
        boundary_distance_threshold: float = 0.5,
        foreground_threshold: float = 0.5,
        foreground_smoothing: float = 1.0,
        distance_smoothing: float = 1.6,
        min_size: int = 0,
        output_mode: str = "instance_segmentation",
        tile_shape: Optional[Tuple[int, int]] = None,
        halo: Optional[Tuple[int, int]] = None,
        n_threads: Optional[int] = None,
        optimize_memory: bool = False,
        segmentation: Optional[np.ndarray] = None,
    ) -> Union[List[Dict[str, Any]], np.ndarray]:
        """Segment the initialized image from the decoder's maps (cheap; call again to tune thresholds).

        Args:
            center_distance_threshold: Seeds need a (smoothed) centre distance below this value.
            boundary_distance_threshold: Seeds need a (smoothed) boundary distance below this value.
            foreground_threshold: Pixels with a (smoothed) foreground probability above this are foreground.
            foreground_smoothing: Sigma of the Gaussian applied to the foreground map (0 for none).
            distance_smoothing: Sigma of the Gaussian applied to the distance maps (0 for none).
            min_size: Objects with fewer pixels are removed.
            output_mode: "instance_segmentation" (label image) or "binary_mask" (one record per object,
                see :func:`~micro_sam.instance_segmentation.postprocessing.segmentation_to_masks`).
            tile_shape: Accepted for compatibility with micro_sam (block-wise post-processing). The watershed
                always runs on the whole image here, which gives the same, seamless result.
            halo: See ``tile_shape``.
            n_threads: Accepted for compatibility; not used.
            optimize_memory: Accepted for compatibility; not used.
            segmentation: Optional pre-allocated array (numpy or zarr) of the image shape to write the label
                image into; it is also returned.

        Returns:
            The (H, W) uint32 label image (objects 1..N, all 0 if nothing was found) or the object records.

        Raises:
            RuntimeError: ``initialize`` was not called.
        """
        if not self.is_initialized:
            raise RuntimeError(f"{type(self).__name__} has not been initialized. Call initialize first.")
        if output_mode not in ("instance_segmentation", "binary_mask"):
            raise ValueError(f"Invalid output_mode {output_mode!r} for {type(self).__name__}; choose "
                             "'instance_segmentation' or 'binary_mask'.")
        if tile_shape is not None and halo is None:
            raise ValueError("halo must be given together with tile_shape.")
        foreground = self._foreground
        if foreground_smoothing > 0:
            foreground = gaussian_smoothing(foreground, foreground_smoothing)
        result = watershed_from_center_and_boundary_distances(
            self._center_distances, self._boundary_distances, foreground,
            center_distance_threshold=center_distance_threshold,
            boundary_distance_threshold=boundary_distance_threshold,
            foreground_threshold=foreground_threshold,
            distance_smoothing=distance_smoothing,
            min_size=min_size,
        )
        if segmentation is not None:
            if tuple(segmentation.shape) != result.shape:
                raise ValueError(f"segmentation has shape {tuple(segmentation.shape)}, expected {result.shape}.")
            segmentation[...] = result
            result = segmentation
        if output_mode == "binary_mask":
            return segmentation_to_masks(np.asarray(result))
        return result

    def get_state(self) -> Dict[str, Any]:
        """The decoder's maps: ``{"foreground", "center_distances", "boundary_distances"}`` ((H, W) float32).

        Raises:
            RuntimeError: Not initialized.
        """
        if not self.is_initialized:
            raise RuntimeError(f"{type(self).__name__} has not been initialized. Call initialize first.")
        return {"foreground": self._foreground, "center_distances": self._center_distances,
                "boundary_distances": self._boundary_distances}

    def set_state(self, state: Dict[str, Any]) -> None:
        """Set the maps from :meth:`get_state`.

        Raises:
            ValueError: Missing maps or maps of different shapes.
        """
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"The state is missing {missing}; expected the output of get_state().")
        maps = [np.asarray(state[key]) for key in _STATE_KEYS]
        if len({m.shape for m in maps}) != 1:
            raise ValueError(f"The maps in the state have different shapes: {[m.shape for m in maps]}.")
        self._set_maps(maps, None)

    def clear_state(self) -> None:
        """Forget the initialized maps."""
        self._foreground = None
        self._center_distances = None
        self._boundary_distances = None
        self._is_initialized = False
