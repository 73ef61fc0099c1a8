"""Inference for the decoder of torch_em's UNETR (micro_sam's AIS decoder) with less memory and arithmetic.

The decoder's last stages run at the encoder's input resolution (1024 x 1024 for SAM) with 64 to 128
channels, i.e. 256 to 512 MB per float32 tensor; the module keeps several of them alive at once (about 2.3 GB
above the resident memory for one 1024 x 1024 input). :func:`decode` computes the same function with the same
weights, but

- **1x1 convolutions before upsampling.** ``Upsampler2d`` is a bilinear resize followed by a 1x1
  convolution. Both are linear, the resize acts on pixels and the convolution on channels, and the resize
  weights sum to one (the bias passes through), so they commute: when the convolution reduces the channels it
  runs first, at a quarter of the pixels.
- **Normalisation and activations in place** on temporaries (instance norm, batch norm, ReLU, sigmoid).
- **No concatenation at full resolution.** Instance norm is per channel, so the norm of a concatenation is
  the concatenation of the norms, and a convolution of a concatenation is the sum of the convolutions of its
  parts with the matching slices of the weight. The full-resolution skip branch (``deconv4``) is computed
  only when it is needed, after the decoder, instead of being held from the start.

Results equal the module's up to float rounding (``tests/models/test_lean_unetr.py``). Layouts other than
torch_em's (other norms, transposed-convolution upsamplers, skip connections) and gradients use the module.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["decode", "maybe_decode", "supports_lean_decoding"]

Tensor = torch.Tensor


def _is(module, name: str) -> bool:
    return type(module).__name__ == name


def _plain_instance_norm(module) -> bool:
    return type(module) is nn.InstanceNorm2d and not module.affine and not module.track_running_stats


def _conv_block_ok(block) -> bool:
    layers = getattr(block, "block", None)
    if not _is(block, "ConvBlock2d") or not isinstance(layers, nn.Sequential) or len(layers) != 6:
        return False
    n1, c1, r1, n2, c2, r2 = layers
    return _plain_instance_norm(n1) and _plain_instance_norm(n2) and type(c1) is nn.Conv2d \
        and type(c2) is nn.Conv2d and c1.padding_mode == "zeros" and c1.groups == 1 \
        and type(r1) is nn.ReLU and type(r2) is nn.ReLU


def _upsampler_ok(sampler) -> bool:
    conv = getattr(sampler, "conv", None)
    return _is(sampler, "Upsampler2d") and getattr(sampler, "mode", None) == "bilinear" \
        and type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.groups == 1 \
        and conv.stride == (1, 1) and conv.padding == (0, 0)


def _deconv_block_ok(block) -> bool:
    layers = getattr(block, "block", None)
    if not _is(block, "Deconv2DBlock") or not isinstance(layers, nn.Sequential) or len(layers) != 4:
        return False
    up, single, norm, relu = layers
    return _upsampler_ok(up) and _is(single, "SingleConv2DBlock") and type(single.block) is nn.Conv2d \
        and type(norm) is nn.BatchNorm2d and type(relu) is nn.ReLU


def supports_lean_decoding(adapter: nn.Module) -> bool:
    """Whether ``adapter`` (a :class:`~micro_sam.instance_segmentation.decoder.DecoderAdapter`) has the layout
    of torch_em's UNETR decoder with bilinear upsampling and instance norms that :func:`decode` handles."""
    decoder = getattr(adapter, "decoder", None)
    blocks, samplers = getattr(decoder, "blocks", None), getattr(decoder, "samplers", None)
    if blocks is None or samplers is None or len(blocks) != 3 or len(samplers) != 3 \
            or not callable(getattr(decoder, "_concat", None)):
        return False
    head = getattr(adapter, "decoder_head", None)
    out_conv, activation = getattr(adapter, "out_conv", None), getattr(adapter, "final_activation", None)
    return all(_deconv_block_ok(getattr(adapter, f"deconv{i}", None)) for i in range(1, 5)) \
        and all(_conv_block_ok(b) for b in blocks) and all(_upsampler_ok(s) for s in samplers) \
        and _conv_block_ok(getattr(adapter, "base", None)) and _conv_block_ok(head) \
        and _upsampler_ok(getattr(adapter, "deconv_out", None)) and type(out_conv) is nn.Conv2d \
        and (activation is None or type(activation) is nn.Sigmoid)


def _upsample(sampler, x: Tensor) -> Tensor:
    """``sampler(x)``: bilinear x2 and a 1x1 convolution, the convolution first when it reduces channels."""
    conv = sampler.conv
    if conv.out_channels < conv.in_channels:
        return F.interpolate(conv(x), scale_factor=sampler.scale_factor, mode="bilinear", align_corners=False)
    return conv(F.interpolate(x, scale_factor=sampler.scale_factor, mode="bilinear", align_corners=False))


def _instance_norm(x: Tensor, eps: float, inplace: bool) -> Tensor:
    """Instance norm without affine parameters over (H, W) of each (image, channel)."""
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, unbiased=False)
    scale = torch.rsqrt(var + eps)
    return x.sub_(mean).mul_(scale) if inplace else (x - mean) * scale


def _batch_norm_(norm: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """``norm(x)`` in place: batch statistics (training mode or no running statistics) or the running ones."""
    if norm.training or norm.running_mean is None:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), keepdim=True, unbiased=False)
    else:
        var, mean = norm.running_var.view(1, -1, 1, 1), norm.running_mean.view(1, -1, 1, 1)
    scale = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.view(1, -1, 1, 1)
    x.sub_(mean).mul_(scale)
    return x if norm.bias is None else x.add_(norm.bias.view(1, -1, 1, 1))


def _deconv_block(block, x: Tensor) -> Tensor:
    up, single, norm, _ = block.block
    x = single.block(_upsample(up, x))
    return _batch_norm_(norm, x).relu_()


def _conv_block(block, x: Tensor, inplace: bool) -> Tensor:
    """A ConvBlock2d (norm, conv, ReLU, norm, conv, ReLU); ``inplace``: ``x`` is a temporary."""
    n1, c1, _, n2, c2, _ = block.block
    x = c1(_instance_norm(x, n1.eps, inplace)).relu_()
    return c2(_instance_norm(x, n2.eps, True)).relu_()


def decode(adapter: nn.Module, embeddings: Tensor) -> Tensor:
    """``adapter._decode(embeddings)`` (the UNETR decoder on image embeddings) with less memory, no gradients.

    Args:
        adapter: A decoder for which :func:`supports_lean_decoding` is true.
        embeddings: (B, C, h, w) image embeddings.

    Returns:
        (B, out_channels, 16 h, 16 w) maps, equal to the module's up to float rounding.
    """
    with torch.no_grad():
        z9 = _deconv_block(adapter.deconv1, embeddings)
        z6 = _deconv_block(adapter.deconv2, z9)
        z3 = _deconv_block(adapter.deconv3, z6)
        skips = [z9, z6, z3]
        del z9, z6
        x = _conv_block(adapter.base, embeddings, inplace=False)
        for block, sampler in zip(adapter.decoder.blocks, adapter.decoder.samplers):
            x = _upsample(sampler, x)
            # torch_em's concatenation centre-crops the skip to x's shape, the channel axis included.
            x = _conv_block(block, adapter.decoder._concat(x, skips.pop(0)), inplace=True)
        # decoder_head(cat(deconv_out(x), deconv4(z3))) without the concatenation, one branch at a time.
        n1, c1, _, n2, c2, _ = adapter.decoder_head.block
        split = adapter.deconv_out.conv.out_channels
        out = F.conv2d(_instance_norm(_upsample(adapter.deconv_out, x), n1.eps, True), c1.weight[:, :split],
                       c1.bias, c1.stride, c1.padding, c1.dilation)
        del x
        skip = _instance_norm(_deconv_block(adapter.deconv4, z3), n1.eps, True)
        del z3
        out.add_(F.conv2d(skip, c1.weight[:, split:], None, c1.stride, c1.padding, c1.dilation))
        del skip
        out = c2(_instance_norm(out.relu_(), n2.eps, True)).relu_()
        out = adapter.out_conv(out)
        return out if adapter.final_activation is None else out.sigmoid_()


def maybe_decode(adapter: nn.Module, embeddings: Tensor) -> Optional[Tensor]:
    """:func:`decode` when it applies (no gradients needed, supported layout), else None."""
    needs_grad = torch.is_grad_enabled() and (
        embeddings.requires_grad or any(p.requires_grad for p in adapter.parameters())
    )
    if needs_grad or not supports_lean_decoding(adapter):
        return None
    return decode(adapter, embeddings)
