"""SAM's image encoder per slice with a 3D convolutional decoder, for volumetric semantic segmentation.

:class:`SimpleSam3DWrapper` encodes each slice of a volume with SAM's image encoder (any encoder, vit_t
included), stacks the embeddings along depth and decodes them with four residual 3D convolution blocks, each
upsampling height and width by 2, and a segmentation head: (B, 3, D, S, S) volumes give (B, n_classes, D, S, S)
logits for an encoder input size S. Module and parameter names are micro_sam 1.8's.

As in micro_sam, the slices go into the encoder as they are: normalise them the way the encoder expects (e.g.
SAM's pixel mean and standard deviation) and give them the encoder's input size.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["BasicBlock", "SegmentationHead", "SimpleSam3DWrapper", "get_simple_sam_3d_model"]


def get_simple_sam_3d_model(
    device: Union[str, torch.device],
    n_classes: int,
    image_size: int,
    lora_rank: Optional[int] = None,
    freeze_encoder: bool = False,
    model_type: str = "vit_b",
    checkpoint_path: Optional[Union[str, os.PathLike]] = None,
) -> "SimpleSam3DWrapper":
    """Build a :class:`SimpleSam3DWrapper` around a SAM image encoder (weights that fit are loaded).

    Args:
        device: The device of the model.
        n_classes: Number of classes (including the background).
        image_size: Side of the square encoder input and of the output.
        lora_rank: If given, LoRA of this rank on the encoder's attention (the encoder is then not frozen).
        freeze_encoder: Freeze the image encoder (ignored with ``lora_rank``).
        model_type: The SAM to start from (any registered model, vit_t included).
        checkpoint_path: Weights to start from instead of the registered ones.

    Returns:
        The model on ``device``.
    """
    from ..util import get_sam_model

    peft_kwargs = {} if lora_rank is None else {"rank": lora_rank, "peft_module": "LoRASurgery"}
    _, sam = get_sam_model(
        model_type=model_type, device=device, checkpoint_path=checkpoint_path, return_sam=True,
        image_size=image_size, flexible_load_checkpoint=True, peft_kwargs=peft_kwargs,
    )
    model = SimpleSam3DWrapper(sam, num_classes=n_classes, freeze_encoder=freeze_encoder if lora_rank is None else False)
    return model.to(device)


class BasicBlock(nn.Module):
    """Residual 3D convolution block followed by upsampling of height and width by 2.

    ``up(leaky_relu(norm(conv(leaky_relu(norm(conv(x))))) + norm(conv1x1(x))))`` with instance norms.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Convolution kernel (depth, height, width).
        stride: Convolution stride.
        padding: Convolution padding.
        bias: Convolution biases.
        mode: Upsampling mode.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int] = (3, 3, 3),
                 stride: Sequence[int] = (1, 1, 1), padding: Sequence[int] = (1, 1, 1), bias: bool = True,
                 mode: str = "nearest"):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias),
            nn.InstanceNorm3d(out_channels), nn.LeakyReLU(),
        )
        self.conv2 = nn.Sequential(
            nn.Conv3d(out_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias),
            nn.InstanceNorm3d(out_channels),
        )
        self.downsample = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, kernel_size=1, stride=stride, padding=0, bias=bias),
            nn.InstanceNorm3d(out_channels),
        )
        self.leakyrelu = nn.LeakyReLU()
        self.up = nn.Upsample(scale_factor=(1, 2, 2), mode=mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> (B, C_out, D, 2 H, 2 W)."""
        out = self.conv2(self.conv1(x)) + self.downsample(x)
        return self.up(self.leakyrelu(out))


class SegmentationHead(nn.Sequential):
    """3D convolution + instance norm + leaky ReLU to half the channels, then a 1x1x1 convolution to the classes.

    Args:
        in_channels: Input channels.
        out_channels: Number of classes.
        kernel_size: Kernel of the first convolution.
        stride: Its stride.
        padding: Its padding.
        bias: Its bias.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int] = (3, 3, 3),
                 stride: Sequence[int] = (1, 1, 1), padding: Sequence[int] = (1, 1, 1), bias: bool = True):
        super().__init__()
        self.conv_pred = nn.Sequential(
            nn.Conv3d(in_channels, in_channels // 2, kernel_size, stride=stride, padding=padding, bias=bias),
            nn.InstanceNorm3d(in_channels // 2), nn.LeakyReLU(),
        )
        self.segmentation_head = nn.Conv3d(in_channels // 2, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, out_channels, D, H, W)."""
        return self.segmentation_head(self.conv_pred(x))


class SimpleSam3DWrapper(nn.Module):
    """SAM's image encoder on every slice, then a 3D convolutional decoder (see the module docstring).

    Args:
        sam: The SAM model (only its image encoder is used); its embeddings must have 256 channels.
        num_classes: Number of output classes.
        freeze_encoder: Freeze the image encoder (it then runs without gradients).

    Raises:
        ValueError: ``num_classes`` is not a positive integer.
    """

    def __init__(self, sam: nn.Module, num_classes: int, freeze_encoder: bool):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
        self.sam = sam
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            for parameter in self.sam.image_encoder.parameters():
                parameter.requires_grad = False
            self.no_grad = torch.no_grad
        else:
            self.no_grad = nullcontext
        self.decoders = nn.ModuleList([
            BasicBlock(256, 128), BasicBlock(128, 64), BasicBlock(64, 32), BasicBlock(32, 16),
        ])
        self.out_conv = SegmentationHead(in_channels=16, out_channels=num_classes)

    def _apply_image_encoder(self, x: torch.Tensor, D: int) -> torch.Tensor:
        """(B, 3, D, S, S) -> embeddings (B, 256, D, S / 16, S / 16), slice by slice."""
        return torch.stack([self.sam.image_encoder(x[:, :, d]) for d in range(D)], dim=2)

    def forward(self, batched_input: List[Dict[str, Any]], multimask_output: bool) -> List[Dict[str, torch.Tensor]]:
        """Predict class logits for volumes.

        Args:
            batched_input: One dict per volume with ``image`` (3, D, S, S), normalised for the encoder.
            multimask_output: Not used (accepted for the trainers' call).

        Returns:
            One dict per volume: ``masks`` (1, n_classes, D, S, S) logits.
        """
        x = torch.stack([record["image"] for record in batched_input], dim=0)
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"Expected volumes of shape (3, D, H, W), got {tuple(x.shape[1:])}.")
        with self.no_grad():
            out = self._apply_image_encoder(x, x.shape[2])
        for decoder in self.decoders:
            out = decoder(out)
        logits = self.out_conv(out)
        return [{"masks": mask.unsqueeze(0)} for mask in logits]


# Names micro_sam 1.8 exposes here (imported there from other modules), resolved on first use.
from .._lazy import lazy_attributes  # noqa: E402

__getattr__, __dir__ = lazy_attributes(globals(), {
    "LoRASurgery": "micro_sam.models.peft_sam:LoRASurgery",
    "get_sam_model": "micro_sam.util:get_sam_model",
})
