"""A trainable wrapper around a segment_anything ``Sam``: differentiable preprocessing and prompt decoding.

Coordinates follow segment_anything: prompts are given in the frame of the *model input*, i.e. after the
image was resized so that its longest side is ``img_size`` (1024); point coordinates are (x, y) and boxes
XYXY. :class:`micro_sam.training.util.ConvertToSamInputs` produces them from ground-truth labels.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models.fast_mask_decoder import decode_masks

__all__ = ["TrainableSAM"]


class TrainableSAM(nn.Module):
    """Make a segment_anything ``Sam`` trainable: batched preprocessing, image encoding and prompt decoding.

    The state dict has the SAM parameters under the ``sam.`` prefix (torch_em trainer checkpoints store it so),
    e.g. ``sam.image_encoder.patch_embed.proj.weight``.

    Args:
        sam: The Segment Anything model.
    """

    def __init__(self, sam: nn.Module) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        super().__init__()
        self.sam = sam
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)

    @property
    def device(self) -> torch.device:
        """The device of the model parameters."""
        return self.sam.device

    @property
    def img_size(self) -> int:
        """The side length of the square encoder input (1024 for all SAM models)."""
        return int(self.sam.image_encoder.img_size)

    def input_size(self, original_size: Tuple[int, int]) -> Tuple[int, int]:
        """The (h, w) an image of ``original_size`` (H, W) is resized to (longest side = ``img_size``)."""
        return tuple(self.transform.get_preprocess_shape(int(original_size[0]), int(original_size[1]),
                                                         self.img_size))

    def preprocess(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Resize, normalise and pad a batch of images for the image encoder.

        Args:
            x: (B, C, H, W) float images with values in [0, 255]; C is 1 (broadcast to RGB) or 3.

        Returns:
            The (B, 3, img_size, img_size) encoder input and the (h, w) size of the resized images inside it.
        """
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Expected images of shape (B, 1 or 3, H, W), got {tuple(x.shape)}.")
        # segment_anything's ResizeLongestSide.apply_image_torch reads the size from the first two axes
        # (batch and channels) of a BCHW tensor; the target size is computed from (H, W) here.
        input_size = self.input_size(x.shape[-2:])
        x = F.interpolate(x, input_size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.sam.pixel_mean.unsqueeze(0)) / self.sam.pixel_std.unsqueeze(0)
        pad_h, pad_w = self.img_size - input_size[0], self.img_size - input_size[1]
        return F.pad(x, (0, pad_w, 0, pad_h)), input_size

    def image_embeddings_oft(self, batched_inputs: List[Dict[str, Any]]) -> Tuple[torch.Tensor, List[Dict[str, Any]]]:
        """Compute the image embeddings of a batch ("on the fly").

        Args:
            batched_inputs: One dict per image with ``image`` (C, H, W) in [0, 255]; all of the same size.

        Returns:
            The (B, 256, 64, 64) embeddings, and the inputs with ``input_size`` set (modified in place).
        """
        images = torch.stack([inp["image"] for inp in batched_inputs], dim=0).to(self.device, non_blocking=True)
        images, input_size = self.preprocess(images.float())
        for inp in batched_inputs:
            inp["input_size"] = input_size
        return self.sam.image_encoder(images), batched_inputs

    def forward(
        self,
        batched_inputs: List[Dict[str, Any]],
        image_embeddings: torch.Tensor,
        multimask_output: bool = False,
        upsample_masks: bool = True,
    ) -> List[Dict[str, Any]]:
        """Predict masks for the prompts of each image, all objects of an image in one decoder call.

        Args:
            batched_inputs: One dict per image, as for ``Sam.forward``: ``original_size``, ``input_size`` (set by
                :meth:`image_embeddings_oft`) and the prompts of its N objects: ``point_coords`` (N, P, 2) and
                ``point_labels`` (N, P), ``boxes`` (N, 4), ``mask_inputs`` (N, 1, 256, 256) logits.
            image_embeddings: (B, 256, 64, 64) embeddings of the images.
            multimask_output: Predict three masks per object instead of one.
            upsample_masks: Also return ``masks`` at the original image size. The training loss can work on
                the low-resolution logits alone, which saves the upsampling.

        Returns:
            One dict per image: ``low_res_masks`` (N, M, 256, 256) logits, ``iou_predictions`` (N, M) and, with
            ``upsample_masks``, ``masks`` (N, M, H, W) logits; M is 3 with ``multimask_output``, else 1.
        """
        outputs = []
        dense_pe = self.sam.prompt_encoder.get_dense_pe()
        for record, embedding in zip(batched_inputs, image_embeddings):
            points = None
            if record.get("point_coords") is not None:
                points = (record["point_coords"].to(self.device, non_blocking=True),
                          record["point_labels"].to(self.device, non_blocking=True))
            boxes = record.get("boxes")
            boxes = None if boxes is None else boxes.to(self.device, non_blocking=True)
            masks = record.get("mask_inputs")
            masks = None if masks is None else masks.to(self.device, non_blocking=True)

            sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=masks)
            low_res_masks, iou_predictions = decode_masks(  # = self.sam.mask_decoder(...), with less arithmetic
                self.sam.mask_decoder,
                image_embeddings=embedding.unsqueeze(0),
                image_pe=dense_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            output = {"low_res_masks": low_res_masks, "iou_predictions": iou_predictions}
            if upsample_masks:
                output["masks"] = self.sam.postprocess_masks(
                    low_res_masks, input_size=record["input_size"], original_size=record["original_size"]
                )
            outputs.append(output)
        return outputs
