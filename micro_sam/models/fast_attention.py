"""A faster forward pass for the ViT image encoder of SAM (``vit_b``, ``vit_l``, ``vit_h``), same weights.

segment_anything's encoder attention multiplies queries and keys explicitly, adds the decomposed relative
position bias to the full score matrix and applies softmax, allocating several ``(batch * heads, N, N)``
tensors per block (805 MB each for the global-attention blocks of ``vit_b`` at 1024x1024, N = 4096).
Here the same function is computed by :func:`torch.nn.functional.scaled_dot_product_attention` with the
relative position bias passed as an additive mask:

- the bias of query ``i`` = (row ``qh``, column ``qw``) and key ``j`` = (``kh``, ``kw``) is
  ``rel_h[i, kh] + rel_w[i, kw]`` with ``rel_h[i, kh] = q_i . Rh[qh, kh]`` and ``rel_w[i, kw] = q_i . Rw[qw, kw]``;
- without gradients, queries are processed in chunks of image rows and the bias of a chunk is written into
  one reused buffer, so no tensor of the full ``N x N`` size is ever allocated (fresh large allocations cost
  page faults that are more expensive than the arithmetic on CPU);
- with gradients (training), each chunk builds its bias with differentiable operations, so gradients reach
  ``qkv``, ``proj`` and the relative position tables exactly as in the original.

Window attention blocks additionally skip the copies the original makes when splitting ``qkv``.
The module classes are swapped in place (subclasses of segment_anything's ``Attention``), so parameters,
state-dict keys, ``isinstance`` checks and wrappers around ``attn.qkv`` (e.g. LoRA) are unaffected.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import image_encoder as _sa_encoder

__all__ = [
    "FastAttention", "attention_dtype", "decomposed_attention", "is_optimized", "optimize_image_encoder",
    "optimize_sam", "restore_sam",
]

# Upper bound on the number of bias elements written per chunk (the buffer holds batch*heads*rows*W*N
# values): 2**25 = 128 MB in float32, a sixth of one full score matrix of vit_b's global attention. Smaller
# chunks mean more kernel launches, which cost more than they save on a busy CPU (measured).
_CHUNK_ELEMENTS = 1 << 25

# Dtype of the attention computation inside :class:`FastAttention` (None: the dtype of the activations).
# Set with :func:`attention_dtype`; a context variable, so concurrent threads do not affect each other.
_ATTENTION_DTYPE: contextvars.ContextVar = contextvars.ContextVar("micro_sam_attention_dtype", default=None)


@contextlib.contextmanager
def attention_dtype(dtype: Optional[torch.dtype]) -> Iterator[None]:
    """Run the attention of :class:`FastAttention` modules in ``dtype`` within this context.

    Only the attention core (relative-position bias, ``q k^T``, softmax, weighted sum) changes precision;
    the linear layers keep the dtype of the activations. This is the reduced-precision mode for CPUs without
    native bfloat16 matrix instructions, where bfloat16 linear layers are slower than float32 ones.

    Args:
        dtype: ``torch.bfloat16``, ``torch.float16`` or None / ``torch.float32`` for the activation dtype.
    """
    token = _ATTENTION_DTYPE.set(None if dtype == torch.float32 else dtype)
    try:
        yield
    finally:
        _ATTENTION_DTYPE.reset(token)


def _relative_tables(rel_pos: torch.Tensor, q_size: int, k_size: int) -> torch.Tensor:
    """The relative-position embedding for every (query, key) coordinate pair along one axis: (q_size, k_size, C)."""
    # segment_anything's helper handles the interpolation for other input sizes; reuse it for identical results.
    return _sa_encoder.get_rel_pos(q_size, k_size, rel_pos)


def _rows_per_chunk(batch_heads: int, height: int, width: int, n_keys: int, chunk_elements: int) -> int:
    """Query rows per chunk: at most ``chunk_elements`` bias entries per chunk, chunks of (nearly) equal size."""
    per_row = max(batch_heads * width * n_keys, 1)
    rows = max(1, min(height, chunk_elements // per_row))
    n_chunks = -(-height // rows)
    return -(-height // n_chunks)


def decomposed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    hw: Tuple[int, int],
    rel_pos_h: Optional[torch.Tensor],
    rel_pos_w: Optional[torch.Tensor],
    scale: float,
    chunk_elements: int = _CHUNK_ELEMENTS,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Softmax attention with the decomposed relative position bias of SAM's ViT.

    Computes ``softmax(scale * q k^T + B) v`` with ``B[i, j] = q_i . Rh[row(i), row(j)] + q_i . Rw[col(i), col(j)]``,
    tokens enumerated row-major over an ``(H, W)`` grid. Without relative positions ``B`` is zero.

    Args:
        q: Queries (B, heads, H * W, C); any strides.
        k: Keys (B, heads, H * W, C).
        v: Values (B, heads, H * W, C).
        hw: The token grid (H, W).
        rel_pos_h: Relative position table along rows (2H - 1, C) or None.
        rel_pos_w: Relative position table along columns (2W - 1, C) or None.
        scale: Factor applied to ``q k^T`` (not to the bias).
        chunk_elements: Bound on the bias elements materialised at once (per chunk of query rows).
        compute_dtype: Dtype of the attention itself (bias and softmax); None: the dtype of ``q``.
            The relative position terms are computed in the dtype of ``q`` first.

    Returns:
        The attention output (B, heads, H * W, C) in ``compute_dtype`` (or the dtype of ``q``).
    """
    h, w = hw
    b, n_heads, n, c = q.shape
    dtype = q.dtype if compute_dtype is None else compute_dtype
    if rel_pos_h is None:
        return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), scale=scale)

    r_q = q.reshape(b, n_heads, h, w, c)
    rh = _relative_tables(rel_pos_h, h, h).to(q.dtype)
    rw = _relative_tables(rel_pos_w, w, w).to(q.dtype)
    # rel_h[..., qh, qw, kh] and rel_w[..., qh, qw, kw]: (B, heads, H, W, H) and (B, heads, H, W, W).
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh).to(dtype)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw).to(dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)

    rows = _rows_per_chunk(b * n_heads, h, w, n, chunk_elements)
    differentiable = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q, k, v, rel_pos_h, rel_pos_w)
    )
    if differentiable:
        outputs = []
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            bias = (rel_h[:, :, r0:r1, :, :, None] + rel_w[:, :, r0:r1, :, None, :]).reshape(b, n_heads, -1, n)
            outputs.append(F.scaled_dot_product_attention(q[:, :, r0 * w:r1 * w], k, v, attn_mask=bias, scale=scale))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)

    # Inference: one bias buffer, filled chunk by chunk; the outputs are written into one result tensor.
    out = torch.empty((b, n_heads, n, v.shape[-1]), dtype=dtype, device=v.device)
    buffer = torch.empty((b, n_heads, rows, w, h, w), dtype=dtype, device=q.device)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        bias = buffer[:, :, :r1 - r0]
        torch.add(rel_h[:, :, r0:r1, :, :, None], rel_w[:, :, r0:r1, :, None, :], out=bias)
        out[:, :, r0 * w:r1 * w] = F.scaled_dot_product_attention(
            q[:, :, r0 * w:r1 * w], k, v, attn_mask=bias.view(b, n_heads, (r1 - r0) * w, n), scale=scale
        )
    return out


class FastAttention(_sa_encoder.Attention):
    """segment_anything's encoder ``Attention`` computed with ``scaled_dot_product_attention``.

    Same parameters and results (to float rounding) as the original; see the module docstring.
    Instances are made by :func:`optimize_sam`, which changes the class of existing modules.
    """

    chunk_elements: int = _CHUNK_ELEMENTS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention over a token grid.

        Args:
            x: Tokens (B, H, W, C) (B counts windows for window-attention blocks).

        Returns:
            Tensor (B, H, W, C).
        """
        b, h, w, dim = x.shape
        n = h * w
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, -1)
        # (B, heads, N, C) views: no copy of q, k, v.
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        rel_h = self.rel_pos_h if self.use_rel_pos else None
        rel_w = self.rel_pos_w if self.use_rel_pos else None
        out = decomposed_attention(
            q, k, v, (h, w), rel_h, rel_w, self.scale, self.chunk_elements, _ATTENTION_DTYPE.get()
        )
        out = out.transpose(1, 2).reshape(b, h, w, -1).to(x.dtype)
        return self.proj(out)


def is_optimized(sam) -> bool:
    """Whether :func:`optimize_sam` was applied (any encoder attention module has the fast forward)."""
    return any(isinstance(m, FastAttention) for m in sam.modules())


def optimize_image_encoder(encoder: torch.nn.Module) -> torch.nn.Module:
    """Switch every segment_anything encoder ``Attention`` inside ``encoder`` to :class:`FastAttention`, in place."""
    for module in encoder.modules():
        if type(module) is _sa_encoder.Attention:
            module.__class__ = FastAttention
    return encoder


def optimize_sam(sam: torch.nn.Module) -> torch.nn.Module:
    """Make SAM's ViT image encoder faster, in place, without changing weights, state-dict keys or results.

    Applies to the segment_anything ViT encoders (``vit_b``, ``vit_l``, ``vit_h``) and to any encoder built
    from segment_anything's ``Attention`` blocks; other encoders (e.g. ``vit_t``, which has its own fast
    attention) are left unchanged. Calling it twice is harmless. Works in training (gradients flow to all
    parameters as before) and in inference; features agree with the original forward within float rounding.

    Args:
        sam: A ``segment_anything.modeling.Sam`` (or any module containing the encoder).

    Returns:
        The same ``sam`` object.
    """
    return optimize_image_encoder(sam)


def restore_sam(sam: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`optimize_sam`, in place: the original segment_anything forward is used again."""
    for module in sam.modules():
        if type(module) is FastAttention:
            module.__class__ = _sa_encoder.Attention
    return sam

