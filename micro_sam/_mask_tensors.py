"""Boxes and run-length encodings of batches of binary torch masks (micro_sam 1.8's ``batched_mask_to_box``
and ``mask_to_rle_pytorch``, exported from :mod:`micro_sam.instance_segmentation` and :mod:`micro_sam.inference`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List

if TYPE_CHECKING:  # pragma: no cover
    import torch

_RLE_IMPLEMENTATIONS = ("default", "numpy", "numba", "bioimage_cpp")


def batched_mask_to_box(masks: "torch.Tensor") -> "torch.Tensor":
    """XYXY boxes around binary masks, with inclusive right / bottom coordinates (segment_anything's convention).

    Args:
        masks: Boolean tensor of shape (..., H, W), on any device.

    Returns:
        Integer tensor of shape (..., 4) with ``[x0, y0, x1, y1]`` per mask (``x1`` is the last column of the
        mask); ``[0, 0, 0, 0]`` for an empty mask. Same device as ``masks``.

    Raises:
        ValueError: If ``masks`` is not boolean (thresholded logits give wrong boxes) or has fewer than 2 dims.
    """
    import torch

    from .instance_segmentation._mask_store import masks_to_boxes

    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be a boolean tensor (threshold the logits first), got dtype {masks.dtype}.")
    if masks.ndim < 2:
        raise ValueError(f"masks must have shape (..., H, W), got shape {tuple(masks.shape)}.")
    leading = masks.shape[:-2]
    if masks.numel() == 0:
        return torch.zeros(*leading, 4, dtype=torch.int64, device=masks.device)
    boxes = masks_to_boxes(masks.reshape(-1, *masks.shape[-2:]))
    return boxes.reshape(*leading, 4)


def mask_to_rle_pytorch(tensor: "torch.Tensor", rle_implementation: str = "default") -> List[Dict[str, Any]]:
    """Uncompressed run-length encodings (COCO layout) of a batch of binary masks.

    The counts run over the mask in column-major (Fortran) order and start with the number of background
    pixels (0 when the mask starts with foreground), as segment_anything's ``mask_to_rle_pytorch``. The
    encoding is computed on the CPU.

    Args:
        tensor: Tensor of shape (B, H, W); nonzero values are foreground.
        rle_implementation: Accepted for compatibility with micro_sam 1.8 ("default", "numpy", "numba",
            "bioimage_cpp"); every choice runs the same vectorised numpy encoder and gives the same counts.

    Returns:
        One ``{"size": [H, W], "counts": [...]}`` dict per mask.

    Raises:
        ValueError: For an unknown ``rle_implementation`` or a tensor that is not 3D.
    """
    from .instance_segmentation._mask_store import rle_encode

    if rle_implementation not in _RLE_IMPLEMENTATIONS:
        raise ValueError(f"Unknown rle_implementation {rle_implementation!r}; choose one of {_RLE_IMPLEMENTATIONS}.")
    if tensor.ndim != 3:
        raise ValueError(f"tensor must have shape (B, H, W), got shape {tuple(tensor.shape)}.")
    masks = tensor.detach().cpu().numpy() != 0
    return [rle_encode(mask) for mask in masks]
