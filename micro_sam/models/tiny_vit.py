"""TinyViT image encoder, the ``vit_t`` backbone of MobileSAM.

The module tree reproduces the parameter names and shapes of MobileSAM's encoder, so its checkpoints
(and the ``vit_t*`` checkpoints of micro-sam) load with ``load_state_dict(strict=True)``. The forward
pass is written for speed on CPU:

* token tensors ``(B, H*W, C)`` are handed to the convolutions as channels-last ``(B, C, H, W)`` views,
  so switching between the attention and the convolution layout copies nothing;
* in eval mode each convolution + BatchNorm pair runs as one convolution with folded weights, and the
  attention bias table is expanded once; both are cached until a parameter changes;
* attention uses :func:`torch.nn.functional.scaled_dot_product_attention`;
* without autograd, activations and residual sums are computed in place on temporaries (large fresh
  allocations cost more than the element-wise work on CPU).

See :mod:`micro_sam.models.attention` for these layers. Training works as usual (BatchNorm uses batch
statistics and everything is differentiable). The eval-mode output equals MobileSAM's up to float32
rounding (about 1e-5).
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import _segment_anything  # noqa: F401  (imports segment_anything without torchvision)
from segment_anything.modeling.common import LayerNorm2d

from .attention import Attention, Conv2d_BN, drop_path_module, gelu_on_temporary, residual_add

__all__ = ["TinyViT", "Conv2d_BN", "MBConv", "PatchMerging", "TinyViTBlock"]


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 convolutions: ``(B, in_chans, H, W) -> (B, embed_dim, H/4, W/4)``."""

    def __init__(self, in_chans: int, embed_dim: int, resolution: int) -> None:
        super().__init__()
        self.patches_resolution = (resolution // 4, resolution // 4)
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.seq = nn.Sequential(
            Conv2d_BN(in_chans, embed_dim // 2, 3, 2, 1), nn.GELU(), Conv2d_BN(embed_dim // 2, embed_dim, 3, 2, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq[2](gelu_on_temporary(self.seq[1], self.seq[0](x)))


class MBConv(nn.Module):
    """Inverted residual block (1x1 expand, 3x3 depthwise, 1x1 project) on ``(B, C, H, W)`` maps."""

    def __init__(self, in_chans: int, out_chans: int, expand_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = int(in_chans * expand_ratio)
        self.in_chans, self.hidden_chans, self.out_chans = in_chans, hidden, out_chans
        self.conv1 = Conv2d_BN(in_chans, hidden)
        self.act1 = nn.GELU()
        self.conv2 = Conv2d_BN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2d_BN(hidden, out_chans, bn_weight_init=0.0)
        self.act3 = nn.GELU()
        self.drop_path = drop_path_module(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = gelu_on_temporary(self.act1, self.conv1(x))
        y = self.conv3(gelu_on_temporary(self.act2, self.conv2(y)))
        y = self.drop_path(y)
        y += x  # y is a fresh tensor; conv backward does not need its own output
        return gelu_on_temporary(self.act3, y)


class PatchMerging(nn.Module):
    """Downsampling between stages: ``(B, H*W, dim)`` tokens (or a ``(B, dim, H, W)`` map) to
    ``(B, H'*W', out_dim)`` tokens with ``H' = ceil(H / stride)``."""

    def __init__(self, input_resolution: Tuple[int, int], dim: int, out_dim: int, stride: int = 2) -> None:
        super().__init__()
        self.input_resolution, self.dim, self.out_dim, self.stride = tuple(input_resolution), dim, out_dim, stride
        self.act = nn.GELU()
        self.conv1 = Conv2d_BN(dim, out_dim, 1, 1, 0)
        self.conv2 = Conv2d_BN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2d_BN(out_dim, out_dim, 1, 1, 0)

    @property
    def output_resolution(self) -> Tuple[int, int]:
        return tuple((r - 1) // self.stride + 1 for r in self.input_resolution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)  # channels-last view, no copy
        x = gelu_on_temporary(self.act, self.conv1(x))
        x = self.conv3(gelu_on_temporary(self.act, self.conv2(x)))
        # For a channels-last result this is a view of contiguous (B, H'*W', C) tokens.
        return x.flatten(2).transpose(1, 2)


class ConvLayer(nn.Module):
    """First stage: ``depth`` MBConv blocks on ``(B, C, H, W)`` maps, then optional downsampling."""

    def __init__(
        self,
        dim: int,
        input_resolution: Tuple[int, int],
        depth: int,
        drop_path: Sequence[float],
        downsample: Optional[PatchMerging] = None,
        conv_expand_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.dim, self.input_resolution, self.depth = dim, tuple(input_resolution), depth
        self.blocks = nn.ModuleList([MBConv(dim, dim, conv_expand_ratio, drop_path[i]) for i in range(depth)])
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class Mlp(nn.Module):
    """Pre-norm two-layer perceptron on tokens ``(..., C)``."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(gelu_on_temporary(self.act, self.fc1(self.norm(x))))))


class TinyViTBlock(nn.Module):
    """Window attention, depthwise convolution and MLP on ``(B, H*W, C)`` tokens (row-major positions).

    The map is zero-padded at the bottom/right to a multiple of ``window_size``; padded tokens take part in
    the attention of their window (as in the original model) and are dropped afterwards.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: Tuple[int, int],
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        local_conv_size: int = 3,
    ) -> None:
        super().__init__()
        if window_size <= 0 or dim % num_heads != 0:
            raise ValueError(f"Invalid window_size={window_size} or dim={dim} not divisible by {num_heads} heads.")
        self.dim, self.input_resolution, self.num_heads = dim, tuple(input_resolution), num_heads
        self.window_size, self.mlp_ratio = window_size, mlp_ratio
        self.drop_path = drop_path_module(drop_path)
        self.attn = Attention(dim, dim // num_heads, num_heads, attn_ratio=1, resolution=(window_size, window_size))
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.local_conv = Conv2d_BN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_resolution
        b, n, c = x.shape
        ws = self.window_size
        if h == ws and w == ws:
            return self.attn(x)
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        x = x.view(b, h, w, c)
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = self.attn(x)
        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, nh * ws, nw * ws, c)
        if pad_b or pad_r:
            x = x[:, :h, :w]
        return x.reshape(b, n, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: ``(B, H*W, C)``. Returns: ``(B, H*W, C)``."""
        h, w = self.input_resolution
        b, n, c = x.shape
        if n != h * w:
            raise ValueError(f"Expected {h * w} tokens for resolution {(h, w)}, got {n}.")
        x = residual_add(self.drop_path(self._window_attention(x)), x)
        # The local convolution reads the tokens as a channels-last (B, C, H, W) view.
        x = self.local_conv(x.view(b, h, w, c).permute(0, 3, 1, 2))
        x = x.permute(0, 2, 3, 1).reshape(b, n, c)
        return residual_add(self.drop_path(self.mlp(x)), x)


class BasicLayer(nn.Module):
    """A transformer stage: ``depth`` TinyViT blocks, then optional downsampling."""

    def __init__(
        self,
        dim: int,
        input_resolution: Tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        drop_path: Sequence[float],
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        local_conv_size: int = 3,
        downsample: Optional[PatchMerging] = None,
    ) -> None:
        super().__init__()
        self.dim, self.input_resolution, self.depth = dim, tuple(input_resolution), depth
        self.blocks = nn.ModuleList([
            TinyViTBlock(dim, input_resolution, num_heads, window_size, mlp_ratio, drop, drop_path[i], local_conv_size)
            for i in range(depth)
        ])
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """TinyViT encoder with the SAM neck: ``(B, in_chans, img_size, img_size) -> (B, 256, H', W')``.

    With the ``vit_t`` settings (``img_size=1024``) the output is ``(B, 256, 64, 64)``. The classification
    ``norm_head``/``head`` exist only so that checkpoints load strictly; ``forward`` does not use them.
    The downsampling into the last stage keeps the resolution (stride 1), as in MobileSAM.

    Args:
        img_size: Side length of the square input.
        in_chans: Input channels.
        num_classes: Outputs of the unused classification head (0 for none).
        embed_dims: Channels of the four stages.
        depths: Blocks per stage.
        num_heads: Attention heads per stage (the first, convolutional stage ignores it).
        window_sizes: Attention window side per stage.
        mlp_ratio: MLP hidden channels as a multiple of the stage channels.
        drop_rate: Dropout in the MLPs.
        drop_path_rate: Largest stochastic depth rate (linearly increasing over all blocks).
        use_checkpoint: Accepted for compatibility; gradient checkpointing is not used.
        mbconv_expand_ratio: Expansion of the MBConv blocks.
        local_conv_size: Kernel of the depthwise convolution in the transformer blocks.
        layer_lr_decay: Accepted for compatibility; per-layer learning rates are not set.
    """

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        use_checkpoint: bool = False,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        layer_lr_decay: float = 1.0,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.num_classes = num_classes
        self.depths = list(depths)
        self.num_layers = len(depths)
        self.mlp_ratio = mlp_ratio
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], img_size)
        self.patches_resolution = self.patch_embed.patches_resolution
        total = sum(depths)
        dpr: List[float] = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]

        self.layers = nn.ModuleList()
        resolution = self.patches_resolution
        for i, depth in enumerate(depths):
            rates = dpr[sum(depths[:i]):sum(depths[:i + 1])]
            downsample = None
            if i < self.num_layers - 1:
                stride = 1 if i == self.num_layers - 2 else 2
                downsample = PatchMerging(resolution, embed_dims[i], embed_dims[i + 1], stride)
            if i == 0:
                layer = ConvLayer(embed_dims[0], resolution, depth, rates, downsample, mbconv_expand_ratio)
            else:
                layer = BasicLayer(
                    embed_dims[i], resolution, depth, num_heads[i], window_sizes[i], rates,
                    mlp_ratio, drop_rate, local_conv_size, downsample,
                )
            self.layers.append(layer)
            if downsample is not None:
                resolution = downsample.output_resolution
        self.output_resolution = resolution

        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], 256, kernel_size=1, bias=False),
            LayerNorm2d(256),
            nn.Conv2d(256, 256, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(256),
        )

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        """Parameter name parts to exclude from weight decay (the attention biases, as in MobileSAM)."""
        return {"attention_biases"}

    @property
    def stages(self) -> List[nn.Module]:
        """The stages in the order they run: the patch embedding, then the four layers (the neck follows)."""
        return [self.patch_embed, *self.layers]

    def forward_stages(self, x: torch.Tensor, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Run the stages ``start`` to ``stop - 1`` of :attr:`stages`; ``stop=None`` runs the rest and the neck.

        ``forward_stages(forward_stages(x, 0, k), k)`` equals ``forward_features(x)``; training can thus keep the
        output of frozen leading stages and run only the trainable rest.

        Args:
            x: The images ``(B, in_chans, img_size, img_size)`` for ``start=0``, else the output of stage
                ``start - 1``: ``(B, C, H, W)`` after the patch embedding, ``(B, H * W, C)`` tokens after a layer.
            start: The first stage to run.
            stop: One past the last stage to run; None: all remaining stages and the neck.

        Returns:
            The output of stage ``stop - 1``, or the ``(B, 256, H', W')`` embeddings when ``stop`` is None.
        """
        n_stages = len(self.stages)
        last = n_stages if stop is None else stop
        if not 0 <= start <= last <= n_stages:
            raise ValueError(f"Invalid stage range start={start}, stop={stop}: the encoder has {n_stages} stages.")
        if start == 0:
            if x.ndim != 4 or tuple(x.shape[-2:]) != (self.img_size, self.img_size):
                raise ValueError(
                    f"Expected input of shape (B, C, {self.img_size}, {self.img_size}), got {tuple(x.shape)}."
                )
            x = x.contiguous(memory_format=torch.channels_last)
        for stage in self.stages[start:last]:
            x = stage(x)
        if stop is not None:
            return x
        h, w = self.output_resolution
        # The neck runs on a contiguous (NCHW) map: the final convolutions then accumulate like MobileSAM's,
        # which keeps the result within float32 noise of it (channels-last convolutions round differently).
        x = x.reshape(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2).contiguous()
        return self.neck(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images ``(B, in_chans, img_size, img_size)`` into ``(B, 256, H', W')`` embeddings."""
        return self.forward_stages(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`forward_features`."""
        return self.forward_features(x)
