"""Choosing the automatic segmentation class for a model."""
from __future__ import annotations

from typing import Optional

from .ais import InstanceSegmentationWithDecoder
from .amg import AMGBase, AutomaticMaskGenerator
from .apg import AutomaticPromptGenerator, TiledAutomaticPromptGenerator
from .tiled import TiledAutomaticMaskGenerator, TiledInstanceSegmentationWithDecoder

#: The segmentation mode used when a decoder is available and no mode is requested.
DEFAULT_SEGMENTATION_MODE_WITH_DECODER = "ais"

_MODES = ("amg", "ais", "apg")


def get_instance_segmentation_generator(
    predictor,
    is_tiled: bool,
    decoder=None,
    segmentation_mode: Optional[str] = None,
    **kwargs,
):
    """The automatic segmentation class for a predictor (and decoder).

    Args:
        predictor: The segment_anything ``SamPredictor``.
        is_tiled: Whether the embeddings will be tiled.
        decoder: The AIS decoder, if the model has one.
        segmentation_mode: "amg" (point grid), "ais" (decoder) or "apg" (SAM prompted with points derived from
            the decoder). None: "ais" with a decoder, else "amg".
        kwargs: Arguments of the class's constructor (e.g. ``points_per_side`` for AMG).

    Returns:
        An ``AutomaticMaskGenerator``, ``InstanceSegmentationWithDecoder`` or ``AutomaticPromptGenerator``
        (or the ``Tiled`` variant).

    Raises:
        ValueError: Unknown mode, or "ais" / "apg" without a decoder.
    """
    if segmentation_mode is None or str(segmentation_mode).lower() == "auto":
        segmentation_mode = "amg" if decoder is None else DEFAULT_SEGMENTATION_MODE_WITH_DECODER
    mode = str(segmentation_mode).lower()
    if mode == "amg":
        cls = TiledAutomaticMaskGenerator if is_tiled else AutomaticMaskGenerator
        return cls(predictor, **kwargs)
    if mode in ("ais", "apg"):
        if decoder is None:
            raise ValueError(f"segmentation_mode='{mode}' needs a decoder; this model has none. Use a model with a "
                             "decoder (e.g. 'vit_b_lm') or segmentation_mode='amg'.")
        if mode == "ais":
            cls = TiledInstanceSegmentationWithDecoder if is_tiled else InstanceSegmentationWithDecoder
        else:
            cls = TiledAutomaticPromptGenerator if is_tiled else AutomaticPromptGenerator
        return cls(predictor, decoder, **kwargs)
    raise ValueError(f"Invalid segmentation_mode {segmentation_mode!r}; choose one of {', '.join(_MODES)}.")


__all__ = ["AMGBase", "DEFAULT_SEGMENTATION_MODE_WITH_DECODER", "get_instance_segmentation_generator"]
