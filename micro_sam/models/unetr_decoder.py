"""The decoder half of torch_em's UNETR (micro_sam's AIS decoder), built without importing torch_em.

micro_sam's model files store the instance segmentation decoder as the parameters of torch_em's ``UNETR`` without
the encoder (``decoder_state``). Building that network with torch_em imports its package, which imports its
trainer, tensorboard, elf and scikit-learn: about 2 s of a command line run that inference does not use. The
modules here have the same structure, parameter names and computations (only the decoder; the image encoder is
SAM's, run separately), so a ``decoder_state`` loads into them strictly and gives the same maps
(``tests/models/test_unetr_decoder.py`` compares both). Class names are torch_em's, which
:mod:`micro_sam.models.lean_unetr` recognises.

Structure (no skip connections from the encoder, as micro_sam builds it; ``initial_features=64``, three levels):
the embeddings (``embed_dim`` channels) go through ``base`` and the ``decoder`` levels (512 -> 256 -> 128 -> 64
channels, each upsampled x2 and joined with the matching ``deconv1`` / ``deconv2`` / ``deconv3`` output);
``deconv_out`` upsamples the result once more, ``deconv4`` brings ``deconv3``'s output to the same size,
``decoder_head`` merges the two and ``out_conv`` maps to the output channels.
"""
from typing import List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNETRDecoder", "ConvBlock2d", "Upsampler2d", "SingleDeconv2DBlock", "SingleConv2DBlock",
           "Deconv2DBlock", "Decoder", "embed_dim_of", "uses_conv_transpose"]

FEATURES = (512, 256, 128, 64)


class ConvBlock2d(nn.Module):
    """Two 3x3 convolutions, each after an instance norm (no affine parameters) and followed by a ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.block = nn.Sequential(
            nn.InstanceNorm2d(in_channels), nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.InstanceNorm2d(out_channels), nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H, W)."""
        return self.block(x)


class Upsampler2d(nn.Module):
    """Bilinear upsampling by ``scale_factor``, then a 1x1 convolution."""

    def __init__(self, scale_factor: int, in_channels: int, out_channels: int, mode: str = "bilinear") -> None:
        super().__init__()
        self.scale_factor, self.mode = scale_factor, mode
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H * s, W * s)."""
        return self.conv(F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, align_corners=False))


class SingleDeconv2DBlock(nn.Module):
    """A 2x2 transposed convolution with stride 2 (x2 upsampling)."""

    def __init__(self, scale_factor: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, 2H, 2W)."""
        return self.block(x)


class SingleConv2DBlock(nn.Module):
    """A convolution that keeps the size (odd ``kernel_size``, zero padding)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.block = nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, padding=(kernel_size - 1) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H, W)."""
        return self.block(x)


def _upsampler(use_conv_transpose: bool, in_channels: int, out_channels: int) -> nn.Module:
    if use_conv_transpose:
        return SingleDeconv2DBlock(2, in_channels, out_channels)
    return Upsampler2d(2, in_channels, out_channels)


class Deconv2DBlock(nn.Module):
    """x2 upsampling, a 3x3 convolution, batch norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, use_conv_transpose: bool) -> None:
        super().__init__()
        self.block = nn.Sequential(
            _upsampler(use_conv_transpose, in_channels, out_channels), SingleConv2DBlock(out_channels, out_channels, 3),
            nn.BatchNorm2d(out_channels), nn.ReLU(True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, 2H, 2W)."""
        return self.block(x)


class Decoder(nn.Module):
    """The decoder levels: upsample, join with the level's input (centre-cropped to the same shape), convolve."""

    def __init__(self, features, use_conv_transpose: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ConvBlock2d(i, o) for i, o in zip(features[:-1], features[1:])])
        self.samplers = nn.ModuleList([_upsampler(use_conv_transpose, i, o)
                                       for i, o in zip(features[:-1], features[1:])])

    def _concat(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # The skip is centre-cropped to x's shape in every axis but the batch axis, the channel axis included
        # (the level's input has twice the channels of x; torch_em's decoder keeps the middle half).
        crop = tuple(slice((s - t) // 2, (s - t) // 2 + t) for s, t in zip(skip.shape[1:], x.shape[1:]))
        return torch.cat([x, skip[(slice(None),) + crop]], dim=1)

    def forward(self, x: torch.Tensor, encoder_inputs: List[torch.Tensor]) -> torch.Tensor:
        """Run the levels; ``encoder_inputs`` are the inputs joined at each level, coarse to fine."""
        if len(encoder_inputs) != len(self.blocks):
            raise ValueError(f"Expected {len(self.blocks)} level inputs, got {len(encoder_inputs)}.")
        for block, sampler, skip in zip(self.blocks, self.samplers, encoder_inputs):
            x = block(self._concat(sampler(x), skip))
        return x


class UNETRDecoder(nn.Module):
    """The decoder of micro_sam's UNETR (torch_em's ``UNETR`` without the encoder and skip connections).

    ``state_dict()`` has exactly the names of a micro_sam ``decoder_state``. Use it through
    :class:`micro_sam.instance_segmentation.DecoderAdapter`, which applies it to image embeddings.

    Args:
        embed_dim: Channels of the image embeddings (256 for SAM's encoders).
        encoder_img_size: The encoder's input size (1024 for SAM), to which the output maps are resized.
        out_channels: Number of output maps (3 for micro_sam: foreground, centre and boundary distances).
        use_conv_transpose: Upsample with transposed convolutions instead of bilinear interpolation + 1x1
            convolution (as the decoder was trained; see the ``decoder_state``'s parameter names).
        final_activation: Name of a ``torch.nn`` activation applied to the output, or None.
    """

    use_skip_connection = False

    def __init__(self, embed_dim: int = 256, encoder_img_size: int = 1024, out_channels: int = 3,
                 use_conv_transpose: bool = False, final_activation: Optional[str] = "Sigmoid") -> None:
        super().__init__()
        self.embed_dim, self.encoder_img_size, self.out_channels = embed_dim, encoder_img_size, out_channels
        f = FEATURES
        self.decoder = Decoder(f, use_conv_transpose)
        self.deconv1 = Deconv2DBlock(embed_dim, f[0], use_conv_transpose)
        self.deconv2 = Deconv2DBlock(f[0], f[1], use_conv_transpose)
        self.deconv3 = Deconv2DBlock(f[1], f[2], use_conv_transpose)
        self.deconv4 = Deconv2DBlock(f[2], f[3], use_conv_transpose)
        self.base = ConvBlock2d(embed_dim, f[0])
        self.out_conv = nn.Conv2d(f[-1], out_channels, 1)
        self.deconv_out = _upsampler(use_conv_transpose, f[-1], f[-1])
        self.decoder_head = ConvBlock2d(2 * f[-1], f[-1])
        if final_activation is None:
            self.final_activation = None
        else:
            activation = getattr(nn, final_activation, None)
            if activation is None:
                raise ValueError(f"Invalid final_activation {final_activation!r}: not a torch.nn module name.")
            self.final_activation = activation()

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, h, w) embeddings -> (B, out_channels, 16h, 16w) maps (before resizing and cropping)."""
        z9 = self.deconv1(embeddings)
        z6 = self.deconv2(z9)
        z3 = self.deconv3(z6)
        z0 = self.deconv4(z3)
        x = self.decoder(self.base(embeddings), encoder_inputs=[z9, z6, z3])
        x = self.out_conv(self.decoder_head(torch.cat([self.deconv_out(x), z0], dim=1)))
        return x if self.final_activation is None else self.final_activation(x)


def embed_dim_of(image_encoder: nn.Module) -> int:
    """The channels of a SAM image encoder's output (its neck's), as torch_em's UNETR determines them."""
    neck = getattr(image_encoder, "neck", None)
    if neck is not None and not hasattr(image_encoder, "embed_dim"):
        return int(neck[2].out_channels)
    if hasattr(image_encoder, "embed_dim"):
        return int(image_encoder.embed_dim)
    return int(image_encoder.patch_embed.proj.out_channels)


def uses_conv_transpose(decoder_state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a ``decoder_state`` was trained with transposed-convolution upsamplers (``...block.*`` names)."""
    return any(".block." in key for key in decoder_state if key.startswith("decoder.samplers"))
