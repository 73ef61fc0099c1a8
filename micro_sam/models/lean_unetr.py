"""Inference for the decoder of torch_em's UNETR (micro_sam's AIS decoder) with less memory and arithmetic.

The decoder's last stages run at the encoder's input resolution (1024 x 1024 for SAM) with 64 to 128
channels, i.e. 256 to 512 MB per float32 tensor; the module keeps several of them alive at once (about 2.3 GB
above the resident memory for one 1024 x 1024 input). :func:`decode` computes the same function with the same
weights, but

- **1x1 convolutions before upsampling.** ``Upsampler2d`` is a bilinear resize followed by a 1x1
  convolution. Both are linear, the resize acts on pixels and the convolution on channels, and the resize
  weights sum to one (the bias passes through), so they commute: the convolution runs first, on a quarter
  of the pixels.
- **Normalisation and activations in place** on temporaries (instance norm, batch norm, ReLU, sigmoid).
- **No concatenation at full resolution.** Instance norm is per channel, so the norm of a concatenation is
  the concatenation of the norms, and a convolution of a concatenation is the sum of the convolutions of its
  parts with the matching slices of the weight. The full-resolution skip branch (``deconv4``) is computed
  only when it is needed, after the decoder, instead of being held from the start.
- **Full-resolution convolutions in chunks of rows** (3x3, zero padding: each chunk reads one extra row on
  either side), including the upsampling that feeds ``deconv4``'s convolution, so that at most two
  full-resolution tensors exist at once (normalisation statistics need whole tensors).

Results equal the module's up to float rounding (``tests/models/test_lean_unetr.py``). Layouts other than
torch_em's (other norms, transposed-convolution upsamplers, skip connections), gradients and forward hooks on its
layers use the module.
"""
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import has_forward_hooks, needs_autograd

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
    of torch_em's UNETR decoder with bilinear upsampling and instance norms that :func:`decode` handles (the
    full-resolution convolutions 3x3 with zero padding 1, as torch_em builds them, so that they can run in
    chunks of rows)."""
    decoder = getattr(adapter, "decoder", None)
    blocks, samplers = getattr(decoder, "blocks", None), getattr(decoder, "samplers", None)
    if blocks is None or samplers is None or len(blocks) != 3 or len(samplers) != 3 \
            or not callable(getattr(decoder, "_concat", None)):
        return False
    head = getattr(adapter, "decoder_head", None)
    out_conv, activation = getattr(adapter, "out_conv", None), getattr(adapter, "final_activation", None)
    deconvs = [getattr(adapter, f"deconv{i}", None) for i in range(1, 5)]
    return all(_deconv_block_ok(d) for d in deconvs) \
        and all(_conv_block_ok(b) for b in blocks) and all(_upsampler_ok(s) for s in samplers) \
        and _conv_block_ok(getattr(adapter, "base", None)) and _conv_block_ok(head) \
        and _upsampler_ok(getattr(adapter, "deconv_out", None)) and type(out_conv) is nn.Conv2d \
        and (activation is None or type(activation) is nn.Sigmoid) \
        and _row_conv_ok(head.block[1]) and _row_conv_ok(head.block[4]) \
        and _row_conv_ok(deconvs[3].block[1].block) and deconvs[3].block[0].scale_factor == 2


def _upsample(sampler, x: Tensor) -> Tensor:
    """``sampler(x)``: bilinear x2 and a 1x1 convolution, computed with the convolution first (a quarter of
    the pixels; the high-resolution tensor has the output channels only)."""
    return F.interpolate(sampler.conv(x), scale_factor=sampler.scale_factor, mode="bilinear", align_corners=False)


def _var_mean(x: Tensor, per_image: bool):
    """Biased variance and mean of x (B, C, H, W) over (H, W) for each image and channel (``per_image``) or over
    (B, H, W) for each channel, shaped to broadcast against x. Two passes (the mean, then the squared deviations
    in chunks of about 16 MB): at 64 x 1024 x 1024 about 4x faster than ``torch.var_mean`` on CPU."""
    b, c = x.shape[:2]
    flat = x.reshape(b * c, -1) if per_image or b == 1 else x.transpose(0, 1).reshape(c, -1)
    mean = flat.mean(-1, keepdim=True)
    var = torch.empty_like(mean)
    step = max(1, (1 << 22) // max(1, flat.shape[1]))
    for r0 in range(0, flat.shape[0], step):
        deviation = flat[r0:r0 + step] - mean[r0:r0 + step]
        var[r0:r0 + step] = deviation.mul_(deviation).mean(-1, keepdim=True)
    shape = (b, c, 1, 1) if per_image else (1, c, 1, 1)
    return var.view(shape), mean.view(shape)


def _instance_norm(x: Tensor, eps: float, inplace: bool) -> Tensor:
    """Instance norm without affine parameters over (H, W) of each (image, channel)."""
    var, mean = _var_mean(x, per_image=True)
    scale = torch.rsqrt(var + eps)
    return x.sub_(mean).mul_(scale) if inplace else (x - mean) * scale


def _batch_norm_(norm: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """``norm(x)`` in place: batch statistics (training mode or no running statistics) or the running ones."""
    if norm.training or norm.running_mean is None:
        var, mean = _var_mean(x, per_image=False)
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


# Output rows per chunk of the full-resolution convolutions (64 rows x 1024 x 64 channels: 16 MB).
_ROWS = 64


def _row_conv_ok(conv) -> bool:
    return type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.padding == (1, 1) \
        and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"


def _conv_rows(source: Callable[[int, int], Tensor], height: int, weight: Tensor, bias: Optional[Tensor],
               write: Callable[[int, int, Tensor], None], rows: int = _ROWS) -> None:
    """A 3x3 convolution with zero padding 1, computed for chunks of output rows.

    ``source(lo, hi)`` returns rows [lo, hi) of the (B, C, height, W) input; ``write(r0, r1, chunk)`` receives
    the output rows [r0, r1). Only one chunk of input and output exists at a time.
    """
    for r0 in range(0, height, rows):
        r1 = min(height, r0 + rows)
        part = source(max(r0 - 1, 0), min(r1 + 1, height))
        if r0 == 0 or r1 == height:  # the zero padding at the image's top / bottom edge
            part = F.pad(part, (0, 0, int(r0 == 0), int(r1 == height)))
        write(r0, r1, F.conv2d(part, weight, bias, padding=(0, 1)))


def _interp_rows(x: Tensor, r0: int, r1: int) -> Tensor:
    """Rows [r0, r1) of ``interpolate(x, scale_factor=2, mode="bilinear")``, from the input rows they use.

    Output row j samples input position (j + 0.5) / 2 - 0.5; the slice starts and ends at least one input row
    beyond those (or at the image edge, where the clamping is the same as for the whole image).
    """
    start, stop = max(0, r0 // 2 - 1), min(x.shape[2], r1 // 2 + 2)
    up = F.interpolate(x[:, :, start:stop], scale_factor=2, mode="bilinear", align_corners=False)
    return up[:, :, r0 - 2 * start:r1 - 2 * start]


def _deconv_block_rows(block, x: Tensor) -> Tensor:
    """``_deconv_block`` whose upsampled input is produced chunk by chunk and never held whole."""
    up, single, norm, _ = block.block
    low = up.conv(x)
    del x  # the caller handed it over
    conv = single.block
    b, _, h, w = low.shape
    out = low.new_empty((b, conv.out_channels, 2 * h, 2 * w))
    _conv_rows(lambda lo, hi: _interp_rows(low, lo, hi), 2 * h, conv.weight, conv.bias,
               lambda r0, r1, chunk: out[:, :, r0:r1].copy_(chunk))
    return _batch_norm_(norm, out).relu_()


def _rows_of(x: Tensor) -> Callable[[int, int], Tensor]:
    """A ``source`` for :func:`_conv_rows` reading rows of ``x`` (only the returned function holds ``x``)."""
    return lambda lo, hi: x[:, :, lo:hi]


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
        skips, last = [z9, z6, z3], [z3]  # last: deconv4's input, handed over so the tail can free it
        del z9, z6, z3
        x = _conv_block(adapter.base, embeddings, inplace=False)
        for block, sampler in zip(adapter.decoder.blocks, adapter.decoder.samplers):
            x = _upsample(sampler, x)
            # torch_em's concatenation centre-crops the skip to x's shape, the channel axis included.
            x = _conv_block(block, adapter.decoder._concat(x, skips.pop(0)), inplace=True)
        handed_over = [x]
        del x  # only the list holds it now, so that the tail frees it after its first use
        return _tail(adapter, handed_over, last)


def _tail(adapter, x: List[Tensor], z3: List[Tensor]) -> Tensor:
    """decoder_head(cat(deconv_out(x), deconv4(z3))), out_conv and the activation, one branch at a time and the
    full-resolution convolutions in chunks of rows: at most two full-resolution tensors (the head's output and
    one branch) exist at a time. ``x`` and ``z3`` are one-element lists, emptied here so that the tensors are
    freed once used."""
    n1, c1, _, n2, c2, _ = adapter.decoder_head.block
    split = adapter.deconv_out.conv.out_channels
    branch = _instance_norm(_upsample(adapter.deconv_out, x.pop()), n1.eps, True)
    b, _, h, w = branch.shape
    out = branch.new_empty((b, c1.out_channels, h, w))
    _conv_rows(_rows_of(branch), h, c1.weight[:, :split], c1.bias,
               lambda r0, r1, chunk: out[:, :, r0:r1].copy_(chunk))
    del branch
    branch = _instance_norm(_deconv_block_rows(adapter.deconv4, z3.pop()), n1.eps, True)
    _conv_rows(_rows_of(branch), h, c1.weight[:, split:], None, lambda r0, r1, chunk: out[:, :, r0:r1].add_(chunk))
    del branch
    out = _instance_norm(out.relu_(), n2.eps, True)
    result = out.new_empty((b, adapter.out_conv.out_channels, h, w))

    def finish(r0, r1, chunk):
        maps = adapter.out_conv(chunk.relu_())
        result[:, :, r0:r1] = maps if adapter.final_activation is None else maps.sigmoid_()

    _conv_rows(_rows_of(out), h, c2.weight, c2.bias, finish)
    return result


def maybe_decode(adapter: nn.Module, embeddings: Tensor) -> Optional[Tensor]:
    """:func:`decode` when it applies (no gradients needed, supported layout, no forward hooks on the layers it
    would bypass), else None."""
    if needs_autograd(adapter, embeddings) or not supports_lean_decoding(adapter) \
            or has_forward_hooks(*adapter.modules()):
        return None
    return decode(adapter, embeddings)
