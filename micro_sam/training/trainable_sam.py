"""A trainable wrapper around a segment_anything ``Sam``: differentiable preprocessing and prompt decoding.

Coordinates follow segment_anything: prompts are given in the frame of the *model input*, i.e. after the
image was resized so that its longest side is ``img_size`` (1024); point coordinates are (x, y) and boxes
XYXY. :class:`micro_sam.training.util.ConvertToSamInputs` produces them from ground-truth labels.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..models.fast_mask_decoder import decode_masks
from .._lazy import lazy_attributes

__all__ = ["TrainableSAM", "frozen_parts_to_eval"]


# Names micro_sam 1.8 exposes here (imported there from other modules), resolved on first use.
__getattr__, __dir__ = lazy_attributes(globals(), {
    "ResizeLongestSide": "segment_anything.utils.transforms:ResizeLongestSide",
    "Sam": "segment_anything.modeling:Sam",
})


def frozen_parts_to_eval(module: nn.Module) -> nn.Module:
    """Put every submodule whose parameters are all frozen into evaluation mode; the rest keep their mode.

    Frozen means ``requires_grad=False``. The walk is top-down: a submodule that has parameters, none of them
    trainable, is switched to eval as a whole (with its parameter-free children such as dropout); a submodule
    with some trainable parameters is descended into. A frozen part thus keeps its batch-norm running
    statistics (vit_t's TinyViT has batch norms) and computes during training the same features as at
    inference, instead of normalising with the statistics of each training batch and drifting its stored ones.

    Args:
        module: The model, usually just switched to training mode.

    Returns:
        The same module.
    """
    for child in module.children():
        if _is_frozen(child):
            child.eval()
        else:
            frozen_parts_to_eval(child)
    return module


def _is_frozen(module: nn.Module) -> bool:
    """Whether the module has parameters and none of them is trained."""
    parameters = list(module.parameters())
    return bool(parameters) and not any(p.requires_grad for p in parameters)


class TrainableSAM(nn.Module):
    """Make a segment_anything ``Sam`` trainable: batched preprocessing, image encoding and prompt decoding.

    The state dict has the SAM parameters under the ``sam.`` prefix (torch_em trainer checkpoints store it so),
    e.g. ``sam.image_encoder.patch_embed.proj.weight``.

    In training mode, parts whose parameters are all frozen stay in evaluation mode
    (:func:`frozen_parts_to_eval`).

    Args:
        sam: The Segment Anything model.
        embedding_cache_size: When the image encoder is frozen, keep the embeddings of up to this many distinct
            input batches (keyed by a hash of the image data) and reuse them instead of running the encoder
            again: training only the prompt encoder and mask decoder on a fixed set of images (and their flipped
            variants) then runs the encoder once per variant. Each entry holds a (B, 256, 64, 64) float32 tensor
            (4 MB per image at encoder size 1024, 1 MB at 512). When only the leading stages of a vit_t encoder
            are frozen (e.g. ``freeze=["image_encoder.patch_embed", "image_encoder.layers.0", ...]``), the
            output of those stages is cached instead and the trainable rest runs on it (after the third stage
            a (B, 1024, 320) tensor, 1.3 MB per image at 512). 0 disables it. The cache assumes that the frozen
            weights do not change; :meth:`load_state_dict` empties it.
        gradient_checkpointing: When the image encoder trains (fully or with PEFT), keep only the input of each
            encoder block (ViT) or stage (vit_t) for the backward pass and recompute the rest there: the encoder's
            activation memory drops to about one block's, for about a third more compute. Same gradients. vit_t
            stages whose batch norms update their statistics are not recomputed (that would update them twice).
    """

    def __init__(self, sam: nn.Module, embedding_cache_size: int = 0, gradient_checkpointing: bool = False) -> None:
        from segment_anything.utils.transforms import ResizeLongestSide

        super().__init__()
        if embedding_cache_size < 0:
            raise ValueError(f"embedding_cache_size must be >= 0, got {embedding_cache_size}.")
        self.sam = sam
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.embedding_cache_size = int(embedding_cache_size)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self._embedding_cache: "OrderedDict[bytes, Tuple[torch.Tensor, Tuple[int, int]]]" = OrderedDict()

    def load_state_dict(self, *args, **kwargs):
        """``nn.Module.load_state_dict``; also forgets the cached embeddings of the old weights."""
        self._embedding_cache.clear()
        return super().load_state_dict(*args, **kwargs)

    def train(self, mode: bool = True) -> "TrainableSAM":
        """Set training mode; frozen parts (see :func:`frozen_parts_to_eval`) stay in evaluation mode."""
        super().train(mode)
        if mode:
            frozen_parts_to_eval(self)
        return self

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
        n_cached = self._cached_stages()
        key = None if n_cached is None else self._cache_key(batched_inputs, n_cached)
        if key is not None and key in self._embedding_cache:
            self._embedding_cache.move_to_end(key)
            cached, input_size = self._embedding_cache[key]
        else:
            images = torch.stack([inp["image"] for inp in batched_inputs], dim=0).to(self.device, non_blocking=True)
            images, input_size = self.preprocess(images.float())
            if key is None:
                cached = self._encode(images)
            else:
                with torch.no_grad():
                    cached = (self.sam.image_encoder(images) if n_cached == 0
                              else self.sam.image_encoder.forward_stages(images, 0, n_cached))
                self._embedding_cache[key] = (cached, input_size)
                while len(self._embedding_cache) > self.embedding_cache_size:
                    self._embedding_cache.popitem(last=False)
        for inp in batched_inputs:
            inp["input_size"] = input_size
        if key is not None and n_cached > 0:
            # the trainable rest of the encoder runs on the cached output of its frozen leading stages
            return self._encode(cached, start=n_cached), batched_inputs
        return cached, batched_inputs

    def _encode(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The image encoder (from stage ``start`` of a staged encoder), with gradient checkpointing if enabled and
        gradients are needed."""
        encoder = self.sam.image_encoder
        if not (self.gradient_checkpointing and torch.is_grad_enabled()
                and any(p.requires_grad for p in encoder.parameters())):
            return encoder(x) if start == 0 else encoder.forward_stages(x, start)
        from torch.utils.checkpoint import checkpoint

        if hasattr(encoder, "forward_stages"):  # TinyViT: stage by stage
            stages = encoder.stages
            for i in range(start, len(stages)):
                updates_statistics = any(m.training for m in stages[i].modules()
                                         if isinstance(m, nn.modules.batchnorm._BatchNorm))
                x = encoder.forward_stages(x, i, i + 1) if updates_statistics else \
                    checkpoint(encoder.forward_stages, x, i, i + 1, use_reentrant=False)
            return encoder.forward_stages(x, len(stages))  # the neck
        # segment_anything's ViT: block by block
        x = encoder.patch_embed(x)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        for block in encoder.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return encoder.neck(x.permute(0, 3, 1, 2))

    def _cached_stages(self):
        """What the cache holds for the current model: 0 for the embeddings of a frozen encoder, k > 0 for the
        output of the first k stages of an encoder with ``stages`` / ``forward_stages`` (vit_t) whose leading
        stages are frozen, None when nothing can be cached (no cache, or the encoder's first part trains)."""
        encoder = self.sam.image_encoder
        if self.embedding_cache_size == 0:
            return None
        if _is_frozen(encoder):
            return None if encoder.training else 0
        n_frozen = 0
        for stage in getattr(encoder, "stages", []):
            if not _is_frozen(stage) or stage.training:
                break
            n_frozen += 1
        return n_frozen if n_frozen > 0 and hasattr(encoder, "forward_stages") else None

    def _cache_key(self, batched_inputs: List[Dict[str, Any]], n_cached: int):
        """The cache key of a batch (a hash of its images and of what is cached), or None when the images are
        not CPU tensors."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"stages:{n_cached}".encode())
        for inp in batched_inputs:
            image = inp["image"]
            if not isinstance(image, torch.Tensor) or image.device.type != "cpu":
                return None
            image = image.detach()
            digest.update(f"{tuple(image.shape)}{image.dtype}".encode())
            digest.update((image.float() if image.dtype == torch.bfloat16 else image).contiguous().numpy().tobytes())
        return digest.digest()

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
