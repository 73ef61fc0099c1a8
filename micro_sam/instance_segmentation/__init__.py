"""Automatic instance segmentation.

- AMG (automatic mask generation): SAM segments a grid of point prompts; masks are filtered by predicted IoU
  and stability and de-duplicated by NMS (:class:`AutomaticMaskGenerator`, :class:`TiledAutomaticMaskGenerator`).
- AIS (instance segmentation with a decoder): a UNETR decoder on SAM's image encoder predicts foreground,
  centre distance and boundary distance maps, segmented by a seeded watershed
  (:class:`InstanceSegmentationWithDecoder`, :class:`TiledInstanceSegmentationWithDecoder`).
- APG (automatic prompt generation): SAM prompted with points derived from the decoder's maps
  (:class:`AutomaticPromptGenerator`, :class:`TiledAutomaticPromptGenerator`).

All segmenters share ``initialize`` (expensive, once per image), ``generate`` (cheap, re-run to tune
parameters), ``get_state`` / ``set_state`` / ``clear_state`` and ``is_initialized``.
"""
from ._factory import DEFAULT_SEGMENTATION_MODE_WITH_DECODER, get_instance_segmentation_generator
from ._volume import segment_slices
from .ais import InstanceSegmentationWithDecoder
from .amg import AMGBase, AutomaticMaskGenerator
from .apg import AutomaticPromptGenerator, TiledAutomaticPromptGenerator
from .decoder import DecoderAdapter, get_decoder, get_predictor_and_decoder, get_unetr
from .postprocessing import watershed_from_center_and_boundary_distances
from .tiled import TiledAutomaticMaskGenerator, TiledInstanceSegmentationWithDecoder
from .._lazy import lazy_attributes
from .._mask_tensors import batched_mask_to_box, mask_to_rle_pytorch

__all__ = [
    "AMGBase", "AutomaticMaskGenerator", "TiledAutomaticMaskGenerator",
    "InstanceSegmentationWithDecoder", "TiledInstanceSegmentationWithDecoder",
    "AutomaticPromptGenerator", "TiledAutomaticPromptGenerator",
    "DecoderAdapter", "get_unetr", "get_decoder", "get_predictor_and_decoder",
    "get_instance_segmentation_generator", "DEFAULT_SEGMENTATION_MODE_WITH_DECODER",
    "segment_slices", "watershed_from_center_and_boundary_distances",
]


# Names micro_sam 1.8 exposes here (imported there from other modules), resolved on first use.
__getattr__, __dir__ = lazy_attributes(globals(), {
    "SamPredictor": "segment_anything:SamPredictor",
    "UNETR": "torch_em.model.unetr:UNETR",
    "batched_inference": "micro_sam.inference:batched_inference",
    "batched_tiled_inference": "micro_sam.inference:batched_tiled_inference",
    "batched_nms": "torchvision.ops.boxes:batched_nms",
    "box_area": "torchvision.ops.boxes:box_area",
    "find_boundaries": "skimage.segmentation:find_boundaries",
    "regionprops": "skimage.measure:regionprops",
})
