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

Window attention blocks additionally skip the copies the original makes when splitting ``qkv``, and in
inference :class:`FastBlock` avoids most of the block's large temporaries (see there).
The module classes are swapped in place (subclasses of segment_anything's ``Attention`` and ``Block``), so
parameters, state-dict keys, ``isinstance`` checks and wrappers around ``attn.qkv`` (e.g. LoRA) are unaffected.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _segment_anything  # noqa: F401  (imports segment_anything without torchvision)
from segment_anything.modeling import image_encoder as _sa_encoder

from .attention import has_forward_hooks, needs_autograd

__all__ = [
    "FastAttention", "FastBlock", "attention_dtype", "decomposed_attention", "is_optimized", "optimize_image_encoder",
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
        b, h, w, _ = x.shape
        out = self.attend(x).transpose(1, 2).reshape(b, h, w, -1).to(x.dtype)
        return self.proj(out)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention before the output projection: tokens (B, H, W, C) -> (B, heads, H * W, C / heads),
        in the dtype of :func:`attention_dtype` (default: that of ``x``)."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x).view(b, h * w, 3, self.num_heads, -1)
        # (B, heads, N, C) views: no copy of q, k, v.
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        rel_h = self.rel_pos_h if self.use_rel_pos else None
        rel_w = self.rel_pos_w if self.use_rel_pos else None
        return decomposed_attention(
            q, k, v, (h, w), rel_h, rel_w, self.scale, self.chunk_elements, _ATTENTION_DTYPE.get()
        )


# Elements of the MLP's hidden activation per chunk of tokens in FastBlock (16 MB in float32): below glibc's
# largest mmap threshold (32 MB), so the chunks reuse heap memory instead of faulting in fresh pages each time.
_MLP_CHUNK_ELEMENTS = 1 << 22


def _is_linear(module) -> bool:
    return type(module) is torch.nn.Linear


class FastBlock(_sa_encoder.Block):
    """segment_anything's encoder ``Block`` for inference with fewer and smaller temporaries.

    Same parameters and results (to float rounding). Without gradients and autocast (and for the layout
    segment_anything builds: :class:`FastAttention`, linear layers, layer norms, GELU), the block

    - projects the attention output of window blocks after putting the windows back in image order (one copy
      instead of three) and adds the residual while projecting global blocks (``addmm`` into a new tensor);
    - runs the MLP (norm, ``lin1``, GELU, ``lin2``, residual) in chunks of tokens, with the GELU in place and
      ``lin2`` accumulated into the block's own output, so the (tokens x 4C) hidden activation never exists
      whole (50 MB per block for ``vit_b`` at 1024 x 1024, allocated, faulted in and freed twice).

    The block input is never modified. Otherwise (training, autocast, wrapped layers, forward hooks on the
    layers this path does not call) the original forward runs.
    """

    def _fast_path_ok(self, x: torch.Tensor) -> bool:
        mlp = self.mlp
        layers_ok = type(self.attn) is FastAttention and _is_linear(self.attn.proj) \
            and _is_linear(getattr(mlp, "lin1", None)) and _is_linear(getattr(mlp, "lin2", None)) \
            and type(getattr(mlp, "act", None)) is torch.nn.GELU and type(self.norm2) is torch.nn.LayerNorm
        bypassed = (self.attn, self.attn.proj, mlp, mlp.lin1, mlp.act, mlp.lin2, self.norm2) if layers_ok else ()
        return layers_ok and not torch.is_autocast_enabled(x.device.type) and not needs_autograd(self, x) \
            and not has_forward_hooks(*bypassed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, H, W, C) -> (B, H, W, C)."""
        if not self._fast_path_ok(x):
            return super().forward(x)
        _, height, width, channels = x.shape
        tokens = self.norm1(x)
        if self.window_size > 0:
            tokens, _ = _sa_encoder.window_partition(tokens, self.window_size)
        out = self.attend_and_project(x, tokens, height, width)
        self._mlp_(out.view(-1, channels))
        return out

    def attend_and_project(self, x: torch.Tensor, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``x + proj(attention(tokens))`` in image order as a new (B, H, W, C) tensor; ``tokens`` are the
        normalised tokens, split into windows for window blocks."""
        attn = self.attn
        out = attn.attend(tokens)  # (B', heads, N', d)
        n_heads, d = out.shape[1], out.shape[3]
        proj = attn.proj
        if self.window_size <= 0:
            merged = out.transpose(1, 2).reshape(-1, n_heads * d).to(x.dtype)
            result = torch.addmm(x.reshape(-1, x.shape[-1]), merged, proj.weight.t())
            if proj.bias is not None:
                result += proj.bias
            return result.view(x.shape)
        ws, b = self.window_size, x.shape[0]
        n_rows, n_cols = -(-height // ws), -(-width // ws)
        # windows (b, row, col, heads, y, x, d) -> image order (b, row, y, col, x, heads, d), padding included
        image = out.new_empty((b, n_rows, ws, n_cols, ws, n_heads, d), dtype=x.dtype)
        image.copy_(out.view(b, n_rows, n_cols, n_heads, ws, ws, d).permute(0, 1, 4, 2, 5, 3, 6))
        projected = proj(image.view(b, n_rows * ws, n_cols * ws, n_heads * d))
        # into a new row-major tensor (x may be a permuted view, e.g. the patch embedding's output)
        result = torch.empty_like(x, memory_format=torch.contiguous_format)
        return torch.add(x, projected[:, :height, :width], out=result)

    def _mlp_(self, tokens: torch.Tensor) -> None:
        """``tokens += mlp(norm2(tokens))`` in place for tokens (N, C), in chunks of rows."""
        norm, lin1, lin2 = self.norm2, self.mlp.lin1, self.mlp.lin2
        rows = max(1, _MLP_CHUNK_ELEMENTS // lin1.out_features)
        approximate = self.mlp.act.approximate
        for start in range(0, tokens.shape[0], rows):
            part = tokens[start:start + rows]
            hidden = F.linear(F.layer_norm(part, norm.normalized_shape, norm.weight, norm.bias, norm.eps),
                              lin1.weight, lin1.bias)
            torch.ops.aten.gelu_(hidden, approximate=approximate)
            part.addmm_(hidden, lin2.weight.t())
            if lin2.bias is not None:
                part += lin2.bias


def is_optimized(sam) -> bool:
    """Whether :func:`optimize_sam` was applied (any encoder attention module has the fast forward)."""
    return any(isinstance(m, FastAttention) for m in sam.modules())


def optimize_image_encoder(encoder: torch.nn.Module) -> torch.nn.Module:
    """Switch every segment_anything encoder ``Attention`` inside ``encoder`` to :class:`FastAttention`, in place."""
    for module in encoder.modules():
        if type(module) is _sa_encoder.Attention:
            module.__class__ = FastAttention
        elif type(module) is _sa_encoder.Block:
            module.__class__ = FastBlock
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
        elif type(module) is FastBlock:
            module.__class__ = _sa_encoder.Block
    return sam

