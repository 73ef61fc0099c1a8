"""A faster inference pass for SAM's mask decoder, with the decoder's own weights.

segment_anything's ``MaskDecoder`` copies the image embedding once per prompt and runs every projection of the
two-way transformer on all ``N = h * w`` image positions of every copy (about 1.7 GMAC per prompt at
``64 x 64``). :func:`decode_masks` computes the same function with less arithmetic:

- **Prompt-independent work is done once.** Without mask prompts the image side of the first transformer block
  (``image_embeddings + no_mask_embed``, its keys, values and the queries of the image-to-token attention) is
  the same for every prompt. It is computed once per batch and kept until the embeddings, the positional
  encoding or the weights change (compared by value, so a new image is never served stale projections).
- **Projections are folded into the small side.** Attention between ``T`` prompt tokens (about 7) and ``N``
  image positions only needs the image features through products with ``T`` vectors per head, so
  ``softmax(q W_k x^T)`` is computed as ``softmax((q W_k) x^T)`` and ``softmax(.) (x W_v^T)`` as
  ``(softmax(.) x) W_v^T`` (the key bias shifts every score of a row equally and drops out of the softmax;
  value-bias passes through because attention weights sum to one). In the image-to-token direction, the query
  projection and the output projection are folded the same way into ``(C, heads * T)`` matrices.
- **Transposed convolutions are matrix products.** A 2x2 transposed convolution with stride 2 is one matmul
  per pixel; the upscaled features stay in that blocked layout (normalisation and activation are per pixel)
  and only the final masks (``M`` channels instead of 32) are rearranged into image order.

The results equal the original up to float rounding (``tests/models/test_fast_mask_decoder.py`` compares
logits and IoU predictions, and under autograd the gradients). Training uses it too: without the cache, with
out-of-place operations where autograd needs the inputs. Anything the fast path does not recognise (other
layer types, e.g. LoRA wrappers, batched image embeddings, or forward hooks on the decoder's layers) runs the
module's own ``forward``.
"""
import functools
import math
import weakref
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import gelu_on_temporary, has_forward_hooks, needs_autograd

__all__ = ["decode_masks", "decode_prompts", "dense_pe", "predict_torch", "supports_fast_decoding", "upscale_masks"]

Tensor = torch.Tensor

# Per decoder: (key, value) of the prompt-independent tensors of the first transformer block.
_FIRST_BLOCK_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
# Per prompt encoder: (key, dense positional encoding).
_DENSE_PE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def dense_pe(prompt_encoder: nn.Module) -> Tensor:
    """``prompt_encoder.get_dense_pe()`` (1, C, h, w), kept until its Gaussian matrix or grid size changes."""
    matrix = getattr(getattr(prompt_encoder, "pe_layer", None), "positional_encoding_gaussian_matrix", None)
    if matrix is None:
        return prompt_encoder.get_dense_pe()
    key = (matrix.data_ptr(), _version(matrix), matrix.device, matrix.dtype,
           tuple(prompt_encoder.image_embedding_size))
    cached = _DENSE_PE.get(prompt_encoder)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, prompt_encoder.get_dense_pe())
        _DENSE_PE[prompt_encoder] = cached
    return cached[1]


def _is_linear(module) -> bool:
    return type(module) is nn.Linear


def _attention_ok(attn) -> bool:
    return all(_is_linear(getattr(attn, name, None)) for name in ("q_proj", "k_proj", "v_proj", "out_proj")) \
        and isinstance(getattr(attn, "num_heads", None), int)


def supports_fast_decoding(decoder: nn.Module) -> bool:
    """Whether ``decoder`` has the layout of segment_anything's ``MaskDecoder`` that :func:`decode_masks` needs."""
    transformer = getattr(decoder, "transformer", None)
    layers = getattr(transformer, "layers", None)
    upscaling = getattr(decoder, "output_upscaling", None)
    if layers is None or not isinstance(upscaling, nn.Sequential) or len(upscaling) != 5:
        return False
    conv1, norm, _, conv2, _ = upscaling
    for conv in (conv1, conv2):
        if type(conv) is not nn.ConvTranspose2d or conv.kernel_size != (2, 2) or conv.stride != (2, 2) \
                or conv.padding != (0, 0) or conv.output_padding != (0, 0) or conv.groups != 1 \
                or conv.dilation != (1, 1):
            return False
    if type(norm).__name__ != "LayerNorm2d" or not hasattr(norm, "eps"):
        return False
    blocks_ok = all(
        _attention_ok(layer.self_attn) and _attention_ok(layer.cross_attn_token_to_image)
        and _attention_ok(layer.cross_attn_image_to_token) for layer in layers
    )
    return blocks_ok and _attention_ok(transformer.final_attn_token_to_image)


# --- attention between prompt tokens (few) and image positions (many) ----------------------------------
def _heads(x: Tensor, n_heads: int) -> Tensor:
    """(..., n, heads * d) -> (..., heads, n, d)."""
    *lead, n, c = x.shape
    return x.reshape(*lead, n, n_heads, c // n_heads).transpose(-3, -2)


def _merge_heads(x: Tensor) -> Tensor:
    """(..., heads, n, d) -> (..., n, heads * d)."""
    *lead, h, n, d = x.shape
    return x.transpose(-3, -2).reshape(*lead, n, h * d)


def _token_to_image(attn, tokens: Tensor, keys: Optional[Tensor], values: Optional[Tensor],
                    projected: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """``attn(q=tokens, k=keys, v=values)`` for tokens (B, T, C) and image tensors (B, N, C).

    ``projected``: the keys and values already projected, ``(k_proj(keys), v_proj(values))`` of shape (N, Ci),
    shared by the whole batch.
    """
    n_heads = attn.num_heads
    q = _heads(attn.q_proj(tokens), n_heads)  # (B, H, T, d)
    b, h, t, d = q.shape
    scale = 1.0 / math.sqrt(d)
    if projected is not None:
        k, v = (_heads(p, n_heads) for p in projected)  # (H, N, d)
        per_head = q.transpose(0, 1).reshape(h, b * t, d) * scale  # heads as the batch: k, v not copied per prompt
        weights = torch.softmax(per_head @ k.transpose(-1, -2), dim=-1)  # (H, B*T, N)
        out = (weights @ v).reshape(h, b, t, d).transpose(0, 1)  # (B, H, T, d)
        return attn.out_proj(_merge_heads(out))
    w_k = attn.k_proj.weight.reshape(h, d, -1)  # (H, d, C)
    # (B, H*T, C), scaled here rather than the (B, H*T, N) scores; the key bias cancels in the softmax
    q_folded = (q @ w_k).reshape(b, h * t, -1).mul_(scale)
    weights = torch.softmax(q_folded @ keys.transpose(-1, -2), dim=-1)  # (B, H*T, N)
    context = (weights @ values).reshape(b, h, t, -1)  # (B, H, T, C)
    w_v = attn.v_proj.weight.reshape(h, d, -1)  # (H, d, C)
    out = context @ w_v.transpose(-1, -2) + attn.v_proj.bias.reshape(h, 1, d)  # (B, H, T, d)
    if attn.k_proj.bias is not None and attn.k_proj.bias.requires_grad and torch.is_grad_enabled():
        out = out + 0.0 * attn.k_proj.bias.sum()  # its gradient is zero, as in the module, not None
    return attn.out_proj(_merge_heads(out))


def _softmax_small(x: Tensor) -> Tensor:
    """Softmax over a short last dimension (a few tokens), in place; faster than ``torch.softmax`` there.
    Out of place (``torch.softmax``) when autograd tracks ``x``."""
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.softmax(x, dim=-1)
    x = x.sub_(x.amax(dim=-1, keepdim=True)).exp_()
    return x.div_(x.sum(dim=-1, keepdim=True))


def _image_to_token(attn, image: Optional[Tensor], tokens_k: Tensor, tokens_v: Tensor,
                    projected_queries: Optional[Tensor] = None) -> Tensor:
    """``attn(q=image, k=tokens_k, v=tokens_v)`` for image (B, N, C) and tokens (B, T, C); returns (B, N, C).

    ``projected_queries``: ``q_proj(image)`` of shape (N, Ci), shared by the whole batch.
    """
    n_heads = attn.num_heads
    k = _heads(attn.k_proj(tokens_k), n_heads)  # (B, H, T, d)
    v = _heads(attn.v_proj(tokens_v), n_heads)
    b, h, t, d = k.shape
    k = k * (1.0 / math.sqrt(d))  # the softmax scale, applied to the T keys instead of the N x T scores
    if projected_queries is not None:
        # Block-diagonal keys: column (head, token) holds that token's key in the rows of its head.
        keys = k.new_zeros(b, h, d, h, t)
        keys.diagonal(dim1=1, dim2=3).copy_(k.permute(0, 3, 2, 1))  # [b, j, t, head] <- k[b, head, t, j]
        scores = projected_queries @ keys.reshape(b, h * d, h * t)  # (B, N, H*T)
    else:
        w_q = attn.q_proj.weight.reshape(h, d, -1)  # (H, d, C)
        folded = (w_q.transpose(-1, -2) @ k.transpose(-1, -2))  # (B, H, C, T)
        folded = folded.permute(0, 2, 1, 3).reshape(b, -1, h * t)  # (B, C, H*T)
        bias = (k @ attn.q_proj.bias.reshape(h, d, 1)).reshape(b, 1, h * t)  # (B, 1, H*T)
        scores = torch.baddbmm(bias, image, folded)
    weights = _softmax_small(scores.reshape(b, -1, h, t)).reshape(b, -1, h * t)  # (B, N, H*T)
    w_o = attn.out_proj.weight.reshape(-1, h, d).permute(1, 2, 0)  # (H, d, C)
    v_out = (v @ w_o).reshape(b, h * t, -1)  # (B, H*T, C)
    return torch.baddbmm(attn.out_proj.bias.reshape(1, 1, -1).expand(b, 1, -1), weights, v_out)


# --- the first block's prompt-independent part -------------------------------------------------------
def _version(tensor: Tensor) -> Optional[int]:
    try:
        return tensor._version
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


class _Same:
    """Whether a tensor equals the one seen before: the same object unchanged, or else equal values."""

    def __init__(self, tensor: Tensor) -> None:
        self._ref, self._version, self._copy = weakref.ref(tensor), _version(tensor), tensor.clone()

    def matches(self, tensor: Tensor) -> bool:
        if self._ref() is tensor and self._version is not None and _version(tensor) == self._version:
            return True
        copy = self._copy
        return copy.shape == tensor.shape and copy.dtype == tensor.dtype and copy.device == tensor.device \
            and torch.equal(copy, tensor)


def _dense_key(dense: Tensor) -> Tensor:
    """The part of a shared dense embedding (1 or stride-0 batch, C, h, w) that determines it."""
    first = dense[0]
    return first[:, 0, 0] if first.stride(1) == 0 and first.stride(2) == 0 else first


def _first_block(decoder, image_embeddings: Tensor, dense: Tensor, image_pe: Tensor, cache: bool = True):
    """Image side of the first block, shared by all prompts without mask input: ``src`` and ``pos`` as (N, C)
    and the projections (k, v) of the token-to-image and q of the image-to-token attention, each (N, Ci).
    With ``cache``, reused while embeddings, dense embedding, positional encoding and weights are unchanged."""
    layer = decoder.transformer.layers[0]
    t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    if not cache:
        return _first_block_tensors(t2i, i2t, image_embeddings, dense, image_pe)
    params = (t2i.k_proj.weight, t2i.k_proj.bias, t2i.v_proj.weight, t2i.v_proj.bias,
              i2t.q_proj.weight, i2t.q_proj.bias)
    param_key = tuple((p.data_ptr(), _version(p), p.dtype, p.device) for p in params)
    dense_key = _dense_key(dense)
    entry = _FIRST_BLOCK_CACHE.get(decoder)
    if entry is not None and entry[0] == param_key and all(
            same.matches(t) for same, t in zip(entry[1], (image_embeddings, dense_key, image_pe))):
        return entry[2]
    value = _first_block_tensors(t2i, i2t, image_embeddings, dense, image_pe)
    _FIRST_BLOCK_CACHE[decoder] = (param_key, tuple(_Same(t) for t in (image_embeddings, dense_key, image_pe)),
                                   value)
    return value


def _first_block_tensors(t2i, i2t, image_embeddings: Tensor, dense: Tensor, image_pe: Tensor):
    c = image_embeddings.shape[1]
    src = (image_embeddings[0] + dense[0]).reshape(c, -1).t().contiguous()
    pos = image_pe[0].reshape(c, -1).t().contiguous()
    with_pe = src + pos
    return src, pos, t2i.k_proj(with_pe), t2i.v_proj(src), i2t.q_proj(with_pe)


# --- the decoder ---------------------------------------------------------------------------------------
def _transformer(decoder, tokens: Tensor, src: Tensor, pos: Tensor,
                 first_block: Optional[Tuple[Tensor, Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    """The two-way transformer on tokens (B, T, C) and the image ``src`` ((N, C) if shared by all prompts,
    else (B, N, C)) with positional encoding ``pos`` (N, C); ``first_block``: the first block's projections
    of a shared ``src``. Returns (tokens (B, T, C), image (B, N, C))."""
    transformer = decoder.transformer
    queries, query_pe, keys = tokens, tokens, src
    for index, layer in enumerate(transformer.layers):
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)

        shared = first_block is not None and index == 0
        if shared:
            k_proj, v_proj, q_image = first_block
            attn_out = _token_to_image(layer.cross_attn_token_to_image, queries + query_pe, None, None,
                                       projected=(k_proj, v_proj))
        else:
            keys_pe = keys + pos  # used by both cross attentions: keys change only at the end of the block
            attn_out = _token_to_image(layer.cross_attn_token_to_image, queries + query_pe, keys_pe, keys)
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))

        q_tokens = queries + query_pe
        if shared:
            attn_out = _image_to_token(layer.cross_attn_image_to_token, None, q_tokens, queries,
                                       projected_queries=q_image)
        else:
            attn_out = _image_to_token(layer.cross_attn_image_to_token, keys_pe, q_tokens, queries)
            del keys_pe
        keys = layer.norm4(attn_out.add_(keys))
    attn_out = _token_to_image(transformer.final_attn_token_to_image, queries + query_pe, keys + pos, keys)
    queries = transformer.norm_final_attn(queries + attn_out)
    return queries, keys


def _conv_transpose_2x2(conv: nn.ConvTranspose2d, x: Tensor) -> Tensor:
    """A 2x2 / stride-2 transposed convolution on channels-last pixels (..., Cin): returns (..., 2, 2, Cout),
    the output pixel (2y + dy, 2x + dx) of input pixel (y, x) at index [..., dy, dx, :]."""
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.in_channels, -1)  # (Cin, 2*2*Cout)
    out = x.reshape(-1, x.shape[-1]) @ weight
    if conv.bias is not None:  # added afterwards: addmm's broadcast of the bias into the output is slower
        out += conv.bias.repeat(4)
    return out.reshape(*x.shape[:-1], 2, 2, conv.out_channels)


def _activate(act: nn.Module, x: Tensor) -> Tensor:
    """``act(x)`` for a temporary ``x``, in place for GELU."""
    return gelu_on_temporary(act, x) if type(act) is nn.GELU else act(x)


def _masks(decoder, image: Tensor, hyper: Tensor, hw: Tuple[int, int]) -> Tensor:
    """Output upscaling and mask prediction: image (B, N, C) in row-major order of ``hw``, hypernetwork outputs
    (B, M, C / 8); returns masks (B, M, 4h, 4w)."""
    conv1, norm, act1, conv2, act2 = decoder.output_upscaling
    b, (h, w) = image.shape[0], hw
    x = _conv_transpose_2x2(conv1, image)  # (B, N, 2, 2, C/4)
    x = _activate(act1, F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
    x = _activate(act2, _conv_transpose_2x2(conv2, x))  # (B, N, 2, 2, 2, 2, C/8)
    m = hyper.shape[1]
    masks = torch.bmm(hyper, x.reshape(b, -1, x.shape[-1]).transpose(1, 2))  # (B, M, N*16)
    # [b*m, y, x, dy, dx, dy2, dx2] -> channels (dy, dy2, dx, dx2) of each pixel (y, x): pixel (4y + 2dy + dy2,
    # 4x + 2dx + dx2) is channel 8 dy + 4 dy2 + 2 dx + dx2, the order pixel_shuffle reads for a factor of 4.
    masks = masks.view(b * m, h, w, 2, 2, 2, 2).permute(0, 3, 5, 4, 6, 1, 2).reshape(b, m * 16, h, w)
    return F.pixel_shuffle(masks, 4)


def decode_masks(decoder: nn.Module, image_embeddings: Tensor, image_pe: Tensor, sparse_prompt_embeddings: Tensor,
                 dense_prompt_embeddings: Tensor, multimask_output: bool) -> Tuple[Tensor, Tensor]:
    """``decoder(...)`` (segment_anything's ``MaskDecoder.forward``) computed with less work.

    Args:
        decoder: The mask decoder (``sam.mask_decoder``).
        image_embeddings: (1, C, h, w) image embedding shared by all prompts.
        image_pe: (1, C, h, w) dense positional encoding (``prompt_encoder.get_dense_pe()``).
        sparse_prompt_embeddings: (B, P, C) point and box embeddings of B prompts.
        dense_prompt_embeddings: (B, C, h, w) mask embeddings (without mask prompts: ``no_mask_embed``
            expanded, which lets the first block's image side be computed once for all prompts).
        multimask_output: Return the three multimask outputs instead of the single mask.

    Returns:
        Low resolution mask logits (B, M, 4h, 4w) and predicted IoUs (B, M), M = 3 or 1; equal to the module's
        output up to float rounding (with autograd: differentiable, gradients equal up to rounding, nothing cached).
        Falls back to ``decoder(...)`` for batched image embeddings, when the layout is not segment_anything's
        or when forward hooks are registered on the decoder's layers.
    """
    args = (image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output)
    if not supports_fast_decoding(decoder) or not all(torch.is_tensor(t) for t in args[:4]) \
            or image_embeddings.shape[0] != 1 or image_pe.shape[0] != 1 or has_forward_hooks(*decoder.modules()):
        return decoder(*args)
    if needs_autograd(decoder, *args[:4]):  # training: the same arithmetic under autograd, no cache, all prompts
        return _decode(decoder, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                       multimask_output, autograd=True)

    b, chunk = sparse_prompt_embeddings.shape[0], _prompts_per_chunk(image_embeddings)
    with torch.no_grad():
        if b <= chunk:
            return _decode(decoder, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                           multimask_output)
        dense = dense_prompt_embeddings.expand(b, -1, -1, -1)
        parts = [
            _decode(decoder, image_embeddings, image_pe, sparse_prompt_embeddings[start:start + chunk],
                    dense[start:start + chunk], multimask_output)
            for start in range(0, b, chunk)
        ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# Prompts decoded together: the per-prompt image tensors (prompts x N x C) of a chunk should stay in the CPU
# caches, and the largest temporary (the upscaled features, prompts x 16 N x 32) below glibc's 32 MB limit for
# allocations served by mmap (fresh pages each time). For N x C = 4096 x 256 (SAM at 1024), chunks of 2-4 prompts
# decoded 64 prompts 1.4x faster than one batch of 64 on a 2-core CPU (and 1.3x faster than single prompts).
_CHUNK_ELEMENTS = 1 << 21


def _prompts_per_chunk(image_embeddings: Tensor) -> int:
    if image_embeddings.device.type != "cpu":
        return 1 << 30
    return max(1, _CHUNK_ELEMENTS // max(1, image_embeddings[0].numel()))


def _decode(decoder, image_embeddings: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor,
            multimask_output: bool, autograd: bool = False) -> Tuple[Tensor, Tensor]:
    """The fast decoder on one chunk of prompts; ``autograd``: for training (no cache, every mask computed)."""
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    b = sparse.shape[0]
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
    _, c, h, w = image_embeddings.shape
    if (b == 1 or dense.shape[0] == 1 or dense.stride(0) == 0) and len(decoder.transformer.layers) > 0:
        src, pos, *first_block = _first_block(decoder, image_embeddings, dense, image_pe, cache=not autograd)
    else:
        src = (image_embeddings + dense).flatten(2).transpose(1, 2)  # (B, N, C)
        pos, first_block = image_pe[0].reshape(c, h * w).t().contiguous(), None
    hs, image = _transformer(decoder, tokens, src, pos, first_block)

    selected = slice(1, decoder.num_mask_tokens) if multimask_output else slice(0, 1)
    # Under autograd all masks are computed, as in the module, so that the unused hypernetworks get zero
    # gradients rather than none (optimizers treat the two differently).
    computed = slice(0, decoder.num_mask_tokens) if autograd else selected
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](hs[:, 1 + i, :])
                         for i in range(computed.start, computed.stop)], dim=1)
    masks = _masks(decoder, image, hyper, (h, w))
    if computed != selected:
        masks = masks[:, selected]
    iou_pred = decoder.iou_prediction_head(hs[:, 0, :])
    return masks, iou_pred[:, selected]


def decode_prompts(model: nn.Module, image_embeddings: Tensor, points: Optional[Tuple[Tensor, Tensor]] = None,
                   boxes: Optional[Tensor] = None, masks: Optional[Tensor] = None,
                   multimask_output: bool = False) -> Tuple[Tensor, Tensor]:
    """Prompt encoder and :func:`decode_masks` of a SAM ``model`` for B prompts on one image.

    Args:
        model: The SAM model.
        image_embeddings: (1, C, h, w) embedding of the image.
        points: (coordinates (B, P, 2) as (x, y), labels (B, P)) in the model's input frame, or None.
        boxes: (B, 4) boxes (x0, y0, x1, y1) in the input frame, or None.
        masks: (B, 1, 4h, 4w) low resolution mask logits, or None.
        multimask_output: Three masks per prompt instead of one.

    Returns:
        Low resolution mask logits (B, M, 4h, 4w) and predicted IoUs (B, M).
    """
    sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=masks)
    return decode_masks(
        model.mask_decoder, image_embeddings=image_embeddings, image_pe=dense_pe(model.prompt_encoder),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask_output,
    )


def predict_torch(predictor, point_coords: Optional[Tensor], point_labels: Optional[Tensor],
                  boxes: Optional[Tensor] = None, mask_input: Optional[Tensor] = None,
                  multimask_output: bool = True, return_logits: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """``predictor.predict_torch(...)`` (segment_anything's ``SamPredictor``) with :func:`decode_masks`.

    A predictor class that overrides ``predict_torch`` is called as it is.

    Args:
        predictor: A predictor with an image or precomputed embeddings set.
        point_coords: (B, P, 2) point coordinates (x, y) in the model's input frame, or None.
        point_labels: (B, P) labels (1 foreground, 0 background), or None.
        boxes: (B, 4) boxes (x0, y0, x1, y1) in the input frame, or None.
        mask_input: (B, 1, 4h, 4w) low resolution mask logits from an earlier prediction, or None.
        multimask_output: Three masks per prompt instead of one.
        return_logits: Return the upsampled logits instead of thresholded masks.

    Returns:
        Masks (B, M, H, W) at the original image size (boolean, or logits), predicted IoUs (B, M) and low
        resolution logits (B, M, 4h, 4w).
    """
    from segment_anything.predictor import SamPredictor

    if getattr(type(predictor), "predict_torch", None) is not SamPredictor.predict_torch:  # overridden: respect it
        return predictor.predict_torch(point_coords, point_labels, boxes=boxes, mask_input=mask_input,
                                       multimask_output=multimask_output, return_logits=return_logits)
    if not predictor.is_image_set:
        raise RuntimeError("Set an image (or precomputed embeddings) on the predictor before predicting masks.")
    model = predictor.model
    points = (point_coords, point_labels) if point_coords is not None else None
    with torch.no_grad():
        low_res, iou_predictions = decode_prompts(model, predictor.features, points, boxes, mask_input,
                                                  multimask_output)
        masks = upscale_masks(model, low_res, predictor.input_size, predictor.original_size)
        if not return_logits:
            masks = masks > model.mask_threshold
    return masks, iou_predictions, low_res


# --- mask logits at image size ---------------------------------------------------------------------------
# Up to this many output pixels the two resizes are done as matrix products (1.4x faster at 1024 x 1024, 3x at
# 512 x 512 than the interpolations on a 2-core CPU); beyond it the interpolations are cheaper.
_MATMUL_PIXELS = 1024 * 1024


@functools.lru_cache(maxsize=16)
def _resize_matrix(n_low: int, img_size: int, n_input: int, n_original: int, dtype, device) -> Tensor:
    """(n_original, n_low): SAM's resize of one axis (bilinear to ``img_size``, crop to ``n_input``, bilinear to
    ``n_original``) as a matrix, computed by applying those interpolations to the identity."""
    eye = torch.eye(n_low, dtype=torch.float32, device=device)[None, None]  # resized along dim -2
    x = F.interpolate(eye, (img_size, n_low), mode="bilinear", align_corners=False)[..., :n_input, :]
    x = F.interpolate(x, (n_original, n_low), mode="bilinear", align_corners=False)
    return x[0, 0].to(dtype)


def upscale_masks(model, low_res: Tensor, input_size: Tuple[int, int], original_size: Tuple[int, int]) -> Tensor:
    """``model.postprocess_masks(low_res, input_size, original_size)``, faster for images up to 1024 x 1024.

    Both resizes are linear and separable, so the result is ``R @ low_res @ C^T`` with an (H, h) matrix R and
    a (W, w) matrix C built once per size; equal to SAM's up to float rounding.

    Args:
        model: The SAM model (its ``image_encoder.img_size`` is the square input size).
        low_res: (B, M, h, w) low resolution mask logits.
        input_size: (h', w') size of the resized image inside the model input.
        original_size: (H, W) size of the original image.

    Returns:
        (B, M, H, W) logits.
    """
    height, width = (int(s) for s in original_size)
    img_size = int(model.image_encoder.img_size)
    if height * width > _MATMUL_PIXELS or torch.is_grad_enabled() and low_res.requires_grad:
        return model.postprocess_masks(low_res, input_size, original_size)
    rows = _resize_matrix(low_res.shape[-2], img_size, int(input_size[0]), height, low_res.dtype, low_res.device)
    cols = _resize_matrix(low_res.shape[-1], img_size, int(input_size[1]), width, low_res.dtype, low_res.device)
    return rows @ (low_res @ cols.t())
