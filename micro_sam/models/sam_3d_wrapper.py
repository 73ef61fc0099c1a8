"""SAM for 3D semantic segmentation: the ViT encoder sees each slice, with 3D adapters that mix neighbouring slices.

:class:`Sam3DWrapper` puts two depth adapters into every transformer block of the ViT encoder
(:class:`NDBlockWrapper`): before the attention and before the MLP, ``x + up(gelu(conv3d(down(norm(x)))))`` with a
(3, 1, 1) convolution over the depth axis. The mask decoder, built with ``num_multimask_outputs=n_classes``,
predicts one logit map per class for each slice, without prompts. Module and parameter names are micro_sam 1.8's
(so its checkpoints of these models load); train with :class:`micro_sam.training.semantic_sam_trainer.SemanticSamTrainer`.

Volumes are (B, 3, D, H, W) tensors with values in [0, 255] and H, W at most the encoder's input size (they are
normalised and padded like SAM's input, not resized).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Type, Union

import torch
from torch import nn

__all__ = ["ImageEncoderViT3DWrapper", "NDBlockWrapper", "Sam3DWrapper", "get_sam_3d_model"]

_VIT_DIMS = {"vit_b": (768, 12), "vit_l": (1024, 16), "vit_h": (1280, 16)}


def get_sam_3d_model(
    device: Union[str, torch.device],
    n_classes: int,
    image_size: int,
    lora_rank: Optional[int] = None,
    freeze_encoder: bool = False,
    model_type: str = "vit_b",
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
) -> "Sam3DWrapper":
    """Build a :class:`Sam3DWrapper` from a SAM model (weights that fit are loaded, the rest starts at random).

    Args:
        device: The device of the model.
        n_classes: Number of classes (including the background): masks predicted per slice.
        image_size: Side of the square encoder input (e.g. 512); the position tables are resized to it.
        lora_rank: If given, LoRA of this rank on the encoder's attention (the encoder is then not frozen).
        freeze_encoder: Freeze the image encoder (ignored with ``lora_rank``).
        model_type: The SAM to start from ("vit_b", "vit_l", "vit_h" or a finetuned model such as "vit_b_lm").
        checkpoint_path: Weights to start from instead of the registered ones.

    Returns:
        The model on ``device``.

    Raises:
        ValueError: For vit_t (its TinyViT has no ViT blocks for the adapters), an invalid ``n_classes``,
            ``image_size`` or ``lora_rank``.
    """
    from ..util import get_sam_model

    _check_model_type(model_type)
    peft_kwargs = {} if lora_rank is None else {"rank": lora_rank, "peft_module": "LoRASurgery"}
    _, sam = get_sam_model(
        model_type=model_type, device=device, checkpoint_path=checkpoint_path, return_sam=True,
        flexible_load_checkpoint=True, num_multimask_outputs=n_classes, image_size=image_size,
        peft_kwargs=peft_kwargs,
    )
    sam_3d = Sam3DWrapper(sam, freeze_encoder=freeze_encoder if lora_rank is None else False,
                          model_type=model_type[:5])
    return sam_3d.to(device)


def _check_model_type(model_type) -> None:
    if not isinstance(model_type, str) or model_type[:5] not in _VIT_DIMS:
        raise ValueError(f"The 3D adapters need a ViT encoder: model_type must start with one of "
                         f"{', '.join(_VIT_DIMS)}, got {model_type!r} (vit_t's TinyViT is not supported).")


class Sam3DWrapper(nn.Module):
    """SAM with depth adapters in its image encoder, for volumetric semantic segmentation without prompts.

    Args:
        sam_model: A SAM with segment_anything's ViT encoder (modified in place: its encoder is wrapped).
        freeze_encoder: Freeze the image encoder, adapters included.
        model_type: "vit_b", "vit_l" or "vit_h", the encoder's size; None reads it from the encoder.

    Raises:
        ValueError: An unsupported model type, or one that does not match the encoder's width.
    """

    def __init__(self, sam_model: nn.Module, freeze_encoder: bool, model_type: Optional[str] = "vit_b"):
        super().__init__()
        encoder = sam_model.image_encoder
        width = encoder.patch_embed.proj.out_channels
        if model_type is None:
            embed_dim, num_heads = width, encoder.blocks[0].attn.num_heads
        else:
            _check_model_type(model_type)
            embed_dim, num_heads = _VIT_DIMS[model_type[:5]]
            if embed_dim != width:
                raise ValueError(f"model_type {model_type!r} has {embed_dim} channels, the encoder {width}.")
        sam_model.image_encoder = ImageEncoderViT3DWrapper(encoder, num_heads=num_heads, embed_dim=embed_dim)
        self.sam_model = sam_model
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            for parameter in self.sam_model.image_encoder.parameters():
                parameter.requires_grad = False

    def forward(self, batched_input: List[Dict[str, Any]], multimask_output: bool) -> List[Dict[str, torch.Tensor]]:
        """Predict class logits for every slice of the volumes.

        Args:
            batched_input: One dict per volume: ``image`` (3, D, H, W) in [0, 255] (all of the same shape) and
                ``original_size`` (H', W') to which the logits are resized.
            multimask_output: True: the ``n_classes`` masks of the multimask head; False: the single mask.

        Returns:
            One dict per volume: ``masks`` (1, C, D, H', W') logits, ``low_res_logits`` (1, C, D, 4 h, 4 w) for the
            embedding grid h x w, ``iou_predictions`` (D, C).
        """
        images = torch.stack([record["image"] for record in batched_input], dim=0)
        original_size = tuple(batched_input[0]["original_size"])
        if any(tuple(record["original_size"]) != original_size for record in batched_input):
            raise ValueError("All volumes of a batch need the same original_size.")
        if images.ndim != 5 or images.shape[1] != 3:
            raise ValueError(f"Expected volumes of shape (3, D, H, W), got {tuple(images.shape[1:])}.")
        batch, _, depth, height, width = images.shape
        slices = images.transpose(1, 2).reshape(batch * depth, 3, height, width)
        sam = self.sam_model
        embeddings = sam.image_encoder(sam.preprocess(slices), depth)
        sparse, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
        low_res, iou_predictions = sam.mask_decoder(
            image_embeddings=embeddings, image_pe=sam.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=multimask_output,
        )
        masks = sam.postprocess_masks(low_res, input_size=(height, width), original_size=original_size)

        def per_volume(t):  # (B * D, C, h, w) -> (B, C, D, h, w)
            return t.reshape(batch, depth, *t.shape[1:]).transpose(1, 2)

        masks, low_res = per_volume(masks), per_volume(low_res)
        iou_predictions = iou_predictions.reshape(batch, depth, -1)
        return [{"masks": m.unsqueeze(0), "iou_predictions": iou, "low_res_logits": low.unsqueeze(0)}
                for m, iou, low in zip(masks, iou_predictions, low_res)]


class ImageEncoderViT3DWrapper(nn.Module):
    """segment_anything's ViT encoder with every block wrapped in a :class:`NDBlockWrapper`.

    Args:
        image_encoder: The ViT image encoder (its blocks are replaced in place).
        num_heads: Attention heads of the encoder (kept for reference).
        embed_dim: Token channels of the encoder.
    """

    def __init__(self, image_encoder: nn.Module, num_heads: int = 12, embed_dim: int = 768):
        super().__init__()
        self.image_encoder = image_encoder
        self.img_size = image_encoder.img_size
        for i, block in enumerate(image_encoder.blocks):
            image_encoder.blocks[i] = NDBlockWrapper(block=block, num_heads=num_heads, dim=embed_dim)

    def forward(self, x: torch.Tensor, d_size: int) -> torch.Tensor:
        """Slices (B * D, 3, S, S) in depth order per volume -> embeddings (B * D, C_out, S / 16, S / 16)."""
        encoder = self.image_encoder
        x = encoder.patch_embed(x)
        if encoder.pos_embed is not None:
            x = x + encoder.pos_embed
        for block in encoder.blocks:
            x = block(x, d_size)
        return encoder.neck(x.permute(0, 3, 1, 2))


class NDBlockWrapper(nn.Module):
    """A ViT block with a depth adapter before its attention and one before its MLP.

    Each adapter computes ``x + up(gelu(conv3d(down(norm(x)))))``: ``down``/``up`` project the ``dim`` channels to
    ``adapter_channels`` and back, the convolution (kernel (3, 1, 1), zero padding) mixes each token with the same
    token of the neighbouring slices.

    Args:
        block: segment_anything's ViT block.
        dim: Its token channels.
        num_heads: Its attention heads (kept for reference).
        norm_layer: The adapters' norm.
        adapter_channels: The adapters' width.
    """

    def __init__(self, block: nn.Module, dim: int, num_heads: int, norm_layer: Type[nn.Module] = nn.LayerNorm,
                 adapter_channels: int = 384):
        super().__init__()
        self.block = block
        self.num_heads = num_heads
        self.adapter_channels = adapter_channels
        for suffix in ("", "_2"):
            setattr(self, f"adapter_linear_down{suffix}", nn.Linear(dim, adapter_channels, bias=False))
            setattr(self, f"adapter_linear_up{suffix}", nn.Linear(adapter_channels, dim, bias=False))
            setattr(self, f"adapter_conv{suffix}",
                    nn.Conv3d(adapter_channels, adapter_channels, kernel_size=(3, 1, 1), padding="same"))
            setattr(self, f"adapter_act{suffix}", nn.GELU())
            setattr(self, f"adapter_norm{suffix}", norm_layer(dim))

    def _adapter(self, x: torch.Tensor, d_size: int, suffix: str) -> torch.Tensor:
        n, h, w, _ = x.shape
        if n % d_size:
            raise ValueError(f"{n} slices are not a whole number of volumes of depth {d_size}.")
        y = getattr(self, f"adapter_linear_down{suffix}")(getattr(self, f"adapter_norm{suffix}")(x))
        y = y.reshape(n // d_size, d_size, h, w, self.adapter_channels).permute(0, 4, 1, 2, 3)
        y = getattr(self, f"adapter_conv{suffix}")(y)
        y = y.permute(0, 2, 3, 4, 1).reshape(n, h, w, self.adapter_channels)
        return x + getattr(self, f"adapter_linear_up{suffix}")(getattr(self, f"adapter_act{suffix}")(y))

    def forward(self, x: torch.Tensor, d_size: int) -> torch.Tensor:
        """Tokens (B * D, H, W, C) of B volumes of depth ``d_size`` -> (B * D, H, W, C)."""
        from segment_anything.modeling.image_encoder import window_partition, window_unpartition

        block = self.block
        x = self._adapter(x, d_size, "")
        shortcut, tokens = x, block.norm1(x)
        if block.window_size > 0:
            height, width = tokens.shape[1], tokens.shape[2]
            tokens, pad_hw = window_partition(tokens, block.window_size)
        tokens = block.attn(tokens)
        if block.window_size > 0:
            tokens = window_unpartition(tokens, block.window_size, pad_hw, (height, width))
        x = shortcut + tokens
        x = self._adapter(x, d_size, "_2")
        return x + block.mlp(block.norm2(x))


# Names micro_sam 1.8 exposes here (imported there from other modules), resolved on first use.
from .._lazy import lazy_attributes  # noqa: E402

__getattr__, __dir__ = lazy_attributes(globals(), {
    "LoRASurgery": "micro_sam.models.peft_sam:LoRASurgery",
    "Sam": "segment_anything.modeling:Sam",
    "get_sam_model": "micro_sam.util:get_sam_model",
    "window_partition": "segment_anything.modeling.image_encoder:window_partition",
    "window_unpartition": "segment_anything.modeling.image_encoder:window_unpartition",
})
